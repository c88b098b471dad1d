"""Small helpers for the process group: sums over ranks, a free port, the variables that define a world."""
from __future__ import annotations

import socket

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
    t = torch.stack([v.detach().to(dev, torch.float64) if torch.is_tensor(v) else torch.tensor(float(v), dtype=torch.float64, device=dev)
                     for v in values])
    if _initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.tolist()


def free_port() -> int:
    """A TCP port nothing listens on right now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def without_world_env(env: dict[str, str]) -> dict[str, str]:
    """A copy of `env` without the world variables, for launching a separate run from inside one."""
    return {k: v for k, v in env.items() if k not in WORLD_ENV}
