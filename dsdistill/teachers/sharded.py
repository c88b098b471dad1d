"""`teacher-serve` on several ranks: `deepspeed --num_gpus N dsdistill/serve.py --model DIR --port P` shards the
teacher with ZeRO-3 over the N ranks (no rank holds it whole: a teacher too large for one GPU is served
from several). Rank 0 answers HTTP; for each forward it broadcasts the token ids, and every rank runs the
forward together (ZeRO-3 gathers each layer's weights across them); only rank 0 reads the logits.

The other ranks wait in that broadcast between requests: rank 0 sends an empty one every `IDLE_S` seconds
without a request, so the wait never reaches the process group's timeout, and a last one when it stops.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

_IDLE, _STOP = (0, 1), (0, 0)
"""Shapes broadcast instead of a batch's: nothing to run (keep waiting), and the server stopped."""


def load_sharded(spec: Any, *, field: str, precision: str) -> tuple[Callable[[torch.Tensor], torch.Tensor], Any, torch.device]:
    """(ids -> logits, the model's config, this rank's device) for `spec` loaded straight into ZeRO-3 shards."""
    from dsdistill.dist import agree, init_distributed
    from dsdistill.ds_config import teacher_zero3
    from dsdistill.engines import build_teacher_engine
    from dsdistill.models import load_causal_lm, load_config
    from dsdistill.teachers.live import TeacherModel

    init_distributed()
    config = load_config(spec, field=field)
    ds = teacher_zero3(None, micro_batch=1, precision=precision, model_config=config)
    lm = agree(lambda: load_causal_lm(spec, field=field, precision=precision, zero3_ds_config=ds), what="loading the teacher")
    engine = build_teacher_engine(TeacherModel(lm), ds)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return engine(ids, hidden_states=False, head=True)[0]

    return forward, lm.config, engine.device


class Ranks:
    """The ranks of a sharded server, from rank 0's side (`lead`, `idle`, `stop`) or another's (`follow`)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def _shape(self, shape: tuple[int, int]) -> None:
        dist.broadcast(torch.tensor(shape, dtype=torch.long, device=self.device), 0)

    def lead(self, ids: torch.Tensor) -> None:
        """Rank 0, before its forward of `ids`: every other rank runs the same one."""
        self._shape((int(ids.size(0)), int(ids.size(1))))
        dist.broadcast(ids, 0)

    def idle(self) -> None:
        self._shape(_IDLE)

    def stop(self) -> None:
        self._shape(_STOP)

    def follow(self, forward: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Another rank: run every forward rank 0 leads, until it stops."""
        while True:
            shape = torch.zeros(2, dtype=torch.long, device=self.device)
            dist.broadcast(shape, 0)
            rows, width = (int(v) for v in shape.tolist())
            if (rows, width) == _STOP:
                return
            if rows == 0:
                continue
            ids = torch.zeros(rows, width, dtype=torch.long, device=self.device)
            dist.broadcast(ids, 0)
            forward(ids)
