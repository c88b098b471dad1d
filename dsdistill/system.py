"""Resources of every rank for the metrics stream's system records (the monitor's system panel)."""

from __future__ import annotations

import os
import sys
from typing import Optional

import torch

from dsdistill.dist import all_reduce_sum
from dsdistill.schema import RankUsage, SystemRecord

FIELDS = 6  # rss, peak rss, gpu memory held, gpu peak allocated, gpu memory total, gpu utilisation
_GPU_PEAK_BEFORE = 0.0
"""The largest allocator peak of earlier windows (the allocator's own peak is reset at each record)."""


def _peak_rss() -> tuple[float, bool]:
    """(GiB, since the previous call): the resident high-water mark, reset for the next window where the
    kernel allows it (Linux `clear_refs`), else the process's peak since it started."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            hwm = next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:")) / 2**20
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")  # resets VmHWM to the current RSS
        return hwm, True
    except (OSError, StopIteration, ValueError):
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        return kib / (2**30 if sys.platform == "darwin" else 2**20), False


def gpu_peak_gib() -> Optional[float]:
    """This rank's allocator peak since the run started (None without a GPU)."""
    if not torch.cuda.is_available():
        return None
    return max(_GPU_PEAK_BEFORE, torch.cuda.max_memory_allocated() / 2**30)


def _own_usage() -> list[float]:
    """This rank's numbers; -1 where there is nothing to measure (no GPU, no driver library)."""
    global _GPU_PEAK_BEFORE
    import psutil

    rss = psutil.Process(os.getpid()).memory_info().rss / 2**30
    peak, _ = _peak_rss()
    if not torch.cuda.is_available():
        return [rss, max(peak, rss), -1.0, -1.0, -1.0, -1.0]
    dev = torch.cuda.current_device()
    held = torch.cuda.memory_reserved(dev) / 2**30
    gpu_peak = torch.cuda.max_memory_allocated(dev) / 2**30
    _GPU_PEAK_BEFORE = max(_GPU_PEAK_BEFORE, gpu_peak)
    torch.cuda.reset_peak_memory_stats(dev)  # the next record's peak is its own window's
    total = torch.cuda.get_device_properties(dev).total_memory / 2**30
    try:
        util = float(torch.cuda.utilization(dev))  # needs the NVML library
    except Exception:  # noqa: BLE001 - no driver library: utilisation unknown, not an error
        util = -1.0
    return [rss, max(peak, rss), held, gpu_peak, total, util]


def system_record(*, step: int, rank: int, world: int, estimate_gib: Optional[float] = None) -> Optional[SystemRecord]:
    """Every rank's usage, summed into rank 0 in one collective (every rank must call this at the same
    step); the record on rank 0, None elsewhere. `estimate_gib`: `dsdistill check`'s memory estimate per
    rank, recorded beside the measured peaks."""
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
            peak_rss_gib=rows[r * FIELDS + 1],
            gpu_mem_gib=opt(rows[r * FIELDS + 2]),
            gpu_peak_gib=opt(rows[r * FIELDS + 3]),
            gpu_mem_total_gib=opt(rows[r * FIELDS + 4]),
            gpu_util=opt(rows[r * FIELDS + 5]),
        )
        for r in range(world)
    ]
    vm = psutil.virtual_memory()
    return SystemRecord(
        step=step,
        ranks=ranks,
        host_mem_used_gib=(vm.total - vm.available) / 2**30,
        host_mem_total_gib=vm.total / 2**30,
        estimate_gib=estimate_gib,
    )
