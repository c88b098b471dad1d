"""A run directory is data: nothing in it may run code, point outside it, or be silently reinterpreted.

Every case starts from a real 2-step run's directory and tampers with it the way a careless copy, a
shared file system or a hostile colleague would; the resume or export must refuse in one line, run
nothing, and leave every file as it was.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsdistill import checkpoint
from dsdistill.config import validate
from dsdistill.errors import DistillError
from dsdistill.export import export
from dsdistill.train import train


def _train(cfg: dict):
    with contextlib.redirect_stdout(io.StringIO()):
        return train(validate(cfg))


@pytest.fixture(scope="module")
def finished(assets, tmp_path_factory):
    """A 2-step run with one checkpoint (step2), trained once for the whole module."""
    root = tmp_path_factory.mktemp("finished")
    cfg = {
        "teacher": {"path": str(assets["teacher"])},
        "student": {"path": str(assets["student"])},
        "data": {"path": str(assets["corpus"]), "eval_fraction": 0.1},
        "train": {"max_steps": 2, "micro_batch_size": 4, "seq_len": 32, "precision": "fp32"},
        "eval": {"every": 0, "max_batches": 1, "at_start": False},
        "output": {"run_dir": str(root / "run"), "log_every": 1},
    }
    _train(cfg)
    return cfg, root / "run"


@pytest.fixture
def run_copy(finished, tmp_path):
    """A private copy of the finished run (config pointing at it) and a snapshot of its bytes."""
    cfg, src = finished
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    cfg = {**cfg, "output": {**cfg["output"], "run_dir": str(dst)}, "train": {**cfg["train"], "max_steps": 4}}
    return cfg, dst


def _snapshot(run_dir: Path, skip=("metrics.jsonl",)) -> dict:
    return {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name not in skip}


class Payload:
    """Pickles to a call of os.system: loading it with plain pickle would run the command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant(run_dir: Path, marker: Path) -> Path:
    states = next((checkpoint.checkpoint_dir(run_dir) / "step2").glob("mp_rank_*_model_states.pt"))
    data = torch.load(states, weights_only=False)  # our own file, written by the fixture above
    data["planted"] = Payload(marker)
    torch.save(data, states)
    return states


def test_a_planted_pickle_payload_runs_nothing_on_resume(run_copy, tmp_path):
    cfg, run_dir = run_copy
    marker = tmp_path / "PWNED"
    _plant(run_dir, marker)
    before = _snapshot(run_dir)
    with pytest.raises(DistillError) as e:
        _train(cfg)
    msg = str(e.value)
    assert not marker.exists()
    assert msg.startswith(f"checkpoint: '{checkpoint.checkpoint_dir(run_dir) / 'step2'}' holds an object that is not plain data")
    assert "system" in msg and "\n" not in msg
    assert _snapshot(run_dir) == before


