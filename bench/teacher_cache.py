"""The offline teacher cache's size and fidelity on trained teachers, and its speed against a live teacher.

    python bench/teacher_cache.py [--steps 400] [--positions 2048] [--skip-speed]

1. A teacher with Qwen's vocabulary size (151,936 token types) trained here on a generated language (Zipf
   unigram frequencies, each word with its own few likely successors, so the teacher has real structure to
   learn), then its distributions on held-out positions through the codec: bytes per token for k in
   {16, 32, 64, 128} and several level precisions, and the fidelity: mean KL(teacher || reconstruction) of
   the exact top-k + rest (the truncation error) and of the decoded cache (truncation + quantisation).
   The reference is DistillKit's recommended setting, about 344 bytes per token at k = 128 for this vocab.
2. The demo's trained teacher (`dsdistill demo` assets; small vocabulary) through `dsdistill teacher-cache`.
3. Speed (same run, same data): optimizer steps/s training from the cache vs with the live teacher, and the
   cache writer's positions/s.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from dsdistill.codec import decode, encode, exact_bytes  # noqa: E402

V = 151_936
DISTILLKIT_K128 = 344


def language(n_tokens: int, seed: int = 0) -> np.ndarray:
    """A token stream: each word's successor is one of its 8 own successors (p = 0.6) or a Zipf draw."""
    rng = np.random.default_rng(seed)
    zipf = 1.0 / np.arange(1, V + 1) ** 1.1
    zipf /= zipf.sum()
    cdf = np.cumsum(zipf)
    succ = np.searchsorted(cdf, rng.random((V, 8)))  # each word's favourite successors, frequent words likelier
    out = np.empty(n_tokens, dtype=np.int64)
    w = 0
    own = rng.random(n_tokens) < 0.6
    pick = rng.integers(0, 8, n_tokens)
    prior = np.searchsorted(cdf, rng.random(n_tokens))
    for i in range(n_tokens):
        w = succ[w, pick[i]] if own[i] else prior[i]
        out[i] = w
    perm = rng.permutation(V)  # token ids are not frequency-ordered (as in a real BPE vocabulary)
    return np.minimum(perm[out], V - 1)


