"""Two ranks under the real DeepSpeed launcher (gloo on CPU): ZeRO-3 teacher and ZeRO-3 student."""

import json
import math
import subprocess
from pathlib import Path

import pytest
import yaml

from dsdistill.demo import launcher_command, launcher_env
from dsdistill.dist import free_port
from dsdistill.schema import METRICS_FILE, EvalRecord, RunStart, TrainRecord, parse_line

PROBE = Path(__file__).with_name("dist_probe.py")
pytestmark = pytest.mark.slow  # two ranks under the real launcher


def launch(config: dict, tmp_path: Path, nprocs: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """`deepspeed --num_gpus N tests/dist_probe.py --config ...`, built the way the demo builds its launch."""
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    cmd = launcher_command(PROBE, cfg_path, nprocs=nprocs, master_port=free_port())
    return subprocess.run(cmd, env=launcher_env(), capture_output=True, text=True, timeout=timeout)


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


def test_two_rank_zero3_teacher_and_student_with_every_component(make_config, tmp_path):
    steps = 10
    cfg = make_config(
        train={"max_steps": steps, "grad_accum": 2, "micro_batch_size": 2},
        optimizer={"lr": 5e-3},
        curriculum={"weights": EVERY_COMPONENT},
        loss={"router": {"conditioned": True}, "attention": {"chunk": 8}},
        checkpoint={"save_final": True},
        deepspeed={
            "student": {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            },
            "teacher": {
                "train_micro_batch_size_per_gpu": "auto",
                "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            },
        },
        eval={"every": 5, "max_batches": 2},
    )
    proc = launch(cfg, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(cfg["output"]["run_dir"])
    probes = [json.loads((run_dir / f"probe-rank{r}.json").read_text()) for r in range(2)]
    for p in probes:
        assert p["world"] == 2
        assert 0 < p["teacher_local"] < p["teacher_total"]  # no rank holds the whole teacher
        assert 0 < p["student_local"] < p["student_total"]
        assert p["global_steps"] == steps and p["micro_steps"] == 2 * steps
        assert p["teacher_grad_params"] == 0 and p["teacher_training_mode"] is False
    assert probes[0]["teacher_local"] + probes[1]["teacher_local"] >= probes[0]["teacher_total"]

    recs = [parse_line(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    assert all(r is not None for r in recs)
    start = recs[0]
    assert isinstance(start, RunStart) and start.world_size == 2 and start.global_batch == 2 * 2 * 2
    assert start.student_zero_stage == 3 and start.teacher_zero_stage == 3
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    assert [t.step for t in trains] == list(range(steps))  # written once, by rank 0
    for t in trains:
        assert set(t.losses) == set(EVERY_COMPONENT) and all(math.isfinite(v) for v in t.losses.values())
        assert t.weights == EVERY_COMPONENT and math.isfinite(t.objective)
        assert len(t.gate_usage) == 3 and abs(sum(t.gate_usage) - 1.0) < 1e-5  # router gates sum to one
    first, last = trains[0], trains[-1]
    assert last.objective < first.objective and last.losses["kd"] < first.losses["kd"]
    assert not [r for r in recs if getattr(r, "code", None) == "step_skipped"]  # every update was applied
    evals = [r for r in recs if isinstance(r, EvalRecord)]
    assert [e.step for e in evals] == [5, 10] and evals[-1].ppl < evals[0].ppl
    assert all(set(e.losses) == set(EVERY_COMPONENT) and all(math.isfinite(v) for v in e.losses.values()) for e in evals)
    # the checkpoint holds the router and projections with the student (consolidated from the ZeRO-3 shards)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(run_dir / "checkpoints"))
    assert state["aux.router.logits"].shape == (2, 3) and "aux.router.cond.weight" in state
    assert state["aux.feature.0.weight"].shape == (64, 32) and "aux.contrastive_teacher.weight" in state
    assert len([k for k in state if k.startswith("aux.layerwise.")]) == 2 and "model.lm_head.weight" in state
    # export consolidates the two ranks' shards into a plain HF model with the engine's logits
    import torch
    from transformers import AutoModelForCausalLM

    from dsdistill.export import export

    probe = torch.load(run_dir / "probe_logits.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(export(run_dir, tmp_path / "exported")).eval()
    with torch.no_grad():
        assert torch.allclose(model(input_ids=probe["ids"]).logits, probe["logits"], atol=1e-5)
    # rank 0 alone prints the log lines
    assert proc.stdout.count("eval @ step 10") == 1


def test_two_rank_zero1_with_every_component(make_config, tmp_path):
    cfg = make_config(
        train={"max_steps": 4, "micro_batch_size": 2},
        curriculum={"weights": EVERY_COMPONENT},
        deepspeed={
            "student": {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "zero_optimization": {"stage": 1},
            }
        },
        loss={"kd": {"divergence": "jsd", "beta": 0.3, "top_k": 8, "top_k_rest": True}, "feature": {"metric": "cosine"}},
        eval={"every": 0, "max_batches": 1},
    )
    proc = launch(cfg, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [parse_line(line) for line in (Path(cfg["output"]["run_dir"]) / METRICS_FILE).read_text().splitlines()]
    assert recs[0].student_zero_stage == 1 and recs[0].world_size == 2
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    assert len(trains) == 4 and all(set(t.losses) == set(EVERY_COMPONENT) for t in trains)
    assert all(math.isfinite(v) for t in trains for v in [*t.losses.values(), *t.weighted.values()])
    assert not [r for r in recs if getattr(r, "code", None) == "step_skipped"]


@pytest.mark.parametrize("method", ["shared_topk", "chunk_likelihood"])
def test_two_rank_zero3_cross_tokenizer_teacher(make_config, tmp_path, tmp_path_factory, method):
    """A byte-level BPE teacher with the word-level student, both ZeRO-3 over two ranks, through the deepspeed
    launcher: the teacher reads its own tokens, no rank holds it whole, and KD (over the paired positions, or
    the chunks between them: there from a Qwen2 teacher into the Llama student) trains."""
    from tests.test_cross_training import _bpe_teacher

    # the second method's teacher is another model family than the student's (Qwen2 into Llama)
    family = "llama" if method == "shared_topk" else "qwen2"
    teacher = _bpe_teacher(tmp_path_factory.mktemp("bpe2"), Path(make_config()["data"]["path"]), steps=20, family=family)
    assert json.loads((teacher / "config.json").read_text())["model_type"] == family
    steps = 4
    zero3 = {"stage": 3, "stage3_param_persistence_threshold": 0}
    cfg = make_config(
        teacher={"path": str(teacher), "cross_tokenizer": {"top_k": 16} if method == "shared_topk" else {"method": method}},
        train={"max_steps": steps, "grad_accum": 2, "micro_batch_size": 2},
        optimizer={"lr": 5e-3},
        curriculum={"weights": {"kd": 0.9, "lm": 0.1}},
        deepspeed={
            "student": {
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
                "train_batch_size": "auto",
                "zero_optimization": zero3,
            },
            "teacher": {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": zero3},
        },
        eval={"every": 4, "max_batches": 2, "at_start": True},
    )
    proc = launch(cfg, tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = Path(cfg["output"]["run_dir"])
    probes = [json.loads((run_dir / f"probe-rank{r}.json").read_text()) for r in range(2)]
    assert all(p["world"] == 2 and 0 < p["teacher_local"] < p["teacher_total"] for p in probes)
    recs = [parse_line(line) for line in (run_dir / METRICS_FILE).read_text().splitlines()]
    start = recs[0]
    assert isinstance(start, RunStart) and start.student_zero_stage == 3 and start.teacher_zero_stage == 3
    trains = [r for r in recs if isinstance(r, TrainRecord)]
    assert [t.step for t in trains] == list(range(steps))
    assert all(math.isfinite(t.losses["kd"]) and t.losses["kd"] > 0 for t in trains)
    evals = [r for r in recs if isinstance(r, EvalRecord)]
    assert [e.step for e in evals] == [0, 4] and evals[-1].losses["kd"] < evals[0].losses["kd"]
    assert "its own tokenizer" in proc.stdout
