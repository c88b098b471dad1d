"""The teacher cache's codec: a position's top-k token ids and log-probabilities, plus the log of the rest
of the mass, in about a byte per kept token.

Ids. Each position's k ids are mapped to ranks (a permutation of the vocabulary by how often each token
occurs in the data, so likely tokens get small numbers), sorted, and stored as gaps. Gaps are Rice-coded
with the parameter that is cheapest for that position (a binary remainder of r bits and a unary quotient).
Sorting drops the k! orderings (about log2(k) - 1.44 bits per id), the rank map makes gaps small.

Probabilities. In rank order each kept token stores a level: sqrt(p / p_top1) quantised uniformly to
`level_bits` bits. Uniform steps in sqrt(p) give every kept token the same expected contribution to the
KL of the reconstruction (p * (d log p)^2 is constant), so the precision follows the mass: a token with
a thousandth of the top-1 mass gets a coarse step. Levels are Rice-coded too (tail tokens have small
levels). The top-1 log-prob is fixed point (16 bits, steps of 1/4096 nat over [-16, 0]: the top-1 of any
vocabulary under 8.8M tokens is above -log V > -16); the log of the rest mass is float16.

Layout of one row's n positions (every stream byte-aligned, so a row decodes with whole-array numpy):
    top1 u16[n] | rest f16[n] | params u8[n] (id r | level r << 4) | id remainders | level remainders |
    unary quotients (ids of every position, then levels)
Decoding is vectorised: remainders are fixed-width fields once each position's r is known, and the unary
stream's quotients are the gaps between its zero bits.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

TOP1_SCALE = 4096.0
"""Fixed-point steps per nat of the stored top-1 log-prob."""


class Decoded(NamedTuple):
    """A row's positions: ranks sorted ascending [n, k], their log-probs [n, k], and the log rest mass [n]."""

    ranks: np.ndarray
    logp: np.ndarray
    log_rest: np.ndarray


def _rice_param(values: np.ndarray) -> np.ndarray:
    """Per row of `values` [n, k] (non-negative ints), the Rice parameter r in 0..15 of fewest bits."""
    best_bits = None
    best = np.zeros(values.shape[0], dtype=np.uint8)
    for r in range(16):
        bits = (values >> r).sum(axis=1) + values.shape[1] * (r + 1)
        if best_bits is None:
            best_bits = bits
            continue
        better = bits < best_bits
        best[better] = r
        best_bits = np.where(better, bits, best_bits)
    return best


def _pack_fields(values: np.ndarray, widths: np.ndarray) -> bytes:
    """Fixed-width fields (each value its own width, most significant bit first), bit-packed."""
    total = int(widths.sum())
    if total == 0:
        return b""
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]])
    bits = np.zeros(total, dtype=np.uint8)
    for j in range(int(widths.max())):
        has = widths > j
        pos = starts[has] + (widths[has] - 1 - j)
        bits[pos] = (values[has] >> j) & 1
    return np.packbits(bits).tobytes()


