"""Student checkpoints: DeepSpeed's own save/load plus the loop's state; atomic, pruned, with a best.

The loop state travels as DeepSpeed client state: optimizer step, data stream position (epoch and
micro-batches consumed per rank, the same on every rank), early-stopping state, tokens seen and the RNG.

Atomicity: DeepSpeed writes into a hidden `.stepN.partial` tag; only when every rank has finished does
rank 0 rename it to `stepN` and replace `latest` (write-then-rename), so a crash or a full disk mid-save
leaves the previous checkpoint and `latest` untouched. (The run directory must be on a filesystem that
all ranks share, as DeepSpeed's own `latest` handling assumes.)

Safety: nothing read from a run directory may run code. DeepSpeed unpickles its files with
`weights_only=False`; every load here runs under `TORCH_FORCE_WEIGHTS_ONLY_LOAD` with an explicit list of
the plain classes DeepSpeed's states hold, so a planted pickle payload is refused, never executed. Tags
(`latest`, `best`, a tag given by the user) resolve only to `stepN` directories inside `checkpoints/`.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist

from dsdistill.errors import DistillError, first_sentence
from dsdistill.rundir import damaged_file, ensure_dir, record_checksums, refuse_link, write_atomic, write_failure

CHECKPOINT_DIR = "checkpoints"
LAYOUT = "dsdistill.json"
"""The run layout a checkpoint was written with (batch shape, world, ZeRO stage, precision, aux modules)."""
_TAG = re.compile(r"^step(\d+)$")
_PARTIAL = re.compile(r"^\.step\d+\.partial$")


class CheckpointError(DistillError):
    """A checkpoint could not be written or read."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINT_DIR


def tags(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint in the run directory, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    # a link named stepN is not one of ours: never listed, so never pruned through
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (m := _TAG.match(p.name))]
    return sorted(found)


def valid_tag(tag: str) -> bool:
    """A tag names a checkpoint directory directly inside `checkpoints/` (`stepN`), nothing else."""
    return bool(_TAG.match(tag))


def _read_pointer(run_dir: Path, name: str) -> Optional[str]:
    """The tag a pointer file names, if it is a valid tag whose checkpoint exists."""
    f = checkpoint_dir(run_dir) / name
    if not f.is_file():
        return None
    try:
        tag = f.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return tag if valid_tag(tag) and (checkpoint_dir(run_dir) / tag).is_dir() else None


def latest_tag(run_dir: Path) -> Optional[str]:
    """The tag `latest` names, if that checkpoint exists."""
    return _read_pointer(run_dir, "latest")


def best_tag(run_dir: Path) -> Optional[str]:
    """The tag `best` names (the best eval so far), if that checkpoint exists."""
    return _read_pointer(run_dir, "best")


def _listing(run_dir: Path) -> str:
    found = [p.name for _, p in tags(run_dir)]
    return ", ".join(found) if found else "none"


def resolve_tag(run_dir: Path, tag: Optional[str], *, field: str) -> Optional[str]:
    """The checkpoint to resume or export: `tag` if given (validated), else what `latest` names.

    None when the run has no checkpoint at all. A `latest` that is unreadable, names something outside
    `checkpoints/` or a checkpoint that is gone, while checkpoints exist, is refused: restarting from
    step 0 would overwrite them."""
    root = checkpoint_dir(run_dir)
    refuse_link(root, field=field)
    if tag is not None:
        refuse_link(root / tag, field=field)
        if not valid_tag(tag):
            raise CheckpointError(f"{field}: '{tag}' is not a checkpoint tag; expected stepN, one of: {_listing(run_dir)}")
        if not (root / tag).is_dir():
            raise CheckpointError(f"{field}: no checkpoint '{tag}' in '{root}'; checkpoints: {_listing(run_dir)}")
        return tag
    pointer = root / "latest"
    if not pointer.exists() and not pointer.is_symlink():
        if tags(run_dir):
            raise CheckpointError(
                f"checkpoint: '{pointer}' is missing but '{root}' holds checkpoints ({_listing(run_dir)}); "
                "pick one with --set checkpoint.resume_tag=stepN, or start fresh with checkpoint.resume: never "
                "and another output.run_dir"
            )
        return None
    tag = _read_pointer(run_dir, "latest")
    if tag is None:
        try:
            shown = pointer.read_text(encoding="utf-8", errors="replace").strip()[:60]
        except OSError as e:
            shown = f"unreadable: {e.strerror or e}"
        raise CheckpointError(
            f"checkpoint: '{pointer}' names {shown!r}, which is not a checkpoint in '{root}' "
            f"(checkpoints: {_listing(run_dir)}); pick one with --set checkpoint.resume_tag=stepN, "
            "or start fresh with checkpoint.resume: never and another output.run_dir"
        )
    refuse_link(root / tag, field=field)
    return tag


