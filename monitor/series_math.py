"""Smoothing and downsampling for plots."""

from __future__ import annotations

import math
from array import array

import numpy as np


def debiased_ema(values: list[float], weight: float) -> list[float]:
    """TensorBoard's smoothing: an exponential moving average divided by (1 - weight^n), so early points
    are not pulled toward 0. Non-finite values pass through and do not disturb the average."""
    if weight <= 0:
        return list(values)
    out = []
    last, n = 0.0, 0
    for v in values:
        if not math.isfinite(v):
            out.append(v)
            continue
        last = last * weight + (1 - weight) * v
        n += 1
        out.append(last / (1 - weight**n))
    return out


def minmax_indices(ys, buckets: int) -> list[int]:
    """Indices that reduce a series to at most ~2 * `buckets` points, keeping each bucket's min and max
    (in order), so spikes survive downsampling to the plot width. Non-finite points are kept."""
    n = len(ys)
    if n <= 2 * buckets or buckets <= 0:
        return list(range(n))
    arr = np.asarray(ys, dtype=np.float64)
    size = -(-n // buckets)  # ceil
    padded = np.full(size * buckets, np.nan)
    padded[:n] = arr
    grid = padded.reshape(buckets, size)
    finite = np.isfinite(grid)
    lo = np.where(finite, grid, np.inf).argmin(axis=1)
    hi = np.where(finite, grid, -np.inf).argmax(axis=1)
    base = np.arange(buckets) * size
    keep = set((base + lo)[finite.any(axis=1)].tolist()) | set((base + hi)[finite.any(axis=1)].tolist())
    keep |= set(np.flatnonzero(~np.isfinite(arr)).tolist())
    keep |= {0, n - 1}  # the first and the newest point are always drawn
    return sorted(i for i in keep if i < n)


class IncrementalEMA:
    """`debiased_ema` over a growing series, extended with only the new values on each call, in numpy blocks
    (the closed form of the recursion within a block, the state carried between blocks), so a long history
    is smoothed in milliseconds rather than a Python loop per point."""

    __slots__ = ("weight", "last", "count", "out")
    BLOCK = 256
    """Points per block: w^-BLOCK stays far inside float64 for every smoothing weight offered (>= 0.6)."""

    def __init__(self, weight: float):
        self.weight = weight
        self.last, self.count, self.out = 0.0, 0, array("d")

    def update(self, values) -> array:
        w = self.weight
        if len(values) < len(self.out):  # the series was rebuilt: start over
            self.last, self.count, self.out = 0.0, 0, array("d")
        new = np.asarray(values[len(self.out) :], dtype=np.float64)
        for start in range(0, len(new), self.BLOCK):
            self.out.frombytes(self._block(new[start : start + self.BLOCK], w).tobytes())
        return self.out

    def _block(self, v: np.ndarray, w: float) -> np.ndarray:
        out = v.copy()  # non-finite values pass through and do not disturb the average
        finite = np.isfinite(v)
        x = v[finite]
        if not len(x):
            return out
        k = np.arange(len(x), dtype=np.float64)
        s = np.cumsum(x * w ** (-k))
        ema = w ** (k + 1) * self.last + (1 - w) * w**k * s
        n = self.count + k + 1
        out[finite] = ema / (1 - w**n)
        self.last, self.count = float(ema[-1]), self.count + len(x)
        return out


class BlockMinMax:
    """Min and max positions of every complete block of `SIZE` points of a growing series, kept up to date
    with only the new points: a redraw of a long history downsamples these (two per block) plus the open
    block, not every point, so its cost does not grow with the history."""

    SIZE = 1024
    __slots__ = ("lo", "hi", "nonfinite", "done")

    def __init__(self) -> None:
        self.lo, self.hi, self.nonfinite, self.done = array("q"), array("q"), array("q"), 0
        """positions of each complete block's min and max, and of non-finite points; points in complete blocks"""

    def candidates(self, values) -> np.ndarray:
        """Positions that hold the first point, every block's extremes, every non-finite point (a break in
        the line), and every point of the open block, in order."""
        n = len(values)
        if n < self.done:  # the series was rebuilt: start over
            self.lo, self.hi, self.nonfinite, self.done = array("q"), array("q"), array("q"), 0
        full = (n // self.SIZE) * self.SIZE
        if full > self.done:
            v = np.asarray(values[self.done : full], dtype=np.float64).reshape(-1, self.SIZE)
            finite = np.isfinite(v)
            base = self.done + np.arange(v.shape[0]) * self.SIZE
            self.lo.frombytes((base + np.where(finite, v, np.inf).argmin(axis=1)).astype(np.int64).tobytes())
            self.hi.frombytes((base + np.where(finite, v, -np.inf).argmax(axis=1)).astype(np.int64).tobytes())
            self.nonfinite.frombytes((np.flatnonzero(~finite.ravel()) + self.done).astype(np.int64).tobytes())
            self.done = full
        parts = [np.frombuffer(a, dtype=np.int64) for a in (self.lo, self.hi, self.nonfinite) if len(a)]
        closed = np.unique(np.concatenate([np.zeros(1, dtype=np.int64), *parts])) if self.done else np.zeros(0, dtype=np.int64)
        return np.concatenate([closed, np.arange(self.done, n, dtype=np.int64)])
