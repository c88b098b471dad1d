"""Distillation step benchmark: naive HF full-vocab KD vs Liger's fused-linear JSD vs dsdistill.

    python -m dsdistill.bench --preset cpu-tiny                      # smoke test (CI)
    python -m dsdistill.bench --preset cpu-bf16                      # the bf16 path on CPU
    python -m dsdistill.bench --preset gpu-qwen --peak-tflops 989   # one H100: Qwen2.5-1.5B -> 0.5B shapes
    python -m dsdistill.bench --preset gpu-qwen --tokens-per-step 16384

Every method runs in its own subprocess (so peak memory is its own) on the same randomly initialised
models, saved once with `save_pretrained`, and the same batch shape. It prints tokens/s, peak memory,
MFU = (2 x teacher matmul params + 6 x student matmul params) x tokens/s / peak FLOP/s, and ratios
against the naive step measured in the same run; `--out` writes them as JSON.

On a GPU tokens/s is wall-clock. On CPU every worker runs one thread and tokens/s is per CPU-second of
the process (`time.process_time`), the best of the timed steps: wall-clock on a shared CPU measures the
machine's load (two workers' OpenMP threads on two cores made the fused path look 2.1-2.65x faster
than naive where its CPU time was 1.42-1.51x).

- naive: HF forward of both models (full [tokens, vocab] logits), forward KL at T + LM cross-entropy,
  backward, AdamW step; plain PyTorch.
- liger: the same models; student and teacher stop at their final hidden states and
  `LigerFusedLinearJSDLoss` (beta 0 = forward KL) + cross-entropy run fused; only when liger-kernel imports.
- dsdistill: the real product path -- `dsdistill.train.train` with both DeepSpeed engines (teacher ZeRO-3,
  student ZeRO-2), fused chunked KD+LM, curriculum kd 0.7 / lm 0.3; throughput from its metrics stream.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

PRESETS = {
    "cpu-tiny": {
        "teacher": dict(hidden=128, layers=4, heads=4, kv=2, inter=256),
        "student": dict(hidden=64, layers=2, heads=2, kv=1, inter=128),
        "vocab": 4096,
        "seq": 128,
        "tokens_per_step": 512,
        "steps": 3,
        "warmup": 1,
        "dtype": "fp32",
        "tie": False,
    },
    "cpu-vocab": {  # a vocabulary large enough that logits dominate memory, still CPU-sized
        "teacher": dict(hidden=256, layers=4, heads=4, kv=2, inter=512),
        "student": dict(hidden=128, layers=2, heads=2, kv=1, inter=256),
        "vocab": 32000,
        "seq": 512,
        "tokens_per_step": 4096,
        "steps": 2,
        "warmup": 1,
        "dtype": "fp32",
        "tie": False,
    },
    "cpu-bf16": {  # the GPU preset's dtype path (bf16 models, bf16 GEMMs) at a CPU size: checks the fused path's casts
        "teacher": dict(hidden=256, layers=4, heads=4, kv=2, inter=512),
        "student": dict(hidden=128, layers=2, heads=2, kv=1, inter=256),
        "vocab": 32000,
        "seq": 256,
        "tokens_per_step": 2048,
        "steps": 2,
        "warmup": 1,
        "dtype": "bf16",
        "tie": False,
    },
    "gpu-qwen": {  # Qwen2.5-1.5B teacher, Qwen2.5-0.5B student shapes (random weights)
        "teacher": dict(hidden=1536, layers=28, heads=12, kv=2, inter=8960),
        "student": dict(hidden=896, layers=24, heads=14, kv=2, inter=4864),
        "vocab": 151936,
        "seq": 2048,
        "tokens_per_step": 8192,
        "steps": 8,
        "warmup": 2,
        "dtype": "bf16",
        "tie": True,
    },
}
TEMPERATURE = 2.0


def _config(spec, vocab, seq, tie):
    """Qwen2-shaped: a Llama config with biases on q/k/v is the same architecture (and FLOPs); it also keeps
    AutoTokenizer on the generated word-level tokenizer instead of Qwen's BPE class."""
    from transformers import LlamaConfig

    return LlamaConfig(
        attention_bias=True,
        vocab_size=vocab,
        hidden_size=spec["hidden"],
        intermediate_size=spec["inter"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=spec["heads"],
        num_key_value_heads=spec["kv"],
        max_position_embeddings=max(seq, 512),
        tie_word_embeddings=tie,
        eos_token_id=1,
        bos_token_id=None,
        pad_token_id=2,
    )


def prepare(root: Path, preset: dict) -> None:
    """Random models, a synthetic word-level tokenizer covering the vocab, and a corpus file."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    vocab = preset["vocab"]
    words = {"<unk>": 0, "<eos>": 1, "<pad>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<pad>")
    for name in ("teacher", "student"):
        torch.manual_seed(0 if name == "teacher" else 1)
        with torch.device("cpu"):
            model = AutoModelForCausalLM.from_config(_config(preset[name], vocab, preset["seq"], preset["tie"]))
        model.save_pretrained(root / name)
        fast.save_pretrained(root / name)
    rng = torch.Generator().manual_seed(0)
    n_tokens = preset["tokens_per_step"] * (preset["steps"] + preset["warmup"] + 4) + preset["seq"] * 8
    ids = torch.randint(3, vocab, (n_tokens,), generator=rng).tolist()
    with open(root / "corpus.jsonl", "w") as fh:
        for i in range(0, len(ids), 1000):
            fh.write(json.dumps({"text": " ".join(f"w{t}" for t in ids[i : i + 1000])}) + "\n")


def matmul_params(model) -> int:
    import torch

    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def _peak_bytes(device) -> int:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _load(root: Path, name: str, device, dtype):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(root / name, dtype=dtype, attn_implementation="sdpa").to(device)


def _clock(device) -> Callable[[], float]:
    """Wall-clock on a GPU; the process's CPU time on CPU (one thread: see the module docstring)."""
    if device.type == "cuda":
        return time.perf_counter
    import torch

    torch.set_num_threads(1)
    return time.process_time


def _timed(step: Callable[[], float], steps: int, device, tokens: int) -> tuple[float, float]:
    """(tokens per second, last loss) over `steps` calls: all of them on a GPU (synchronised), the best
    single step on CPU (CPU time is exact per step; the best one is the least disturbed)."""
    import torch

    clock = _clock(device)
    times, last = [], float("nan")
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = clock()
        for _ in range(steps):
            last = step()
        torch.cuda.synchronize()
        return steps * tokens / (clock() - start), last
    for _ in range(steps):
        t0 = clock()
        last = step()
        times.append(clock() - t0)
    return tokens / min(times), last


def worker_plain(root: Path, preset: dict, method: str) -> dict:
    """naive or liger: a plain PyTorch distillation step on the saved models."""
    import torch
    import torch.nn.functional as F

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if preset["dtype"] == "bf16" else torch.float32
    teacher = _load(root, "teacher", device, dtype).eval().requires_grad_(False)
    student = _load(root, "student", device, dtype).train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    micro = preset["tokens_per_step"] // preset["seq"]
    g = torch.Generator().manual_seed(0)
    vocab = preset["vocab"]
    if method == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSDLoss

        jsd = LigerFusedLinearJSDLoss(jsd_beta=0.0, temperature=TEMPERATURE)

    def step():
        ids = torch.randint(3, vocab, (micro, preset["seq"]), generator=g).to(device)
        labels = ids[:, 1:].reshape(-1)
        with torch.no_grad():
            t_out = teacher.model(input_ids=ids) if method == "liger" else teacher(input_ids=ids)
        if method == "naive":
            s_logits = student(input_ids=ids).logits[:, :-1].float() / TEMPERATURE
            t_logits = t_out.logits[:, :-1].float() / TEMPERATURE
            s_lp = torch.log_softmax(s_logits.reshape(-1, vocab), -1)
            t_lp = torch.log_softmax(t_logits.reshape(-1, vocab), -1)
            kd = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean() * TEMPERATURE**2
            lm = F.cross_entropy(s_logits.reshape(-1, vocab) * TEMPERATURE, labels)
            loss = 0.7 * kd + 0.3 * lm
        else:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            s_h = student.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, student.config.hidden_size)
            t_h = t_out.last_hidden_state[:, :-1].reshape(-1, teacher.config.hidden_size)
            kd = jsd(s_h, student.lm_head.weight, t_h, teacher.lm_head.weight, labels)
            lm = LigerFusedLinearCrossEntropyLoss()(student.lm_head.weight, s_h, labels)
            loss = 0.7 * kd + 0.3 * lm
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    _clock(device)  # one thread on CPU, also for the warm-up
    for _ in range(preset["warmup"]):
        step()
    tps, last = _timed(step, preset["steps"], device, preset["tokens_per_step"])
    return {
        "tokens_per_s": tps,
        "peak_bytes": _peak_bytes(device),
        "teacher_matmul_params": matmul_params(teacher),
        "student_matmul_params": matmul_params(student),
        "last_loss": last,
    }


