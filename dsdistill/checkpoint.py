"""Student checkpoints: DeepSpeed's own save/load plus the loop's state, and pruning of old ones.

The loop state travels as DeepSpeed client state: optimizer step, data stream position (epoch and
micro-batches consumed on this rank), early-stopping state, tokens seen and the RNG state.
"""
from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist

CHECKPOINT_DIR = "checkpoints"
_TAG = re.compile(r"^step(\d+)$")


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def tags(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in the run directory, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _TAG.match(p.name))]
    return sorted(found)


def latest_tag(run_dir: Path) -> Optional[str]:
    """The tag DeepSpeed's `latest` file names, if it names a checkpoint that exists."""
    latest = checkpoint_dir(run_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if (checkpoint_dir(run_dir) / tag).is_dir() else None


def save(engine, run_dir: Path, *, state: dict[str, Any], keep_last: int) -> str:
    """Save on every rank (a collective), then prune to the newest `keep_last` on rank 0."""
    tag = f"step{engine.global_steps}"
    client = dict(state)
    client["rng"] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    engine.save_checkpoint(str(checkpoint_dir(run_dir)), tag=tag, client_state=client)
    if dist.get_rank() == 0:
        keep = {tag}
        for _, path in tags(run_dir)[:-keep_last]:
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)
    dist.barrier()
    return tag


def load(engine, run_dir: Path) -> Optional[dict[str, Any]]:
    """Restore the newest checkpoint into `engine`; the loop state it saved, or None if there is none."""
    tag = latest_tag(run_dir)
    if tag is None:
        return None
    path, client = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    if path is None:
        return None
    rng = (client or {}).pop("rng", None)
    if rng:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    return client or {}