def verify(run_dir: Path, tag: str, *, field: str) -> None:
    """The checkpoint's files against the checksums recorded at save: a one-line error naming the first
    damaged file and the newest earlier checkpoint that is intact."""
    bad = damaged_file(checkpoint_dir(run_dir) / tag)
    if bad is None:
        return
    step = int(tag[4:])
    # the newest intact one only: hash earlier checkpoints until one passes, not all of them
    good = next((p.name for s, p in reversed(tags(run_dir)) if s < step and damaged_file(p) is None), None)
    offer = f"resume from {good} with --set {field}={good}" if good else "no earlier intact checkpoint exists"
    raise CheckpointError(f"checkpoint: {bad} (the checkpoint {tag} is damaged); {offer}")


SAFE_GLOBALS_NAMES = (
    "collections.OrderedDict",
    "collections.defaultdict",
    "argparse.Namespace",
    "torch.Size",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.utils.tensor_fragment.fragment_address",
)
"""Plain classes found in DeepSpeed's checkpoint files (data holders, no code runs when they load)."""


def _safe_globals() -> list:
    import importlib

    out = []
    for name in SAFE_GLOBALS_NAMES:
        module, _, attr = name.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        if isinstance(obj, type) or callable(obj):
            out.append(obj)
    return out


@contextlib.contextmanager
def safe_unpickling() -> Iterator[None]:
    """Every `torch.load` inside runs as `weights_only=True` (whatever its caller passed), with only the
    plain classes DeepSpeed's states need allowed."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def refused_pickle(err: BaseException) -> bool:
    """Whether a load failed because the file holds something other than plain data."""
    return isinstance(err, pickle.UnpicklingError) or "weights_only" in str(err) or "Unsupported global" in str(err)


def describe_load_error(where: Path, err: BaseException) -> str:
    if refused_pickle(err):
        found = re.search(r"GLOBAL ([\w.]+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        return (
            f"checkpoint: '{where}' holds an object that is not plain data{what}; refusing to unpickle it "
            "(a file in a run directory must not run code); delete it or point checkpoint.resume_tag at another checkpoint"
        )
    empty = sorted(p.name for p in where.glob("*.pt") if p.is_file() and p.stat().st_size == 0)
    what = (
        f"'{where / empty[0]}' is empty (a write that never finished)"
        if empty
        else f"'{where}' cannot be read ({first_sentence(err)})"
    )
    return (
        f"checkpoint: {what}; resume from an earlier checkpoint with --set checkpoint.resume_tag=stepN "
        f"(checkpoints: {_listing(where.parent.parent)}), or start fresh with checkpoint.resume: never"
    )


def _write_pointer(run_dir: Path, name: str, tag: str) -> None:
    write_atomic(checkpoint_dir(run_dir) / name, tag.encode(), field="checkpoint")


def clean_partials(run_dir: Path) -> list[str]:
    """Remove `.stepN.partial` directories left by saves that never finished (a crash, a full disk)."""
    root = checkpoint_dir(run_dir)
    removed = []
    if root.is_dir():
        for p in root.iterdir():
            if _PARTIAL.match(p.name) and p.is_symlink():
                p.unlink()  # the link itself, never what it points to
                removed.append(p.name)
            elif p.is_dir() and _PARTIAL.match(p.name):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p.name)
    return removed


def rng_state() -> dict[str, Any]:
    """The host RNGs a checkpoint restores (taken at a window's start when that window is abandoned)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def save(
    engine,
    run_dir: Path,
    *,
    state: dict[str, Any],
    keep_last: int,
    mark_best: bool = False,
    rng: Optional[dict[str, Any]] = None,
) -> str:
    """Save on every rank (a collective); publish atomically and prune on rank 0. Every step agrees on
    failure, so a rank that failed alone (a full disk, a link where a directory belongs) never leaves the
    others waiting in a barrier."""
    from dsdistill.dist import agree

    root = checkpoint_dir(run_dir)
    tag = f"step{engine.global_steps}"
    partial = f".{tag}.partial"
    rank = dist.get_rank() if dist.is_initialized() else 0
    previous = latest_tag(run_dir)
    kept = f"'{root / previous}' and 'latest' are intact" if previous else "no earlier checkpoint exists"

    def failed(e: BaseException) -> CheckpointError:
        if rank == 0:
            shutil.rmtree(root / partial, ignore_errors=True)
        return CheckpointError(f"checkpoint: writing {tag} to '{root}' failed ({write_failure(e, root)}); {kept}")

    def prepare() -> None:
        if rank == 0:
            ensure_dir(root, field="checkpoint")
            refuse_link(root / tag, field="checkpoint")
            clean_partials(run_dir)

    def write() -> None:
        client = dict(state)
        client["rng"] = rng if rng is not None else rng_state()
        try:
            engine.save_checkpoint(str(root), tag=partial, client_state=client, save_latest=False)
        except (OSError, RuntimeError) as e:
            raise failed(e) from None

    def publish() -> None:
        if rank != 0:
            return
        try:
            # what the checkpoint was written with, readable before DeepSpeed opens anything
            write_atomic(
                root / partial / LAYOUT, json.dumps(state.get("layout", {}), sort_keys=True).encode(), field="checkpoint"
            )
            record_checksums(root / partial)  # before publishing: a published checkpoint always has them
        except OSError as e:
            raise failed(e) from None
        final = root / tag
        refuse_link(final, field="checkpoint")
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

    agree(prepare, what=f"preparing checkpoint {tag}")
    agree(write, what=f"writing checkpoint {tag}")
    agree(publish, what=f"publishing checkpoint {tag}")
    return tag


