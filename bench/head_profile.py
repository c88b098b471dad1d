"""One step of the distillation head alone, profiled: naive full-logit KD + LM against dsdistill's fused head
(eager, and compiled where the device compiles), at the GPU preset's shapes or smaller.

    python bench/head_profile.py                              # gpu-qwen shapes on CUDA (8,192 positions)
    python bench/head_profile.py --rows 512 --vocab 32000     # a CPU-sized smoke run

For each method: time per forward + backward (CUDA events on a GPU, CPU time elsewhere; best of --repeat),
the peak memory it added, and the profiler's top kernels by device time. The GEMMs are the same in every
method; what differs is everything between them (see bench/traffic.py for the bytes).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsdistill.losses.fused import KDOptions, fused_kd_lm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from traffic import naive as traffic_naive  # noqa: E402 - bench/ is the script's own folder

T = 2.0


def naive(sh, sw, th, tw, lab):
    return traffic_naive(sh, sw, th, tw, lab, T)  # the same naive step as bench/traffic.py's


def fused(compile_: bool, chunk: int):
    def run(sh, sw, th, tw, lab):
        opts = KDOptions(temperature=T, chunk=chunk, compile=compile_)
        n = lab[:, 1:].numel()
        combined, _ = fused_kd_lm(sh, sw, th, tw, lab, coef_kd=0.7 / n, coef_lm=0.3 / n, options=opts)
        return combined

    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--s-width", type=int, default=896)
    ap.add_argument("--t-width", type=int, default=1536)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--top", type=int, default=8)
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16
    if not cuda:
        torch.set_num_threads(1)
    g = torch.Generator(device=dev).manual_seed(0)
    b, s = 2, args.rows // 2 + 1
    mk = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)  # noqa: E731
    sh = mk(b, s, args.s_width, scale=1 / math.sqrt(args.s_width)).requires_grad_(True)
    sw = mk(args.vocab, args.s_width, scale=2.0).requires_grad_(True)
    th, tw = mk(b, s, args.t_width, scale=1 / math.sqrt(args.t_width)), mk(args.vocab, args.t_width, scale=2.0)
    lab = torch.randint(0, args.vocab, (b, s), generator=g, device=dev)
    methods = {"naive": naive, "fused": fused(False, args.chunk)}
    if cuda:
        methods["fused, compiled"] = fused(True, args.chunk)
    print(
        f"head only, {args.rows} positions, V = {args.vocab:,}, widths {args.s_width}/{args.t_width}, bf16, T = {T:g}, on {dev}"
    )
    print(f"{'method':<16} {'ms/step':>9} {'x naive':>8} {'peak MiB':>9}")
    base = None
    tables = {}
    for name, fn in methods.items():
        best = float("inf")
        for i in range(args.repeat + 1):  # the first is a warm-up (and the compile)
            sh.grad = sw.grad = None
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
            t0 = time.process_time()
            fn(sh, sw, th, tw, lab).backward()
            if cuda:
                end.record()
                torch.cuda.synchronize()
                ms = start.elapsed_time(end)
                peak = (torch.cuda.max_memory_allocated() - before) / 2**20
            else:
                ms, peak = (time.process_time() - t0) * 1e3, float("nan")
            if i:
                best = min(best, ms)
        base = base or best
        print(f"{name:<16} {best:>9.1f} {base / best:>7.2f}x {peak:>9.0f}")
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            sh.grad = sw.grad = None
            fn(sh, sw, th, tw, lab).backward()
            if cuda:
                torch.cuda.synchronize()
        tables[name] = prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=args.top
        )
    for name, table in tables.items():
        print(f"\n-- {name}: top {args.top} ops by self time\n{table}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