def worker_dsdistill(root: Path, preset: dict, *, compiled: bool = False) -> dict:
    """The product path: dsdistill.train.train with both DeepSpeed engines, fused KD+LM (`compiled`: with
    `loss.fused_compile`; the warm-up step pays the compile)."""
    import contextlib
    import io

    import torch

    from dsdistill.config import validate
    from dsdistill.train import open_session

    micro = preset["tokens_per_step"] // preset["seq"]
    total = preset["steps"] + preset["warmup"]
    cfg = validate(
        {
            "teacher": {"path": str(root / "teacher")},
            "student": {"path": str(root / "student")},
            "data": {"path": str(root / "corpus.jsonl"), "eval_path": str(root / "corpus.jsonl")},  # eval is not timed
            "curriculum": {"weights": {"kd": 0.7, "lm": 0.3}, "temperature": TEMPERATURE},
            "train": {"max_steps": total, "micro_batch_size": micro, "seq_len": preset["seq"], "precision": preset["dtype"]},
            "optimizer": {"lr": 1e-4},
            "loss": {"fused_compile": compiled},
            "eval": {"every": 0, "max_batches": 1, "at_start": False},
            "output": {"run_dir": str(root / "run"), "log_every": 1},
            "checkpoint": {"save_final": False, "resume": "never"},
        }
    )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    _clock(device)  # one thread on CPU, before the engines start
    with contextlib.redirect_stdout(io.StringIO()), open_session(cfg) as session:
        # the product's step (`Trainer.step`: both engines, the curriculum, the fused head, the reduction),
        # timed like the plain methods' steps
        batches = iter(session.data.stream)

        def step() -> float:
            return session.trainer.step([next(batches)], stop_requested=False).objective

        for _ in range(preset["warmup"]):
            step()
        tps, last = _timed(step, preset["steps"], device, preset["tokens_per_step"])
        plan = session.plan
    from dsdistill.models import count_params

    return {
        "tokens_per_s": tps,
        "peak_bytes": _peak_bytes(device),
        "teacher_matmul_params": _matmul_from_config(plan.teacher_config, count_params),
        "student_matmul_params": _matmul_from_config(plan.student_config, count_params),
        "last_loss": last,
    }