def _read_layout(where: Path) -> dict[str, Any]:
    try:
        data = json.loads((where / LAYOUT).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}  # a checkpoint from before this file: the client state is checked after loading
    return data if isinstance(data, dict) else {}


CARRIED = {"zero_stage": "ZeRO stage", "precision": "precision", "world_size": "ranks", "aux_modules": "components"}
"""Layout keys a resume can change: the checkpoint is carried into the new layout (`dsdistill.carry`)."""


def _changes(where: Path, saved: dict[str, Any], expect: dict[str, Any], *, movable_world: bool) -> dict[str, tuple]:
    """The carried settings that differ from the checkpoint's, as {key: (saved, now)}; one line for any other
    difference. The checkpoint stays valid and is never to be deleted for it."""
    changed: dict[str, tuple] = {}
    for key, now in expect.items():
        if key not in saved or saved[key] == now:
            continue
        if key == "zero_stage" and (saved[key] == 3) == (now == 3):
            continue  # ZeRO-1 and ZeRO-2 write the same partitioned states
        if key in CARRIED and (key != "world_size" or movable_world):
            changed[key] = (saved[key], now)
            continue
        if key == "world_size":
            raise CheckpointError(
                f"checkpoint: '{where}' was written by {saved[key]} ranks, this run has {now}; streamed sources are read "
                f"per rank, so its data position means nothing on another number of ranks; resume with {saved[key]} ranks "
                f"(the checkpoint is valid: keep it), or carry the weights: dsdistill export {where.parent.parent} "
                "--out DIR, then student.path: DIR and another output.run_dir"
            )
        raise CheckpointError(
            f"checkpoint: '{where}' was written with {key}={saved[key]!r}, this run has {now!r}; "
            f"its data position would mean other sequences; resume with the same {key} (the checkpoint is valid: keep "
            "it), or start fresh with checkpoint.resume: never and another output.run_dir"
        )
    return changed


