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
from dsdistill.rundir import RunLock, record_checksums
from dsdistill.train import train

ZERO = {"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", "train_batch_size": "auto"}
"""A student DeepSpeed config with the batch sizes filled from run.yaml; tests add the ZeRO stage."""


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


def _snapshot(run_dir: Path, skip=("metrics.jsonl", ".lock")) -> dict:
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
    record_checksums(states.parent)  # as an attacker would: the unpickling guard is what must hold
    return states


@pytest.mark.parametrize("stage", [2, 3], ids=["same-layout", "carried-into-zero3"])
def test_a_planted_pickle_payload_runs_nothing_on_resume(run_copy, tmp_path, stage):
    """DeepSpeed's own load, and the carry into another layout (`dsdistill.carry`), read the same files."""
    cfg, run_dir = run_copy
    marker = tmp_path / "PWNED"
    _plant(run_dir, marker)
    before = _snapshot(run_dir)
    with pytest.raises(DistillError) as e:
        _train({**cfg, "deepspeed": {"student": {**ZERO, "zero_optimization": {"stage": stage}}}})
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


# ---------------------------------------------------------------------------------------------- links


def _outside(tmp_path: Path) -> Path:
    target = tmp_path / "elsewhere" / "precious.txt"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text("precious\n")
    return target


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.yaml"])
def test_a_linked_run_file_is_refused_and_its_target_untouched(run_copy, tmp_path, name):
    cfg, run_dir = run_copy
    target = _outside(tmp_path)
    (run_dir / name).unlink()
    (run_dir / name).symlink_to(target)
    with pytest.raises(DistillError, match=rf"^output.run_dir: '{run_dir / name}' is a symbolic link; dsdistill writes"):
        _train(cfg)
    assert target.read_text() == "precious\n"


def test_planted_temp_links_are_replaced_not_written_through(run_copy, tmp_path):
    """The temp files dsdistill renames into place (`.latest.tmp.PID`, `.config.yaml.tmp.PID`): a link planted
    under that name is removed, never written through."""
    cfg, run_dir = run_copy
    target = _outside(tmp_path)
    pid = os.getpid()
    for planted in (checkpoint.checkpoint_dir(run_dir) / f".latest.tmp.{pid}", run_dir / f".config.yaml.tmp.{pid}"):
        planted.symlink_to(target)
    _train(cfg)
    assert target.read_text() == "precious\n"
    assert checkpoint.latest_tag(run_dir) == "step4" and not (run_dir / "config.yaml").is_symlink()


def test_a_linked_checkpoints_directory_is_refused_and_nothing_is_pruned_through_it(run_copy, tmp_path):
    cfg, run_dir = run_copy
    other = tmp_path / "other_checkpoints"
    for i in range(1, 5):
        (other / f"step{i}").mkdir(parents=True)
        (other / f"step{i}" / "keep.txt").write_text("x")
    shutil.rmtree(checkpoint.checkpoint_dir(run_dir))
    checkpoint.checkpoint_dir(run_dir).symlink_to(other)
    with pytest.raises(DistillError, match=r"is a symbolic link; dsdistill writes and deletes only its own files"):
        _train({**cfg, "checkpoint": {"keep_last": 1}})
    assert sorted(p.name for p in other.iterdir()) == ["step1", "step2", "step3", "step4"]


def test_a_linked_step_is_neither_resumed_nor_exported_nor_pruned(run_copy, finished, tmp_path):
    cfg, run_dir = run_copy
    root = checkpoint.checkpoint_dir(run_dir)
    shutil.move(str(root / "step2"), str(tmp_path / "real_step2"))
    (root / "step2").symlink_to(tmp_path / "real_step2")
    with pytest.raises(DistillError, match=rf"^checkpoint.resume_tag: '{root / 'step2'}' is a symbolic link"):
        _train(cfg)
    with pytest.raises(DistillError, match=rf"^export --tag: '{root / 'step2'}' is a symbolic link"):
        export(run_dir, tmp_path / "out")
    assert (tmp_path / "real_step2").is_dir() and any((tmp_path / "real_step2").iterdir())
    out_link = tmp_path / "out_link"
    out_link.symlink_to(tmp_path / "real_step2")
    with pytest.raises(DistillError, match=rf"^export: '{out_link}' is a symbolic link"):
        export(run_dir, out_link)


