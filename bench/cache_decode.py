"""How fast the teacher cache's rows decode, per CPU core: what a training step waits for (or a prefetch
thread does beside it) when it reads its teacher from `teacher.cache`.

    python bench/cache_decode.py                  # k = 64 and 128, V = 151,936, 16 rows of 512 positions
    python bench/cache_decode.py --k 64 --rows 32

Rows are encoded from synthetic teacher distributions over Qwen's vocabulary size: Zipf-like logits over
a frequency ranking plus noise, so the top-k ids and their levels have realistic gaps. Decoding is timed
as `TeacherCache.row` does it (the codec, then rank -> id), one thread, CPU time, best of 3.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dsdistill.codec import decode, encode  # noqa: E402

V = 151_936


def rows_of(n_rows: int, positions: int, k: int, level_bits: int, seed: int = 0):
    """Encoded rows, each of `positions` positions, and the rank -> id table."""
    g = torch.Generator().manual_seed(seed)
    base = -1.1 * torch.log(torch.arange(1, V + 1, dtype=torch.float32))  # by rank: frequent tokens likelier
    perm = torch.randperm(V, generator=g)  # ids are not in rank order
    ranks_of = torch.empty(V, dtype=torch.int64)
    ranks_of[perm] = torch.arange(V)
    blobs = []
    for _ in range(n_rows):
        logits = base[None] * 4 + 3 * torch.randn(positions, V, generator=g)
        lp = torch.log_softmax(logits, -1)[:, ranks_of]  # by id
        top, ids = lp.topk(k, dim=-1)
        rest = torch.logsumexp(lp.scatter(-1, ids, float("-inf")), -1)
        blobs.append(encode(ranks_of[ids].numpy(), top.numpy(), rest.numpy(), level_bits=level_bits))
    return blobs, perm.numpy().astype(np.int64)


def rate(blobs, positions: int, k: int, level_bits: int, id_of: np.ndarray, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.process_time()
        for blob in blobs:
            d = decode(blob, positions, k, level_bits=level_bits)
            id_of[d.ranks]
        best = min(best, time.process_time() - t0)
    return len(blobs) * positions / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--k", type=int, nargs="*", default=[64, 128])
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--positions", type=int, default=512)
    ap.add_argument("--level-bits", type=int, default=6)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"cache decode, V = {V:,}, {args.rows} rows x {args.positions} positions, level_bits {args.level_bits}, one core")
    print(f"{'k':>5} {'bytes/position':>15} {'positions/CPU-s':>16}")
    for k in args.k:
        blobs, id_of = rows_of(args.rows, args.positions, k, args.level_bits)
        size = sum(len(b) for b in blobs) / (args.rows * args.positions)
        print(f"{k:>5} {size:>15.1f} {rate(blobs, args.positions, k, args.level_bits, id_of):>16,.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