def _unpack_fields(buf: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """The inverse of `_pack_fields`, whole-array: every field (at most 15 bits, so within 3 bytes of its
    first byte) is cut from a 24-bit window read at its first byte."""
    total = int(widths.sum())
    out = np.zeros(widths.shape, dtype=np.int64)
    if total == 0:
        return out
    nbytes = (total + 7) // 8
    if buf.size < nbytes:
        raise ValueError("truncated field stream")
    padded = np.zeros(nbytes + 3, dtype=np.int64)
    padded[:nbytes] = buf[:nbytes]
    starts = np.cumsum(widths) - widths
    at, skip = starts >> 3, starts & 7
    window = (padded[at] << 16) | (padded[at + 1] << 8) | padded[at + 2]
    return (window >> (24 - skip - widths)) & ((1 << widths) - 1)


def _unary(quotients: np.ndarray) -> bytes:
    """q ones then a zero, for every quotient."""
    ends = np.cumsum(quotients + 1) - 1  # where each zero goes
    bits = np.ones(int(ends[-1]) + 1 if len(ends) else 0, dtype=np.uint8)
    bits[ends] = 0
    return np.packbits(bits).tobytes()


def _read_unary(buf: np.ndarray, count: int) -> np.ndarray:
    bits = np.unpackbits(buf)
    zeros = np.flatnonzero(bits == 0)[:count]
    if len(zeros) < count:
        raise ValueError("truncated unary stream")
    return np.diff(zeros, prepend=-1) - 1


def encode(ranks: np.ndarray, logp: np.ndarray, log_rest: np.ndarray, *, level_bits: int) -> bytes:
    """One row's n positions: `ranks` [n, k] (distinct per position), their log-probs `logp` [n, k] at
    temperature 1 (the top-1 among them), `log_rest` [n] the log of the mass outside them."""
    n, k = ranks.shape
    if n == 0:
        return b""
    order = np.argsort(ranks, axis=1, kind="stable")
    r_sorted = np.take_along_axis(ranks.astype(np.int64), order, axis=1)
    lp_sorted = np.take_along_axis(logp.astype(np.float64), order, axis=1)
    top1 = lp_sorted.max(axis=1)
    gaps = np.diff(r_sorted, axis=1, prepend=-1) - 1  # >= 0
    levels_max = (1 << level_bits) - 1
    s = np.exp((lp_sorted - top1[:, None]) / 2)  # sqrt(p / p_top1) in (0, 1]
    levels = np.clip(np.rint(s * levels_max), 0, levels_max).astype(np.int64)
    r_id, r_lv = _rice_param(gaps), _rice_param(levels)
    id_w = np.repeat(r_id.astype(np.int64), k)
    lv_w = np.repeat(r_lv.astype(np.int64), k)
    g, lv = gaps.reshape(-1), levels.reshape(-1)
    parts = [
        np.clip(np.rint(-top1 * TOP1_SCALE), 0, 65535).astype(np.uint16).tobytes(),
        np.asarray(log_rest, dtype=np.float64).astype(np.float16).tobytes(),
        (r_id | (r_lv << 4)).astype(np.uint8).tobytes(),
        _pack_fields(g & ((1 << id_w) - 1), id_w),
        _pack_fields(lv & ((1 << lv_w) - 1), lv_w),
        _unary(np.concatenate([g >> id_w, lv >> lv_w])),
    ]
    return b"".join(parts)


def decode(blob, n: int, k: int, *, level_bits: int) -> Decoded:
    """The inverse of `encode` (exact for ranks; log-probs as quantised)."""
    buf = np.frombuffer(blob, dtype=np.uint8)
    if n == 0:
        return Decoded(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32), np.zeros(0, np.float32))
    top1 = -buf[: 2 * n].view(np.uint16).astype(np.float64) / TOP1_SCALE
    rest = buf[2 * n : 4 * n].view(np.float16).astype(np.float32)
    params = buf[4 * n : 5 * n]
    r_id, r_lv = (params & 15).astype(np.int64), (params >> 4).astype(np.int64)
    id_w, lv_w = np.repeat(r_id, k), np.repeat(r_lv, k)
    at = 5 * n
    id_bytes, lv_bytes = (int(id_w.sum()) + 7) // 8, (int(lv_w.sum()) + 7) // 8
    id_rem = _unpack_fields(buf[at : at + id_bytes], id_w)
    lv_rem = _unpack_fields(buf[at + id_bytes : at + id_bytes + lv_bytes], lv_w)
    q = _read_unary(buf[at + id_bytes + lv_bytes :], 2 * n * k)
    gaps = (q[: n * k] << id_w) | id_rem
    levels = (q[n * k :] << lv_w) | lv_rem
    ranks = np.cumsum(gaps.reshape(n, k) + 1, axis=1) - 1
    logp = (top1[:, None] + _log_level(level_bits)[levels.reshape(n, k)]).astype(np.float32)
    return Decoded(ranks, logp, rest)


_LOG_LEVELS: dict[int, np.ndarray] = {}


def _log_level(level_bits: int) -> np.ndarray:
    """log(p / p_top1) of every level, a table: 2 log(level / max); level 0 stands for everything below half
    a step, at its middle in log terms."""
    table = _LOG_LEVELS.get(level_bits)
    if table is None:
        levels_max = (1 << level_bits) - 1
        levels = np.arange(levels_max + 1, dtype=np.float64)
        table = 2 * np.log(np.where(levels > 0, levels / levels_max, 0.25 / levels_max))
        _LOG_LEVELS[level_bits] = table
    return table


def exact_bytes(n: int, k: int) -> int:
    """Bytes of the same positions stored plainly (int32 ids, float32 log-probs and rest): the reference."""
    return n * (k * 8 + 4)
