"""Small helpers for the process group: sums over ranks, a free port, the variables that define a world."""

from __future__ import annotations

import socket
from typing import Any, Optional

import torch
import torch.distributed as dist

WORLD_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
"""Variables that place a process in a torch.distributed world (a child that starts its own must not inherit them)."""


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def reduce_device() -> torch.device:
    """Where a tensor must live to be reduced: the current GPU under NCCL (it only reduces CUDA tensors), else CPU."""
    if _initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(values) -> list[float]:
    """Element-wise sum over ranks (float64) of numbers and 0-dim tensors, in one collective and one
    device-to-host transfer (tensors are not synchronised one by one)."""
    dev = reduce_device()
    t = torch.stack(
        [
            v.detach().to(dev, torch.float64) if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64, device=dev)
            for v in values
        ]
    )
    if _initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


_CONTROL: Optional[Any] = None


def control_group():
    """A gloo group over the same ranks for host-side decisions (None: the default group is gloo already).
    Every rank must make the first call at the same point (creating a group is collective)."""
    global _CONTROL
    if _CONTROL is None and _initialized() and dist.get_backend() != "gloo":
        _CONTROL = dist.new_group(backend="gloo")
    return _CONTROL


def any_rank(flag: bool) -> bool:
    """Whether any rank's `flag` is set: a collective of host tensors over gloo, so it never waits for the
    device (a stop agreed between micro-batches costs no device sync)."""
    t = torch.tensor([1.0 if flag else 0.0])
    if _initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=control_group())
    return bool(t.numpy()[0] > 0)  # a host tensor: reading it waits for nothing


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (plain data), in rank order, on every rank: a checkpoint records each rank's own data
    position, since ZeRO-1/2 write the loop state from rank 0 alone."""
    if not (_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=control_group())
    return out


def all_reduce_named(values: dict[str, Any]) -> dict[str, float]:
    """`all_reduce_sum` over a dict: every rank passes the same keys and gets each one's sum by name."""
    keys = sorted(values)
    return dict(zip(keys, all_reduce_sum([values[k] for k in keys])))


def agree(fn, *, what: str):
    """Run `fn()` on every rank and agree on failure, so no rank waits forever in a later collective.

    If any rank raised, every rank raises: the lowest failing rank its own error, the others `PeerFailed`
    (which prints nothing), so the first real error reaches the user once, from whichever rank found it."""
    from dsdistill.errors import PeerFailed

    error: Optional[BaseException] = None
    result = None
    try:
        result = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below on this rank
        error = e
    if _initialized() and dist.get_world_size() > 1:
        flags = [0.0] * dist.get_world_size()
        flags[dist.get_rank()] = 1.0 if error is not None else 0.0
        failed = [r for r, f in enumerate(all_reduce_sum(flags)) if f > 0]
        if failed and error is None:
            raise PeerFailed(f"rank {failed[0]} failed during {what}")
        if failed and failed[0] != dist.get_rank():
            raise PeerFailed(f"rank {failed[0]} failed during {what}") from error
    if error is not None:
        raise error
    return result


def free_port() -> int:
    """A TCP port nothing listens on right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_world_env(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` without the world variables, for launching a separate run from inside one."""
    return {k: v for k, v in env.items() if k not in WORLD_ENV}


def unlink_shm_buffers_at_exit() -> None:
    """Remove this rank's DeepSpeed CPU all-reduce buffers from /dev/shm when the process exits.

    DeepSpeed's shared-memory comm ops (CPU accelerator) create `deepspeed_allreduce_buffer_*_<addr>_<port>_<rank>`
    with shm_open and never unlink them: every multi-rank CPU run leaked about 65 MB per rank of RAM-backed
    /dev/shm until the machine swapped (seen here: 21 GB after a day of runs). Peers map each other's
    buffers when the group starts, so unlinking at exit frees the memory without touching a live mapping."""
    import atexit
    import glob
    import os

    addr, port, rank = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if not (addr and port and rank):
        return

    def unlink() -> None:
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{addr}_{port}_{rank}"):
            try:
                os.unlink(path)
            except OSError:
                pass

    atexit.register(unlink)


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed through DeepSpeed (gloo on CPU); a plain `python` start is world 1."""
    import os

    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if not dist.is_initialized():
        backend = "gloo" if get_accelerator().device_name() == "cpu" else None
        deepspeed.init_distributed(dist_backend=backend, verbose=False)
        unlink_shm_buffers_at_exit()
    return dist.get_rank(), dist.get_world_size()


def this_rank() -> int:
    """This process's rank: from the process group once it exists, else from the launcher's RANK."""
    import os

    if _initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))
