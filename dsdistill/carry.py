"""Resume a checkpoint into an engine laid out differently: another ZeRO stage, world size or precision, or
other curriculum components (aux modules).

DeepSpeed restores its own checkpoints only into the layout that wrote them, and its universal-checkpoint
conversion (0.19.8) does not yet load a ZeRO-1/2 checkpoint into ZeRO-3. So this reads the checkpoint into one
full fp32 tensor per parameter - the master weights and both Adam moments - and writes each into the new
engine's partitions through DeepSpeed's fragment API (`safe_set_full_*`), which any stage, world size and
offload supports. Then the low-precision copies are refreshed from the masters, and the optimizer step, the LR
schedule and the loop state are restored as a plain resume would. A parameter the checkpoint lacks (a new aux
module) or holds in another shape starts fresh; the caller says so in one line.

Everything is read under `checkpoint.safe_unpickling` (plain tensors and data, no code). Ranks take turns
(barriers), so one node holds one rank's consolidated copy at a time: about 12 bytes per parameter.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

MOMENTS = ("exp_avg", "exp_avg_sq")
"""The optimizer states carried per parameter (Adam's; another optimizer's start fresh)."""


@dataclass
class Carried:
    """What a carry restored: the loop state saved beside the weights, and the parameters that start fresh."""

    client: dict[str, Any]
    fresh: list[str] = field(default_factory=list)
    """Trainable parameters of the new engine the checkpoint did not hold (or held in another shape)."""
    dropped: list[str] = field(default_factory=list)
    """Parameters the checkpoint held that the new engine has not (a component left the curriculum)."""
    moments: bool = True
    """Whether the optimizer moments were carried (False: the old optimizer kept none that Adam reads)."""


def _model_state(where: Path) -> dict[str, Any]:
    """The engine-level state DeepSpeed saved (steps, LR schedule, our client state): one model-states file."""
    files = sorted(where.glob("mp_rank_*_model_states.pt")) or sorted(where.glob("zero_pp_rank_0_mp_rank_*_model_states.pt"))
    if not files:
        raise ValueError(f"no model-states file in '{where}'")
    # mapped, not read: a ZeRO-1/2 model-states file also holds the whole module, which is not wanted here
    return torch.load(files[0], map_location="cpu", mmap=True, weights_only=True)


def _consolidated(where: Path) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], int]:
    """(fp32 weights, {moment: tensors}, optimizer step) of every trainable parameter, whole, by name."""
    from deepspeed.utils import zero_to_fp32 as zf

    with contextlib.redirect_stdout(io.StringIO()):
        model_states = zf.parse_model_states(zf.get_model_state_files(str(where)))
    shards = [
        torch.load(f, map_location="cpu", mmap=True, weights_only=True)["optimizer_state_dict"]
        for f in zf.get_optim_files(str(where))
    ]
    stage = shards[0]["zero_stage"]
    world = shards[0]["partition_count"]
    world = max(world) if isinstance(world, list) else world
    if world != len(shards):
        raise ValueError(f"'{where}' holds {len(shards)} optimizer shards for a world of {world}")
    flat_key, inner_key = (
        ("single_partition_of_fp32_groups", "base_optimizer_state")
        if stage <= 2
        else ("fp32_flat_groups", "optimizer_state_dict")
    )
    paddings = shards[0].get("param_alignment_paddings")
    trainable = {name for shapes in model_states[0].param_shapes for name in shapes}

    def whole(flat: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        # the moments are partitioned exactly like the fp32 masters, so DeepSpeed's own merge reassembles both
        with contextlib.redirect_stdout(io.StringIO()):  # its progress lines, once per rank and tensor kind
            if stage <= 2:
                merged = zf._get_fp32_state_dict_from_zero2_checkpoint(world, flat, model_states, True, paddings)
            else:
                merged = zf._get_fp32_state_dict_from_zero3_checkpoint(world, flat, model_states, True)
        return {k: v for k, v in zf.to_torch_tensor(merged).items() if k in trainable}

    masters = [list(s[flat_key]) for s in shards]
    weights = whole(masters)
    moments: dict[str, dict[str, torch.Tensor]] = {}
    states = [s[inner_key]["state"] for s in shards]
    step = 0
    if all(len(st) == len(m) for st, m in zip(states, masters)):
        groups = range(len(masters[0]))
        if all(key in st[g] for st in states for g in groups for key in MOMENTS):
            for key in MOMENTS:
                moments[key] = whole([[st[g][key] for g in groups] for st in states])
            raw = states[0][0].get("step", 0)
            step = int(raw.item() if torch.is_tensor(raw) else raw)
    return weights, moments, step


def _optimizers(engine) -> list[torch.optim.Optimizer]:
    """The torch optimizers that hold this rank's states (ZeRO-3 keeps a second one for device-side subgroups
    when others are offloaded)."""
    opt = engine.optimizer
    return [o for o in (opt.optimizer, getattr(opt, "backup_optimizer", None)) if o is not None]


def _refresh_low_precision(engine) -> None:
    """Copy the fp32 masters just written into the parameters the forward uses (a collective on ZeRO-1/2)."""
    opt = engine.optimizer
    if hasattr(opt, "update_lp_params"):  # ZeRO-1/2 (and its fp32 case: the "low precision" copy is fp32)
        opt.update_lp_params()
        return
    for i, fp32 in enumerate(opt.fp32_partitioned_groups_flat):  # ZeRO-3: this rank's partitions
        if fp32.numel():
            opt.fp16_partitioned_groups_flat[i].data.copy_(fp32.data)
    for i, flat in enumerate(opt.fp16_partitioned_groups_flat):
        for part, view in zip(opt.fp16_partitioned_groups[i], opt.unflatten(flat, opt.fp16_partitioned_groups[i])):
            part.data = view.data


def _zero_step(base: torch.optim.Optimizer, group: dict, flats: list[torch.Tensor]) -> None:
    """One step of `group` over `flats` at zero LR and weight decay and zero gradients: the optimizer creates
    its states and no weight moves."""
    kept = {k: group[k] for k in ("lr", "weight_decay") if k in group}
    grads = [f.grad for f in flats]
    for f, g in zip(flats, grads):
        f.grad = torch.zeros_like(f) if g is None else g.zero_()
    group.update({k: 0.0 for k in kept})
    base.step()
    group.update(kept)
    for f, g in zip(flats, grads):
        f.grad = g


def _ensure_states(engine) -> None:
    """DeepSpeed's ZeRO optimizers create their states at the first step; create them now so the moments have
    somewhere to go."""
    opt = engine.optimizer
    if hasattr(opt, "fp32_partitioned_groups_flat"):  # ZeRO-3 steps one subgroup at a time, as here
        for sub, flat in enumerate(opt.fp32_partitioned_groups_flat):
            on_device = opt.offload_optimizer and opt.subgroup_to_device[sub] != "cpu"
            base = opt.backup_optimizer if on_device else opt.optimizer
            if not base.state.get(flat):
                group = base.param_groups[opt.sub_group_to_group_id[sub]]
                group["params"] = [flat]
                _zero_step(base, group, [flat])
                group["params"] = []
        return
    base, flats = opt.optimizer, opt.single_partition_of_fp32_groups  # ZeRO-1/2
    for group, flat in zip(base.param_groups, flats):
        if not base.state.get(flat):
            _zero_step(base, group, [flat])
    opt._lazy_init_hp_params_optimizer_state()  # point each parameter's fragment at the new states


def _set_step(engine, step: int) -> None:
    """Adam's bias-correction step, in every optimizer state of this rank."""
    for state in (st for o in _optimizers(engine) for st in o.state.values()):
        if "step" in state:
            if torch.is_tensor(state["step"]):
                state["step"].fill_(step)
            else:
                state["step"] = step


