"""Resources of every rank for the metrics stream's system records (the monitor's system panel)."""

from __future__ import annotations

import os
from typing import Optional

import torch

from dsdistill.dist import all_reduce_sum
from dsdistill.schema import RankUsage, SystemRecord

FIELDS = 4  # rss, gpu memory held, gpu memory total, gpu utilisation


def _own_usage() -> list[float]:
    """This rank's numbers; -1 where there is nothing to measure (no GPU, no driver library)."""
    import psutil

    rss = psutil.Process(os.getpid()).memory_info().rss / 2**30
    if not torch.cuda.is_available():
        return [rss, -1.0, -1.0, -1.0]
    dev = torch.cuda.current_device()
    held = torch.cuda.memory_reserved(dev) / 2**30
    total = torch.cuda.get_device_properties(dev).total_memory / 2**30
    try:
        util = float(torch.cuda.utilization(dev))  # needs the NVML library
    except Exception:  # noqa: BLE001 - no driver library: utilisation unknown, not an error
        util = -1.0
    return [rss, held, total, util]


def system_record(*, step: int, rank: int, world: int) -> Optional[SystemRecord]:
    """Every rank's usage, summed into rank 0 in one collective (every rank must call this at the same
    step); the record on rank 0, None elsewhere."""
    flat = [0.0] * (world * FIELDS)
    flat[rank * FIELDS : (rank + 1) * FIELDS] = _own_usage()
    rows = all_reduce_sum(flat)
    if rank != 0:
        return None
    import psutil

    def opt(v: float) -> Optional[float]:
        return None if v < 0 else v

    ranks = [
        RankUsage(
            rank=r,
            rss_gib=rows[r * FIELDS],
            gpu_mem_gib=opt(rows[r * FIELDS + 1]),
            gpu_mem_total_gib=opt(rows[r * FIELDS + 2]),
            gpu_util=opt(rows[r * FIELDS + 3]),
        )
        for r in range(world)
    ]
    vm = psutil.virtual_memory()
    return SystemRecord(
        step=step, ranks=ranks, host_mem_used_gib=(vm.total - vm.available) / 2**30, host_mem_total_gib=vm.total / 2**30
    )