def _matmul_from_config(config, count_params) -> int:
    """Linear-layer parameters (embeddings excluded; a tied lm_head counted as a matmul)."""
    emb = config.vocab_size * config.hidden_size
    total = count_params(config)
    return total - emb + (emb if config.tie_word_embeddings else 0)


def run_worker(method: str, root: Path, preset_name: str, timeout: int) -> dict:
    cmd = [sys.executable, "-m", "dsdistill.bench", "--preset", preset_name, "--worker", method, "--root", str(root)]
    from dsdistill.dist import without_world_env

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=without_world_env(dict(os.environ)))
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        oom = "out of memory" in proc.stderr.lower()
        return {"error": "out of memory" if oom else " | ".join(tail)[-300:]}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dsdistill.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu-tiny")
    ap.add_argument("--tokens-per-step", type=int, default=None, help="tokens per optimizer step (default: the preset's)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default: the preset's)")
    ap.add_argument(
        "--peak-tflops", type=float, default=None, help="peak FLOP/s of the device in TFLOP/s, for MFU (e.g. 989 for H100 bf16)"
    )
    ap.add_argument(
        "--methods",
        default="naive,liger,dsdistill",
        help="comma-separated subset (also: dsdistill-compiled, with loss.fused_compile)",
    )
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    preset = dict(PRESETS[args.preset])
    if args.tokens_per_step:
        preset["tokens_per_step"] = args.tokens_per_step
    if args.steps:
        preset["steps"] = args.steps
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    if args.worker:
        root = Path(args.root)
        if args.worker.startswith("dsdistill"):
            result = worker_dsdistill(root, preset, compiled=args.worker == "dsdistill-compiled")
        else:
            result = worker_plain(root, preset, args.worker)
        print(json.dumps(result))
        return 0

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if "liger" in methods:
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            methods.remove("liger")
            print("liger-kernel is not importable here: its column is skipped")
    results = {}
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        prepare(root, preset)
        for m in methods:
            results[m] = run_worker(m, root, args.preset, args.timeout)
    rows = _rows(results, args.peak_tflops)
    report = {
        "preset": args.preset,
        "tokens_per_step": preset["tokens_per_step"],
        "seq_len": preset["seq"],
        "vocab": preset["vocab"],
        "dtype": preset["dtype"],
        "peak_tflops": args.peak_tflops,
        "results": rows,
        "memory_note": "peak GPU memory allocated" if "cuda" in str(_device_name()) else "peak process RSS (CPU)",
        "rate_note": "wall-clock tokens/s" if _device_name() == "cuda" else "tokens per CPU-second, one thread, best step",
    }
    rate = "tokens/s" if _device_name() == "cuda" else "tok/CPU-s"
    print(f"{'method':<10} {rate:>12} {'peak GiB':>9} {'MFU':>7} {'speed/naive':>12} {'mem/naive':>10}")
    for row in rows:
        if "error" in row:
            print(f"{row['method']:<10} error: {row['error']}")
            continue
        mfu = f"{row['mfu']:.3f}" if row["mfu"] is not None else "-"
        print(
            f"{row['method']:<10} {row['tokens_per_s']:>12,.0f} {row['peak_gib']:>9.3f} {mfu:>7} "
            f"{row.get('speed_vs_naive', '-'):>12} {row.get('memory_vs_naive', '-'):>10}"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def _rows(results: dict[str, dict], peak_tflops) -> list[dict]:
    """One row per method, with its speed and memory as ratios to the naive baseline of the same run."""
    base = results.get("naive", {})
    rows = []
    for m, r in results.items():
        if "error" in r:
            rows.append({"method": m, "error": r["error"]})
            continue
        flops = (2 * r["teacher_matmul_params"] + 6 * r["student_matmul_params"]) * r["tokens_per_s"]
        row = {
            "method": m,
            "tokens_per_s": round(r["tokens_per_s"], 1),
            "peak_gib": round(r["peak_bytes"] / 2**30, 3),
            "mfu": round(flops / (peak_tflops * 1e12), 4) if peak_tflops else None,
        }
        if "tokens_per_s" in base:
            row["speed_vs_naive"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3)
            row["memory_vs_naive"] = round(r["peak_bytes"] / base["peak_bytes"], 3)
        rows.append(row)
    return rows


def _device_name() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


if __name__ == "__main__":
    sys.exit(main())
