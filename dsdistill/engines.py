"""The two DeepSpeed engines: the trainable student and the frozen, ZeRO-3-sharded teacher."""

from __future__ import annotations

import math
from typing import Any

import torch

from dsdistill.config import RunConfig, SchedulerConfig


def warmup_steps_of(sched: SchedulerConfig, total_steps: int) -> int:
    """Warmup length in optimizer steps."""
    if sched.warmup_ratio is not None:
        return int(round(sched.warmup_ratio * total_steps))
    return sched.warmup_steps


def lr_multiplier(index: int, *, sched: SchedulerConfig, total_steps: int) -> float:
    """LR / peak LR for the optimizer step with 0-based `index`.

    Warmup is linear and starts at 1/warmup (the first step never runs at LR 0); then cosine, linear or
    constant decay to `min_lr_ratio` at the last step."""
    warmup = warmup_steps_of(sched, total_steps)
    if index < warmup:
        return (index + 1) / warmup
    if sched.kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup - 1)
    frac = min(1.0, (index - warmup) / span)
    lo = sched.min_lr_ratio
    if sched.kind == "cosine":
        return lo + (1 - lo) * 0.5 * (1 + math.cos(math.pi * frac))
    return 1 - (1 - lo) * frac


def _param_groups(model: torch.nn.Module, weight_decay: float):
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_student_engine(model: torch.nn.Module, ds_config: dict[str, Any], cfg: RunConfig, *, total_steps: int):
    """`deepspeed.initialize` for the student, with the run config's optimizer and LR schedule unless the
    DeepSpeed config brings its own."""
    import deepspeed

    optimizer = scheduler = None
    if "optimizer" not in ds_config:
        o = cfg.optimizer
        groups = _param_groups(model, o.weight_decay)
        if optimizer_offloaded(ds_config):
            from deepspeed.ops.adam import DeepSpeedCPUAdam  # ZeRO-Offload needs DeepSpeed's CPU Adam

            optimizer = DeepSpeedCPUAdam(groups, lr=o.lr, betas=o.betas, eps=o.eps, adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)
        if "scheduler" not in ds_config:
            scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer, lambda i: lr_multiplier(i, sched=cfg.scheduler, total_steps=total_steps)
            )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=None if optimizer is not None else [p for p in model.parameters() if p.requires_grad],
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=ds_config,
    )
    return engine


def optimizer_offloaded(ds_config: dict[str, Any]) -> bool:
    """Whether the DeepSpeed config offloads optimizer states to CPU or NVMe."""
    off = (ds_config.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)


def build_teacher_engine(model: torch.nn.Module, ds_config: dict[str, Any]):
    """An optimizer-less ZeRO-3 engine around the frozen teacher (eval mode, no gradients)."""
    import deepspeed

    model.requires_grad_(False)
    model.eval()
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config)
    engine.module.eval()
    return engine


def current_lr(engine) -> float:
    """The learning rate in the student optimizer's first param group, as the optimizer will use it."""
    lrs = engine.get_lr()
    return float(lrs[0]) if lrs else float("nan")
