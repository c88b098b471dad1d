"""Student checkpoints: DeepSpeed's own save/load plus the loop's state; atomic, pruned, with a best.

The loop state travels as DeepSpeed client state: optimizer step, data stream position (epoch and
micro-batches consumed per rank, the same on every rank), early-stopping state, tokens seen and the RNG.

Atomicity: DeepSpeed writes into a hidden `.stepN.partial` tag; only when every rank has finished does
rank 0 rename it to `stepN` and replace `latest` (write-then-rename), so a crash or a full disk mid-save
leaves the previous checkpoint and `latest` untouched. (The run directory must be on a filesystem that
all ranks share, as DeepSpeed's own `latest` handling assumes.)
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

from dsdistill.errors import DistillError, first_sentence

CHECKPOINT_DIR = "checkpoints"
_TAG = re.compile(r"^step(\d+)$")


class CheckpointError(DistillError):
    """A checkpoint could not be written or read."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def tags(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in the run directory, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found)


def _read_pointer(run_dir: Path, name: str) -> Optional[str]:
    f = checkpoint_dir(run_dir) / name
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    return tag if (checkpoint_dir(run_dir) / tag).is_dir() else None


def latest_tag(run_dir: Path) -> Optional[str]:
    """The tag `latest` names, if that checkpoint exists."""
    return _read_pointer(run_dir, "latest")


def best_tag(run_dir: Path) -> Optional[str]:
    """The tag `best` names (the best eval so far), if that checkpoint exists."""
    return _read_pointer(run_dir, "best")


def _write_pointer(run_dir: Path, name: str, tag: str) -> None:
    root = checkpoint_dir(run_dir)
    tmp = root / f".{name}.tmp"
    tmp.write_text(tag)
    os.replace(tmp, root / name)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def save(engine, run_dir: Path, *, state: dict[str, Any], keep_last: int, mark_best: bool = False) -> str:
    """Save on every rank (a collective); publish atomically and prune on rank 0."""
    root = checkpoint_dir(run_dir)
    tag = f"step{engine.global_steps}"
    partial = f".{tag}.partial"
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(root / partial, ignore_errors=True)
    _barrier()
    client = dict(state)
    client["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    try:
        engine.save_checkpoint(str(root), tag=partial, client_state=client, save_latest=False)
    except (OSError, RuntimeError) as e:
        if rank == 0:
            shutil.rmtree(root / partial, ignore_errors=True)
        previous = latest_tag(run_dir)
        kept = f"'{root / previous}' and 'latest' are intact" if previous else "no earlier checkpoint exists"
        raise CheckpointError(f"checkpoint: writing {tag} to '{root}' failed ({first_sentence(e)}); {kept}") from None
    _barrier()
    if rank == 0:
        final = root / tag
        if final.exists():
            shutil.rmtree(final)
        os.rename(root / partial, final)
        _write_pointer(run_dir, "latest", tag)
        if mark_best:
            _write_pointer(run_dir, "best", tag)
        protect = {tag, best_tag(run_dir)}
        for _, path in tags(run_dir)[:-keep_last]:
            if path.name not in protect:
                shutil.rmtree(path, ignore_errors=True)
    _barrier()
    return tag


def load(engine, run_dir: Path) -> Optional[dict[str, Any]]:
    """Restore the newest checkpoint into `engine`; the loop state it saved, or None if there is none."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    where = checkpoint_dir(run_dir) / tag
    try:
        path, client = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    except Exception as e:  # DeepSpeed/torch raise many types for a damaged file
        raise CheckpointError(f"checkpoint: '{where}' cannot be read ({first_sentence(e)}); delete it "
                              "(or point 'latest' at an older checkpoint), or set checkpoint.resume: never") from None
    if path is None or client is None or "stream" not in client:
        raise CheckpointError(f"checkpoint: '{where}' is incomplete (no loop state); delete it or set checkpoint.resume: never")
    rng = client.pop("rng", None)
    if rng:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    return client
