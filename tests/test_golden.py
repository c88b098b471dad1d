"""Golden traces: the numbers of three 2-rank runs, recorded before the trainer core was redesigned, must
not move (per-step objective, every component, grad norm, LR, eval records, and a checksum of every
trained weight, aux modules included).

The runs go through the real launcher (`deepspeed --num_gpus 2 dsdistill/train.py`) and the checksum is
taken from the final checkpoint with DeepSpeed's own consolidation, so nothing here depends on the
trainer's internals. To record anew (only when a change of numbers is intended and explained):
`DSDISTILL_RECORD_GOLDEN=1 pytest tests/test_golden.py`.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path

import pytest
import yaml

from dsdistill.demo import launcher_command, launcher_env
from dsdistill.dist import free_port
from dsdistill.schema import METRICS_FILE, EvalRecord, TrainRecord, parse_line

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).with_name("data") / "golden"
RECORD = os.environ.get("DSDISTILL_RECORD_GOLDEN") == "1"
pytestmark = pytest.mark.slow

EVERY_COMPONENT = {
    "kd": 0.7,
    "lm": 0.3,
    "feature": 0.05,
    "attention": 0.5,
    "layerwise": 0.05,
    "contrastive": 0.05,
    "routing_feature": 0.05,
    "routing_load_balance": 0.01,
    "routing_attention_alignment": 0.5,
}
ZERO2 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "zero_optimization": {"stage": 2},
}
ZERO3 = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
}
CASES = {
    "every_component_fused_zero2": ({"fused_logits": True}, ZERO2),
    "every_component_unfused_zero2": ({"fused_logits": False}, ZERO2),
    "every_component_fused_zero3": ({"fused_logits": True}, ZERO3),
}


def _config(make_config, loss: dict, student_ds: dict) -> dict:
    return make_config(
        train={"max_steps": 4, "grad_accum": 2, "micro_batch_size": 2},
        optimizer={"lr": 5e-3},
        curriculum={"weights": EVERY_COMPONENT, "temperature": 2.0},
        loss={"router": {"conditioned": True}, "attention": {"chunk": 8}, **loss},
        checkpoint={"save_final": True},
        deepspeed={"student": student_ds},
        eval={"every": 2, "max_batches": 2},
    )


def _trace(run_dir: Path) -> dict:
    recs = [parse_line(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    train = [
        {
            "step": r.step,
            "objective": r.objective,
            "losses": r.losses,
            "grad_norm": r.grad_norm,
            "lr": r.lr,
            "temperature": r.temperature,
            "kd_kl": r.metrics.get("kd_kl"),
        }
        for r in recs
        if isinstance(r, TrainRecord)
    ]
    evals = [
        {
            "step": r.step,
            "objective": r.objective,
            "losses": r.losses,
            "lm_ce": r.lm_ce,
            "ppl": r.ppl,
            "teacher_ppl": r.teacher_ppl,
            "tokens": r.tokens,
        }
        for r in recs
        if isinstance(r, EvalRecord)
    ]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"))
    weights = {k: [float(v.detach().double().sum()), float(v.detach().double().square().sum())] for k, v in sorted(state.items())}
    return {"train": train, "eval": evals, "weights": weights}


def _close(a, b, path: str) -> None:
    if isinstance(a, dict):
        assert set(a) == set(b), f"{path}: keys {sorted(a)} != {sorted(b)}"
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), f"{path}: {len(a)} entries, expected {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), f"{path}: {a!r} != golden {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != golden {b!r}"


@pytest.mark.parametrize("case", sorted(CASES))
def test_numbers_match_the_golden_trace(make_config, tmp_path, case):
    loss, student_ds = CASES[case]
    cfg = _config(make_config, loss, student_ds)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = launcher_command(ROOT / "dsdistill" / "train.py", path, nprocs=2, master_port=free_port())
    proc = subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = _trace(Path(cfg["output"]["run_dir"]))
    assert len(got["train"]) == 4 and len(got["eval"]) == 2
    golden = GOLDEN / f"{case}.json"
    if RECORD:
        golden.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    assert golden.exists(), f"{golden} is missing: record it with DSDISTILL_RECORD_GOLDEN=1 (see this file's docstring)"
    _close(got, json.loads(golden.read_text()), case)