def train_teacher(stream: np.ndarray, steps: int, seq: int = 64, batch: int = 8):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=V,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=seq,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    data = torch.from_numpy(stream[: len(stream) // seq * seq].reshape(-1, seq))
    gen = torch.Generator().manual_seed(0)
    t0 = time.time()
    for step in range(steps):
        x = data[torch.randint(0, data.size(0), (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"  teacher step {step}: loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    return model.eval()


def measure(logp: torch.Tensor, ranks_of: np.ndarray, k: int, level_bits: int) -> dict:
    """Bytes per token and mean KL(teacher || reconstruction) for exact top-k and for the cache."""
    top, ids = logp.topk(k, dim=-1)
    rest = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)
    r = ranks_of[ids.numpy()]
    blob = encode(r, top.numpy(), rest.numpy(), level_bits=level_bits)
    d = decode(blob, logp.size(0), k, level_bits=level_bits)
    order = np.argsort(r, axis=1, kind="stable")
    ids_sorted = torch.from_numpy(np.take_along_axis(ids.numpy(), order, 1))
    full = logp.double()
    p = full.exp()
    tail = (rest.double() - math.log(V - k))[:, None]

    def kl(values):
        recon = tail.expand_as(full).clone()
        recon.scatter_(-1, ids_sorted, values)
        return (p * (full - torch.log_softmax(recon, -1))).sum(-1).mean().item()

    exact = kl(full.gather(-1, ids_sorted))
    cached = kl(torch.from_numpy(d.logp).double())
    return {"bytes": len(blob) / logp.size(0), "kl_exact": exact, "kl_cache": cached, "overhead": (cached - exact) / exact}


def large_vocab(args) -> None:
    print(f"1. a teacher with {V:,} token types, trained here on a generated language", flush=True)
    stream = language(args.tokens)
    split = int(len(stream) * 0.95)
    model = train_teacher(stream[:split], args.steps)
    counts = np.bincount(stream[:split], minlength=V)
    ranks_of = np.empty(V, dtype=np.int64)
    ranks_of[np.argsort(-counts, kind="stable")] = np.arange(V)
    held = torch.from_numpy(stream[split : split + args.positions + 64 * 4][: (args.positions // 64) * 64].reshape(-1, 64))
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=held).logits.float(), -1).reshape(-1, V)[: args.positions]
    p1 = logp.max(-1).values.exp().mean().item()
    print(f"  held-out positions {logp.size(0)}, mean top-1 probability {p1:.3f}")
    print(
        f"  {'k':>4} {'bits':>4} {'bytes/token':>11} {'vs plain':>8} {'vs DistillKit k=128':>19} {'KL exact top-k':>14} {'KL cache':>10} {'quantisation':>12}"
    )
    for k in (16, 32, 64, 128):
        for bits in (4, 5, 6):
            m = measure(logp, ranks_of, k, bits)
            print(
                f"  {k:>4} {bits:>4} {m['bytes']:>11.1f} {m['bytes'] / exact_bytes(1, k):>8.3f} {m['bytes'] / DISTILLKIT_K128:>19.3f}"
                f" {m['kl_exact']:>14.4f} {m['kl_cache']:>10.4f} {m['overhead']:>+12.2%}",
                flush=True,
            )


def demo_and_speed(args) -> None:
    import yaml

    from dsdistill.demo import default_cache, demo_config, ensure_assets

    print("2. the demo's trained teacher through dsdistill teacher-cache; 3. speed", flush=True)
    paths = ensure_assets(default_cache(), log=lambda m: print("  " + m, flush=True))
    work = Path(tempfile.mkdtemp(prefix="cache-bench-"))
    cfg = demo_config(paths, work / "live", steps=args.train_steps)
    cfg["eval"] = {"every": 0, "at_start": False, "max_batches": 2}
    cfg["checkpoint"] = {"save_final": False}
    cfg["train"]["precision"] = "fp32"
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)

    def run(argv):
        t0 = time.perf_counter()
        p = subprocess.run([sys.executable, "-m", "dsdistill", *argv], capture_output=True, text=True, env=env)
        if p.returncode:
            raise SystemExit(p.stderr[-3000:])
        return time.perf_counter() - t0, p.stdout

    base = work / "run.yaml"
    base.write_text(yaml.safe_dump(cfg))
    for k in (16, 32, 64):
        t, out = run(["teacher-cache", "--config", str(base), "--out", str(work / f"cache-{k}"), "--top-k", str(k)])
        m = json.loads((work / f"cache-{k}" / "manifest.json").read_text())
        f = m["fidelity"]
        print(
            f"  k={k}: {m['bytes_per_token']:.1f} bytes/token (plain {m['plain_bytes_per_token']}), KL exact top-k {f['kl_top_k_exact']:.4f},"
            f" cache {f['kl_cache']:.4f} ({f['quantisation_overhead']:+.2%}); {m['tokens']:,} positions in {t:.0f}s"
            f" ({m['tokens'] / t:,.0f} positions/s including start-up)",
            flush=True,
        )

    def steps_per_s(c, name):
        path = work / f"{name}.yaml"
        path.write_text(yaml.safe_dump(c))
        run(["train", "--config", str(path)])
        recs = [json.loads(line) for line in (Path(c["output"]["run_dir"]) / "metrics.jsonl").read_text().splitlines()]
        trains = [r for r in recs if r["kind"] == "train"]
        waits = [r["teacher_wait"] for r in trains[1:] if r.get("teacher_wait") is not None]
        rate = float(np.median([r["tokens_per_s"] for r in trains[1:]])) / (
            cfg["train"]["micro_batch_size"] * cfg["train"]["grad_accum"] * cfg["train"]["seq_len"]
        )
        return rate, (float(np.median(waits)) if waits else None)

    live = dict(cfg, loss={"kd": {"top_k": 64, "top_k_rest": True}}, curriculum={"weights": {"kd": 1.0, "lm": 0.5}})
    live["output"] = {"run_dir": str(work / "live"), "log_every": 5}
    cached = dict(live, teacher={"cache": str(work / "cache-64")}, loss={})
    cached["output"] = {"run_dir": str(work / "cached"), "log_every": 5}
    (a, _), (b, wait) = steps_per_s(live, "live"), steps_per_s(cached, "cached")
    print(
        f"  optimizer steps/s, kd + lm, single process: live teacher (top-64 + rest) {a:.2f}, from the cache {b:.2f} ({b / a:.2f}x)"
    )
    print(f"  share of a cache-fed step its training thread spent getting the cache's rows (median): {wait:.2%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=1_000_000, help="generated training tokens for the large-vocabulary teacher")
    ap.add_argument("--steps", type=int, default=300, help="its training steps")
    ap.add_argument("--positions", type=int, default=1024, help="held-out positions measured")
    ap.add_argument("--train-steps", type=int, default=60, help="optimizer steps of the speed runs")
    ap.add_argument("--skip-large", action="store_true")
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    if not args.skip_large:
        large_vocab(args)
    if not args.skip_speed:
        demo_and_speed(args)


if __name__ == "__main__":
    main()
