"""A full disk during a checkpoint save or a teacher-cache write: one line that says the disk is full
(torch's own "enforce fail at inline_container.cc" was all a user saw), nothing written before is lost,
and the cache write resumes once there is room. The disk is a real tmpfs of a few hundred KiB."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import pytest

from dsdistill.config import validate
from dsdistill.errors import DistillError
from dsdistill.schema import METRICS_FILE, RunEnd, parse_line
from dsdistill.train import train, write_teacher_cache


@contextlib.contextmanager
def small_disk(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mounting a small tmpfs needs privileges this machine does not give ({proc.stderr.strip()[:80]})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_a_full_disk_during_a_checkpoint_save_is_one_line_and_keeps_the_stream(make_config, tmp_path):
    with small_disk(tmp_path / "disk", "100k") as disk:
        cfg = make_config(
            train={"max_steps": 2, "micro_batch_size": 2},
            eval={"every": 0, "at_start": False},
            output={"run_dir": str(disk / "run")},
        )
        with pytest.raises(DistillError) as e, contextlib.redirect_stdout(io.StringIO()):
            train(validate(cfg))
        msg = str(e.value)
        assert msg.startswith(
            f"checkpoint: writing step2 to '{disk / 'run' / 'checkpoints'}' failed (no space left on the file system"
        )
        assert "\n" not in msg and msg.endswith("no earlier checkpoint exists")
        recs = [parse_line(x) for x in (disk / "run" / METRICS_FILE).read_text().splitlines()]
        assert isinstance(recs[-1], RunEnd) and recs[-1].reason == "error"
        assert not list((disk / "run" / "checkpoints").glob(".step*"))  # the half-written checkpoint is gone


@pytest.mark.slow
def test_a_full_disk_during_a_cache_write_is_one_line_and_the_write_resumes(make_config, tmp_path):
    cfg = validate(make_config(curriculum={"weights": {"kd": 1.0}}, train={"max_steps": 2, "micro_batch_size": 2}))
    with small_disk(tmp_path / "disk", "24k") as disk:
        with pytest.raises(DistillError) as e, contextlib.redirect_stdout(io.StringIO()):
            write_teacher_cache(cfg, disk / "cache", top_k=16, level_bits=5, shard_rows=4)
        msg = str(e.value)
        assert msg.startswith(f"teacher-cache: writing '{disk / 'cache'}/") and "no space left on the file system" in msg
        assert msg.endswith("the same command resumes the write") and "\n" not in msg
        written = sorted(p.name for p in (disk / "cache" / "train").glob("*.bin"))
        assert written  # what fitted is kept
        subprocess.run(["mount", "-o", "remount,size=4m", str(disk)], check=True)
        with contextlib.redirect_stdout(io.StringIO()):
            manifest = write_teacher_cache(cfg, disk / "cache", top_k=16, level_bits=5, shard_rows=4)
        assert manifest["tokens"] > 0 and (disk / "cache" / "manifest.json").is_file()