# ---------------------------------------------------------------------------------------------- lock


def test_a_second_training_in_a_run_directory_is_refused_until_the_first_ends(run_copy, tmp_path):
    """Another process holds the directory (as a running training's rank 0 does): refused in one line
    naming it; once that process is gone (killed: no chance to clean up), the lock is free by itself."""
    cfg, run_dir = run_copy
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import sys; from dsdistill.rundir import RunLock; RunLock({str(run_dir)!r}).acquire(); print('held', flush=True); sys.stdin.read()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = _snapshot(run_dir, skip=(".lock",))
        with pytest.raises(DistillError) as e:
            _train(cfg)
        msg = str(e.value)
        assert (
            msg.startswith(f"output.run_dir: '{run_dir}' is in use by another training (pid {holder.pid} on ") and "\n" not in msg
        )
        assert _snapshot(run_dir, skip=(".lock",)) == before and (run_dir / "metrics.jsonl").read_bytes().count(b"run_start") == 1
    finally:
        holder.kill()
        holder.wait()
    _train(cfg)  # the killed holder left no stale lock
    assert checkpoint.latest_tag(run_dir) == "step4"
    RunLock(run_dir).acquire().release()  # and the finished run released its own


# ---------------------------------------------------------------------------------------------- checksums


def test_a_corrupted_checkpoint_is_refused_by_resume_and_export_naming_the_file(run_copy, tmp_path):
    """64 flipped bytes inside the model states resumed with rc 0 (objective 3.838 vs 3.452)."""
    cfg, run_dir = run_copy
    states = next((checkpoint.checkpoint_dir(run_dir) / "step2").glob("*model_states.pt"))
    data = bytearray(states.read_bytes())
    mid = len(data) // 2
    data[mid : mid + 64] = bytes(b ^ 0xFF for b in data[mid : mid + 64])
    states.write_bytes(bytes(data))
    before = _snapshot(run_dir)
    with pytest.raises(DistillError) as e:
        _train(cfg)
    assert str(e.value) == (
        f"checkpoint: '{states}' does not match the checksum recorded at save (the checkpoint step2 is damaged); "
        "no earlier intact checkpoint exists"
    )
    assert _snapshot(run_dir) == before
    with pytest.raises(DistillError, match=rf"^checkpoint: '{states}' does not match the checksum recorded at save"):
        export(run_dir, tmp_path / "out")


@pytest.mark.parametrize("with_checksums", [True, False])
def test_an_empty_optimizer_shard_is_named(run_copy, with_checksums):
    cfg, run_dir = run_copy
    step = checkpoint.checkpoint_dir(run_dir) / "step2"
    shard = next(step.glob("*optim_states.pt"))
    shard.write_bytes(b"")
    if not with_checksums:
        (step / "checksums.json").unlink()  # a checkpoint written before checksums existed
    with pytest.raises(DistillError) as e:
        _train(cfg)
    msg = str(e.value)
    if with_checksums:
        assert msg.startswith(f"checkpoint: '{shard}' has 0 bytes, ") and "(the checkpoint step2 is damaged)" in msg
    else:
        assert msg.startswith(f"checkpoint: '{shard}' is empty (a write that never finished); resume from an earlier checkpoint")
    assert "\n" not in msg and "EOFError" not in msg


# ---------------------------------------------------------------------------------------------- changed settings


def test_zero1_resumes_a_zero2_checkpoint_as_it_is(run_copy):
    """ZeRO-1 and ZeRO-2 partition the same states: DeepSpeed's own load, nothing carried (tests/test_carry.py
    covers the changes that are carried: ZeRO-3, precision, components, ranks)."""
    cfg, run_dir = run_copy
    _train({**cfg, "deepspeed": {"student": {**ZERO, "zero_optimization": {"stage": 1}}}})
    assert checkpoint.latest_tag(run_dir) == "step4"
    assert "resume_carried" not in (run_dir / "metrics.jsonl").read_text()