def load(engine, where: Path) -> Carried:
    """Carry the checkpoint at `where` into `engine` (a collective: every rank calls it)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    params = {n: p for n, p in engine.module.named_parameters() if p.requires_grad}
    carried = Carried(client={})
    for turn in range(world):
        if turn == rank:
            weights, moments, step = _consolidated(where)
            carried.moments = bool(moments)
            if moments:
                _ensure_states(engine)
            for name, p in params.items():
                shape = tuple(getattr(p, "ds_shape", p.shape))
                value = weights.get(name)
                if value is None or tuple(value.shape) != shape:
                    carried.fresh.append(name)
                    continue
                safe_set_full_fp32_param(p, value.to(p.device))
                for key, by_name in moments.items():
                    safe_set_full_optimizer_state(p, by_name[name].to(p.device), key)
            carried.dropped = sorted(set(weights) - set(params))
            del weights, moments
            _set_step(engine, step)
            sd = _model_state(where)
        if world > 1:
            dist.barrier()
    _refresh_low_precision(engine)
    if engine.lr_scheduler is not None and sd.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(sd["lr_scheduler"])
        # the schedule's position came back; the LR it set is in the optimizer's groups, which start fresh here
        for group, lr in zip(engine.optimizer.param_groups, engine.lr_scheduler.get_last_lr()):
            group["lr"] = lr
    engine.global_steps = int(sd.get("global_steps", 0))
    engine.global_samples = int(sd.get("global_samples", 0))
    engine.skipped_steps = int(sd.get("skipped_steps", 0))
    engine_keys = {"module", "optimizer", "lr_scheduler", "global_steps", "global_samples", "skipped_steps"}
    carried.client = {k: v for k, v in sd.items() if k not in engine_keys}
    return carried