def test_a_planted_pickle_payload_runs_nothing_on_export(run_copy, tmp_path):
    _, run_dir = run_copy
    marker = tmp_path / "PWNED"
    _plant(run_dir, marker)
    proc = subprocess.run(
        [sys.executable, "-m", "dsdistill", "export", str(run_dir), "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
    )
    assert not marker.exists()
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "holds an object that is not plain data" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_export_tag_cannot_leave_the_runs_checkpoints(run_copy, finished, tmp_path):
    _, run_dir = run_copy
    other = Path(finished[1]).resolve()
    rel = os.path.relpath(checkpoint.checkpoint_dir(other) / "step2", checkpoint.checkpoint_dir(run_dir))
    for tag in (rel, "../../x", "/etc", "step2/../../..", "latest"):
        with pytest.raises(DistillError, match=r"^export --tag: '.*' is not a checkpoint tag; expected stepN, one of: step2$"):
            export(run_dir, tmp_path / "out", tag=tag)


def test_latest_pointing_outside_is_refused_and_nothing_is_overwritten(run_copy):
    cfg, run_dir = run_copy
    (checkpoint.checkpoint_dir(run_dir) / "latest").write_text("../../../elsewhere/step2")
    before = _snapshot(run_dir)
    with pytest.raises(
        DistillError, match=r"names '../../../elsewhere/step2', which is not a checkpoint .* \(checkpoints: step2\)"
    ):
        _train(cfg)
    assert _snapshot(run_dir) == before


@pytest.mark.parametrize("damage", ["garbage", "dangling", "deleted"])
def test_a_damaged_latest_never_restarts_from_step_0(run_copy, damage):
    cfg, run_dir = run_copy
    latest = checkpoint.checkpoint_dir(run_dir) / "latest"
    if damage == "garbage":
        latest.write_bytes(b"\x00\xff\xfe garbage")
    elif damage == "dangling":
        latest.write_text("step9")
    else:
        latest.unlink()
    before = _snapshot(run_dir)
    with pytest.raises(DistillError) as e:
        _train(cfg)
    msg = str(e.value)
    assert msg.startswith("checkpoint: ") and "checkpoints: step2" in msg or "holds checkpoints (step2)" in msg
    assert "checkpoint.resume_tag=stepN" in msg and "\n" not in msg
    assert _snapshot(run_dir) == before


def test_resume_tag_picks_a_checkpoint_when_latest_is_gone(run_copy):
    cfg, run_dir = run_copy
    (checkpoint.checkpoint_dir(run_dir) / "latest").unlink()
    summary = _train({**cfg, "checkpoint": {"resume_tag": "step2", "save_final": False}})
    assert summary.steps == 4


def test_an_empty_checkpoint_directory_is_a_one_line_error(run_copy, tmp_path):
    cfg, run_dir = run_copy
    step2 = checkpoint.checkpoint_dir(run_dir) / "step2"
    for p in step2.iterdir():
        if p.is_file():
            p.unlink()
        else:
            shutil.rmtree(p)
    with pytest.raises(DistillError, match=r"step2' holds no model states \(an empty or incomplete checkpoint\)"):
        _train(cfg)
    with pytest.raises(DistillError, match=r"step2' holds no model states"):
        export(run_dir, tmp_path / "out")


@pytest.mark.parametrize(
    "change, field",
    [
        ({"train": {"micro_batch_size": 2}}, "train.micro_batch_size=4"),
        ({"train": {"seq_len": 16}}, "train.seq_len=32"),
        ({"train": {"seed": 5}}, "train.seed=0"),
        ({"data": {"max_documents": 300}}, "data="),
    ],
)
def test_resuming_with_another_batch_shape_or_data_is_refused(run_copy, change, field):
    cfg, run_dir = run_copy
    for section, values in change.items():
        cfg = {**cfg, section: {**cfg[section], **values}}
    before = _snapshot(run_dir)
    with pytest.raises(DistillError) as e:
        _train(cfg)
    msg = str(e.value)
    assert f"was written with {field}" in msg and "its data position would mean other sequences" in msg
    assert _snapshot(run_dir) == before


def test_orphaned_partial_saves_are_cleaned_at_the_next_save(run_copy):
    cfg, run_dir = run_copy
    orphan = checkpoint.checkpoint_dir(run_dir) / ".step1.partial"
    orphan.mkdir()
    (orphan / "junk.pt").write_bytes(b"x" * 100)
    _train({**cfg, "checkpoint": {"save_final": True}})
    assert not orphan.exists() and checkpoint.latest_tag(run_dir) == "step4"


def test_export_ignores_trust_remote_code_from_the_run_directory(run_copy, assets, tmp_path):
    """config.yaml may say trust_remote_code: true and point at a model shipping code; only the command
    line can allow that code to run (the control export with the flag shows the code would run)."""
    import json

    import yaml

    _, run_dir = run_copy
    student = tmp_path / "student-with-code"
    shutil.copytree(assets["student"], student)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (student / "remote_cfg.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
        "from transformers import LlamaConfig\n\nclass RemoteConfig(LlamaConfig):\n    model_type = 'llama'\n"
    )
    conf = json.loads((student / "config.json").read_text())
    conf["auto_map"] = {"AutoConfig": "remote_cfg.RemoteConfig"}
    (student / "config.json").write_text(json.dumps(conf))
    run_conf = yaml.safe_load((run_dir / "config.yaml").read_text())
    run_conf["student"].update(path=str(student), trust_remote_code=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(run_conf))

    export(run_dir, tmp_path / "out")
    assert not marker.exists()
    with contextlib.suppress(Exception):  # the toy config class is not a full model; its import is what counts
        export(run_dir, tmp_path / "out-trusted", trust_remote_code=True)
    assert marker.exists()
