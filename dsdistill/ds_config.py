"""DeepSpeed JSON as the user wrote it, with "auto" values filled from the run config.

`resolve_student` / `resolve_teacher` are the only places that do batch arithmetic:
micro batch x gradient accumulation x world size = global batch. A value the user set explicitly that
disagrees with the run config is a one-line `ConfigError`; an "auto" left that we cannot fill is one too.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

from dsdistill.config import RunConfig, read_mapping
from dsdistill.errors import ConfigError

DEFAULT_STUDENT: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 2, "overlap_comm": True, "contiguous_gradients": True},
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}

DEFAULT_TEACHER: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": "auto",
    "bf16": {"enabled": "auto"},
    "fp16": {"enabled": "auto"},
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto", "stage3_prefetch_bucket_size": "auto"},
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
}


def load_user_config(value: str | dict | None, default: dict[str, Any], *, field: str) -> dict[str, Any]:
    """The DeepSpeed mapping from a path, an inline mapping, or the built-in default."""
    if value is None:
        return copy.deepcopy(default)
    if isinstance(value, dict):
        return copy.deepcopy(value)
    return read_mapping(Path(value), what=f"{field} DeepSpeed config")


def precision_of(cfg: RunConfig) -> str:
    """Resolve train.precision 'auto' to fp32/bf16 for this machine."""
    if cfg.train.precision != "auto":
        return cfg.train.precision
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


class _Filler:
    """Fills "auto" entries and checks explicit ones against the run config, with one-line errors."""

    def __init__(self, data: dict[str, Any], field: str):
        self.data = data
        self.field = field

    def _node(self, path: str, create: bool = False):
        node = self.data
        parts = path.split(".")
        for part in parts[:-1]:
            if part not in node:
                if not create:
                    return None, parts[-1]
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"{self.field}: '{part}' must be a mapping")
        return node, parts[-1]

    def fill(self, path: str, value: Any, *, source: str, create: bool = True) -> None:
        """Set `path` to `value` if absent or "auto"; error if set explicitly to something else."""
        node, key = self._node(path, create=create)
        if node is None:
            return
        if key not in node:
            if create:
                node[key] = value
            return
        current = node[key]
        if current == "auto":
            node[key] = value
        elif value is not None and current != value:
            raise ConfigError(
                f'{self.field}: {path}={current!r} conflicts with {source}={value!r}; set it to "auto" or make them agree'
            )

    def leftover_autos(self, node=None, prefix="") -> list[str]:
        node = self.data if node is None else node
        found = []
        for k, v in node.items():
            p = f"{prefix}{k}"
            if v == "auto":
                found.append(p)
            elif isinstance(v, dict):
                found.extend(self.leftover_autos(v, p + "."))
        return found


def _fill_precision(f: _Filler, precision: str) -> None:
    for key in ("bf16", "fp16"):
        block = f.data.get(key)
        if isinstance(block, dict) and block.get("enabled") == "auto":
            block["enabled"] = precision == key
    bf16 = bool(f.data.get("bf16", {}).get("enabled"))
    fp16 = bool(f.data.get("fp16", {}).get("enabled"))
    if bf16 and fp16:
        raise ConfigError(f"{f.field}: bf16.enabled and fp16.enabled are both true; enable at most one")
    want = {"bf16": bf16, "fp16": fp16}
    if precision in want and not want[precision]:
        raise ConfigError(f"{f.field}: train.precision={precision!r} but {precision}.enabled is not true")
    if precision == "fp32" and (bf16 or fp16):
        raise ConfigError(f"{f.field}: train.precision='fp32' but {'bf16' if bf16 else 'fp16'}.enabled is true")


def layer_elements(config: Any) -> Optional[tuple[int, int]]:
    """(parameters of one decoder layer, of its largest "small" matrix) from a transformers config: the
    attention's q/o and k/v projections (grouped-query heads counted) and a gated MLP; None when the config
    does not say."""
    h = getattr(config, "hidden_size", None)
    inter = getattr(config, "intermediate_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if not (isinstance(h, int) and isinstance(inter, int) and isinstance(heads, int) and heads > 0):
        return None
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv_proj = h * kv * head_dim
    return 2 * h * heads * head_dim + 2 * kv_proj + 3 * h * inter, kv_proj


def _fill_zero_sizes(f: _Filler, hidden_size: int | None, *, frozen_layer: Optional[tuple[int, int]] = None) -> None:
    """ "auto" sizes. A frozen model (the teacher) prefetches a whole layer ahead while one computes, and keeps
    its norms, biases and grouped-query k/v projections whole on every rank (no gather each forward: about
    a tenth of a layer under GQA); a trained one takes HF's sizes from its width."""
    zero = f.data.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    sizes = {}
    if hidden_size:
        sizes = {
            "reduce_bucket_size": hidden_size * hidden_size,
            "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
            "stage3_param_persistence_threshold": 10 * hidden_size,
        }
    if frozen_layer is not None:
        layer, small = frozen_layer
        sizes["stage3_prefetch_bucket_size"] = layer
        sizes["stage3_param_persistence_threshold"] = max(sizes.get("stage3_param_persistence_threshold", 0), small + 1)
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            if key in sizes:
                zero[key] = sizes[key]
            else:
                del zero[key]  # DeepSpeed's own default