def _carry(engine, where: Path, changed: dict[str, tuple]) -> dict[str, Any]:
    """Load through `dsdistill.carry`; the loop state, with a one-line note of what changed under "carried"."""
    from dsdistill import carry

    try:
        with safe_unpickling():
            got = carry.load(engine, where)
    except Exception as e:  # DeepSpeed/torch raise many types for a damaged file
        raise CheckpointError(describe_load_error(where, e)) from None
    moved = ", ".join(f"{CARRIED[k]} {_brief(a)} -> {_brief(b)}" for k, (a, b) in changed.items())
    kept = "weights, Adam moments" if got.moments else "weights (the old optimizer kept no Adam moments: they restart)"
    note = f"carried {where.name} into a new layout ({moved}): {kept}, step and LR schedule"
    if got.fresh:
        note += f"; fresh: {_names(got.fresh)}"
    if got.dropped:
        note += f"; dropped: {_names(got.dropped)}"
    client = got.client
    client["carried"] = note
    return client


def _brief(value: Any) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value)


def _names(params: list[str]) -> str:
    """Parameter names by module (`aux.router.proj.weight` -> `aux.router`), counted."""
    groups: dict[str, int] = {}
    for name in params:
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "aux" else parts[0]
        groups[key] = groups.get(key, 0) + 1
    return ", ".join(f"{k} ({n} tensor{'s' if n > 1 else ''})" for k, n in groups.items())


def _verified_by_rank0(run_dir: Path, tag: str) -> None:
    """`verify` on rank 0 (each file read once, not once per rank); the others learn the verdict."""
    from dsdistill.dist import all_reduce_sum

    rank = dist.get_rank() if dist.is_initialized() else 0
    error: Optional[CheckpointError] = None
    if rank == 0:
        try:
            verify(run_dir, tag, field="checkpoint.resume_tag")
        except CheckpointError as e:
            error = e
    if dist.is_initialized() and dist.get_world_size() > 1:
        if all_reduce_sum([1.0 if error is not None else 0.0])[0] and error is None:
            raise CheckpointError(f"checkpoint: rank 0 found {tag} damaged")
    if error is not None:
        raise error


def _has_states(where: Path) -> bool:
    return any(where.glob("*model_states.pt"))


def load(
    engine,
    run_dir: Path,
    *,
    tag: Optional[str] = None,
    expect: Optional[dict[str, Any]] = None,
    movable_world: bool = False,
) -> Optional[dict[str, Any]]:
    """Restore a checkpoint (`tag`, else what `latest` names) into `engine`; the loop state it saved, or None
    if the run has none. `expect` maps each layout field to its value now. A change of ZeRO stage, precision or
    components - and of world size where `movable_world` (the data position can be re-sharded) - is carried
    (`dsdistill.carry`) and described under "carried"; any other difference is refused."""
    tag = resolve_tag(run_dir, tag, field="checkpoint.resume_tag")
    if tag is None:
        return None
    where = checkpoint_dir(run_dir) / tag
    if not _has_states(where):
        raise CheckpointError(
            f"checkpoint: '{where}' holds no model states (an empty or incomplete checkpoint); "
            f"delete it or pick another with --set checkpoint.resume_tag=stepN (checkpoints: {_listing(run_dir)})"
        )
    _verified_by_rank0(run_dir, tag)
    changed = _changes(where, _read_layout(where), expect or {}, movable_world=movable_world)
    if changed:
        client = _carry(engine, where, changed)
        return _restored(client, where, tag)
    try:
        with safe_unpickling():
            path, client = engine.load_checkpoint(str(checkpoint_dir(run_dir)), tag=tag)
    except Exception as e:  # DeepSpeed/torch raise many types for a damaged file
        raise CheckpointError(describe_load_error(where, e)) from None
    if path is None or client is None:
        client = {}  # no loop state: `_restored` says so
    if _changes(where, client.get("layout") or {}, expect or {}, movable_world=movable_world):
        raise CheckpointError(  # a checkpoint from before the layout file: its layout is known only now
            f"checkpoint: '{where}' was written with another ZeRO stage, precision, world size or components and "
            "predates carrying them; resume with the settings it was written with (the checkpoint is valid: keep it)"
        )
    return _restored(client, where, tag)


def _restored(client: dict[str, Any], where: Path, tag: str) -> dict[str, Any]:
    if "stream" not in client:
        raise CheckpointError(f"checkpoint: '{where}' is incomplete (no loop state); delete it or set checkpoint.resume: never")
    rng = client.pop("rng", None)
    if rng:
        torch.set_rng_state(rng["torch"])
        random.setstate(rng["python"])
    client["tag"] = tag
    return client
