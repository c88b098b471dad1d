"""On-policy sampling's host cost per generated token, before and after the draw moved to the device.

Before: the filtered probabilities [n, V] were copied to the host and each row drew with `multinomial`
from its own generator. After (`dsdistill.rollout.draw`): one uniform per row from the row's generator,
an inverse-CDF draw on the logits' device, and only the n chosen ids come back. On this CPU box the
"device" is the host too, so the time column is the whole sampling step; the bytes column is what crosses
to the host on a GPU. Also the prefill's logits: all prompt positions before, the last one now.

    python bench/rollout_sampling.py [--rows 32] [--vocab 151936] [--tokens 20] [--prompt 512]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsdistill.config import GenerationConfig
from dsdistill.rollout import _filter, draw


def _before(logits, gens, g):
    probs = _filter(logits.float(), g).softmax(-1).cpu()
    return torch.stack([torch.multinomial(probs[i], 1, generator=gens[i]) for i in range(len(gens))]).squeeze(-1)


def _after(logits, gens, g):
    u = torch.cat([torch.rand(1, generator=gen) for gen in gens])
    return draw(logits, u, g).cpu()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=151_936)
    ap.add_argument("--tokens", type=int, default=20)
    ap.add_argument("--prompt", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(1)
    n, v = args.rows, args.vocab
    print(f"{n} rows, V = {v:,}, one thread")
    print("| generation | sampling | ms per token (CPU time, median) | bytes to the host per token |")
    print("|---|---|---:|---:|")
    for label, g in (("temperature 1", GenerationConfig()), ("top_p 0.95 (a sort over V)", GenerationConfig(top_p=0.95))):
        _compare(label, g, n, v, args.tokens)
    print(
        f"prefill logits for a {args.prompt}-token prompt: {n * args.prompt * v * 4 / 2**30:.1f} GiB before (fp32, every "
        f"position), {n * v * 4 / 2**20:.1f} MiB now (`logits_to_keep=1`)"
    )


def _compare(label: str, g: GenerationConfig, n: int, v: int, tokens: int) -> None:
    base = None
    for name, fn, host_bytes in (
        ("before: host copy + multinomial", _before, n * v * 4),
        ("after: draw on the device", _after, n * 8),
    ):
        gens = [torch.Generator().manual_seed(i) for i in range(n)]
        times = []
        for t in range(tokens):
            logits = torch.randn(n, v, generator=torch.Generator().manual_seed(t)) * 3
            t0 = time.process_time()
            fn(logits, gens, g)
            times.append(1000 * (time.process_time() - t0))
        ms = statistics.median(times)
        base = base or ms
        print(f"| {label} | {name} | {ms:.1f} ({ms / base:.2f}x) | {host_bytes:,} |")


if __name__ == "__main__":
    main()