def _check_shapes(f: _Filler) -> None:
    """The blocks dsdistill and DeepSpeed read, with the types they need: one line naming the key, before
    DeepSpeed would fail at train time with a traceback."""
    for key in ("bf16", "fp16", "zero_optimization", "optimizer", "scheduler"):
        if key in f.data and not isinstance(f.data[key], dict):
            raise ConfigError(f"{f.field}: {key} must be a mapping (e.g. {key}: {{...}}), got {f.data[key]!r}")
    stage = (f.data.get("zero_optimization") or {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int):
        raise ConfigError(f"{f.field}: zero_optimization.stage must be an integer (1, 2 or 3), got {stage!r}")
    for key, known in (("optimizer", _optimizer_known), ("scheduler", _scheduler_known)):
        block = f.data.get(key)
        if block is None:
            continue
        kind = block.get("type")
        if not isinstance(kind, str) or not known(kind):
            raise ConfigError(f"{f.field}: {key}.type {kind!r} is not a DeepSpeed {key} ({_names(key)})")
        if "params" in block and not isinstance(block["params"], dict):
            raise ConfigError(f"{f.field}: {key}.params must be a mapping, got {block['params']!r}")


def _optimizer_known(kind: str) -> bool:
    import torch
    from deepspeed.runtime import config as ds

    builtin = {v for k, v in vars(ds).items() if k.endswith("_OPTIMIZER") and isinstance(v, str)}
    return kind.lower() in {*ds.DEEPSPEED_OPTIMIZERS, *builtin} or isinstance(getattr(torch.optim, kind, None), type)


def _scheduler_known(kind: str) -> bool:
    from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

    return kind in VALID_LR_SCHEDULES


def _names(key: str) -> str:
    if key == "scheduler":
        from deepspeed.runtime.lr_schedules import VALID_LR_SCHEDULES

        return "expected one of " + ", ".join(VALID_LR_SCHEDULES)
    from deepspeed.runtime import config as ds

    return "expected one of " + ", ".join(ds.DEEPSPEED_OPTIMIZERS) + " or a torch.optim class"


def lr_schedule(cfg: RunConfig, ds_student: dict[str, Any]) -> str:
    """Which LR schedule runs, in words (check and run_start say it)."""
    sched = ds_student.get("scheduler")
    if isinstance(sched, dict):
        return f"DeepSpeed {sched.get('type')} from deepspeed.student (run.yaml's scheduler is not used)"
    s = cfg.scheduler
    warm = f"warmup {s.warmup_ratio:g} of the steps" if s.warmup_ratio is not None else f"{s.warmup_steps} warmup steps"
    return f"run.yaml scheduler: {s.kind}, {warm}, peak lr {cfg.optimizer.lr:g}, final ratio {s.min_lr_ratio:g}"


def zero_stage(ds: dict[str, Any]) -> int:
    """ZeRO stage of a DeepSpeed mapping (0 when absent)."""
    return int((ds.get("zero_optimization") or {}).get("stage", 0))


def resolve_student(
    cfg: RunConfig, *, world_size: int, total_steps: int, warmup_steps: int, hidden_size: int | None = None
) -> dict[str, Any]:
    """The student's DeepSpeed config with every "auto" filled; checks the batch arithmetic."""
    field = "deepspeed.student"
    f = _Filler(load_user_config(cfg.deepspeed.student, DEFAULT_STUDENT, field=field), field)
    micro, accum = cfg.train.micro_batch_size, cfg.train.grad_accum
    f.fill("train_micro_batch_size_per_gpu", micro, source="train.micro_batch_size")
    f.fill("gradient_accumulation_steps", accum, source="train.grad_accum")
    f.fill(
        "train_batch_size",
        micro * accum * world_size,
        source=f"micro_batch_size*grad_accum*world_size ({micro}*{accum}*{world_size})",
    )
    if cfg.train.grad_clip is not None:
        f.fill("gradient_clipping", cfg.train.grad_clip, source="train.grad_clip")
    elif f.data.get("gradient_clipping") == "auto":
        del f.data["gradient_clipping"]
    _check_shapes(f)
    ignored = sorted({"kind", "min_lr_ratio"} & cfg.scheduler.model_fields_set) if "scheduler" in cfg.model_fields_set else []
    if isinstance(f.data.get("scheduler"), dict) and ignored:
        raise ConfigError(
            f"{field}: has a scheduler block ({f.data['scheduler'].get('type')}) and run.yaml's scheduler sets "
            f"{' and '.join(ignored)}, which that block would silently replace: two LR schedules; remove the "
            'block to use run.yaml\'s, or keep only warmup_steps/warmup_ratio in run.yaml (they fill its "auto" values)'
        )
    _fill_precision(f, precision_of(cfg))
    stage = zero_stage(f.data)
    if stage not in (1, 2, 3):
        raise ConfigError(
            f"{field}: zero_optimization.stage={stage}; expected 1, 2 or 3 (the non-finite step guard relies on ZeRO's gradient check)"
        )
    opt = f.data.get("optimizer")
    if isinstance(opt, dict):
        params = opt.setdefault("params", {})
        o = cfg.optimizer
        for key, value in (("lr", o.lr), ("weight_decay", o.weight_decay), ("betas", list(o.betas)), ("eps", o.eps)):
            if params.get(key) == "auto":
                params[key] = value
    sched = f.data.get("scheduler")
    if isinstance(sched, dict):
        params = sched.setdefault("params", {})
        fills = {
            "warmup_num_steps": warmup_steps,
            "total_num_steps": total_steps,
            "warmup_max_lr": cfg.optimizer.lr,
            "warmup_min_lr": 0.0,
        }
        for key, value in fills.items():
            if params.get(key) == "auto":
                params[key] = value
    _fill_zero_sizes(f, hidden_size)
    _check_no_auto(f)
    return f.data


def resolve_teacher(cfg: RunConfig, *, model_config: Any = None) -> dict[str, Any]:
    """The teacher's DeepSpeed config: ZeRO stage 3, no optimizer or scheduler, "auto" filled (sizes from the
    teacher's `model_config`)."""
    return teacher_zero3(
        cfg.deepspeed.teacher, micro_batch=cfg.train.micro_batch_size, precision=precision_of(cfg), model_config=model_config
    )


def teacher_zero3(source: str | dict | None, *, micro_batch: int, precision: str, model_config: Any = None) -> dict[str, Any]:
    """A frozen model's ZeRO-3 config (the run's teacher, or `teacher-serve` on several ranks): `source` (a
    path, a dict, or None for the bundled one) with "auto" filled."""
    field = "deepspeed.teacher"
    f = _Filler(load_user_config(source, DEFAULT_TEACHER, field=field), field)
    _check_shapes(f)
    for key in ("optimizer", "scheduler"):
        if key in f.data:
            raise ConfigError(f"{field}: has an '{key}' block; the teacher is frozen and takes none")
    stage = zero_stage(f.data)
    if stage != 3:
        raise ConfigError(
            f"{field}: zero_optimization.stage={stage}; the teacher engine must be stage 3 so no rank holds it whole"
        )
    # The teacher never steps an optimizer, so its batch size is bookkeeping only: fill it, never conflict.
    if f.data.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        f.data["train_micro_batch_size_per_gpu"] = micro_batch
    for key in ("gradient_accumulation_steps", "train_batch_size", "gradient_clipping"):
        if f.data.get(key) == "auto":
            del f.data[key]
    _fill_precision(f, precision)
    _fill_zero_sizes(f, getattr(model_config, "hidden_size", None), frozen_layer=layer_elements(model_config))
    _check_no_auto(f)
    return f.data


def _check_no_auto(f: _Filler) -> None:
    left = f.leftover_autos()
    if left:
        raise ConfigError(f'{f.field}: {left[0]} is "auto" but dsdistill has no run-config value to fill it; set it explicitly')
