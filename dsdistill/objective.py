"""The distillation objective: the curriculum-weighted sum of the active loss components.

Training and evaluation both call `forward_pair` (teacher then student forward, with captures) and
`component_sums` (per-micro-batch sums and unit counts), and build the objective from component means
with weights taken from the curriculum at the same optimizer step.
"""
from __future__ import annotations

import functools

from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.distributed as dist

from dsdistill import registry
from dsdistill.config import LossConfig
from dsdistill.losses import kd_loss, lm_loss, shifted_mask
from dsdistill.losses.attention import attention_loss, routing_attention_loss
from dsdistill.losses.contrastive import info_nce, mean_pool
from dsdistill.losses.hidden import feature_loss, gate_usage, layerwise_loss, load_balance_loss, routing_feature_loss
from dsdistill.student import LayerPlan

TEACHER_HIDDEN = {"feature", "layerwise", "contrastive", "routing_feature"}
TEACHER_ATTENTION = {"attention", "routing_attention_alignment"}


@dataclass
class Sums:
    """Per-component sums over a set of micro-batches, plus the extra diagnostics."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    fused: Optional[torch.Tensor] = None
    """Fused path: the differentiable coef-weighted KD+LM scalar (kd/lm `sums` are then detached values)."""


@dataclass
class Outputs:
    """Everything one micro-batch's teacher and student forwards produced."""

    labels: torch.Tensor
    student: dict
    teacher_logits: Optional[torch.Tensor]
    teacher_hidden: Optional[tuple] = None
    s_qk: dict = field(default_factory=dict)
    t_qk: dict = field(default_factory=dict)


def align_vocab(student_logits: torch.Tensor, teacher_logits: Optional[torch.Tensor], vocab: int):
    """Cut both logits to the shared tokenizer vocabulary (embedding matrices are often padded)."""
    if student_logits.size(-1) != vocab:
        student_logits = student_logits[..., :vocab]
    if teacher_logits is not None and teacher_logits.size(-1) != vocab:
        teacher_logits = teacher_logits[..., :vocab]
    return student_logits, teacher_logits


def unit_counts(labels: torch.Tensor, ignore_index: int) -> dict[str, int]:
    """How many units of each kind a micro-batch holds: valid tokens, sequences with any valid token, and
    one micro-batch (the unit of per-batch terms such as the router balance)."""
    mask = shifted_mask(labels, ignore_index)
    return {"token": int(mask.sum()), "sequence": int(mask.any(1).sum()), "layer": int(bool(mask.any()))}


def fused_chunk_rows(run) -> int:
    """Rows per fused chunk for this run's shapes and device, from the fused loss's memory model (sized
    once per process: on a GPU from the free memory at the first step)."""
    from dsdistill.models import DTYPES

    t = run.teacher_config
    dev = run.student.device if hasattr(run.student, "device") else torch.device("cpu")
    return _chunk_rows(run.vocab, run.student_config.hidden_size, getattr(t, "hidden_size", 0),
                       DTYPES[run.precision].itemsize, run.cfg.train.micro_batch_size * run.cfg.train.seq_len,
                       run.cfg.loss.fused_chunk_mib, torch.device(dev).type)


@functools.lru_cache(maxsize=8)
def _chunk_rows(vocab: int, s_width: int, t_width: int, t_bytes: int, tokens: int, budget_mib, device_type: str) -> int:
    from dsdistill.losses.fused import auto_chunk, default_budget, fixed_bytes

    budget = budget_mib << 20 if budget_mib else default_budget(torch.device(device_type))
    fixed = fixed_bytes(tokens=tokens, vocab=vocab, s_width=s_width, t_width=t_width, t_dtype_bytes=t_bytes, grads=True)
    return auto_chunk(vocab, s_width, budget_bytes=budget, fixed=fixed)


def kd_options(run, *, temperature: float, want_kd: bool, want_lm: bool):
    """Fused-loss options for this run (chunk sized from vocab unless set)."""
    from dsdistill.losses.fused import KDOptions

    c = run.cfg.loss
    chunk = c.fused_chunk or fused_chunk_rows(run)
    return KDOptions(temperature=temperature, divergence=c.kd_divergence, beta=c.kd_beta, alpha=c.kd_alpha, top_k=c.kd_top_k,
                     top_k_rest=c.kd_top_k_rest, chunk=chunk, want_kd=want_kd, want_lm=want_lm, compile=c.fused_compile)


def forward_pair(run, input_ids: torch.Tensor, labels: torch.Tensor, *, temperature: float,
                 coef_kd: float = 0.0, coef_lm: float = 0.0, teacher_weight: Optional[torch.Tensor] = None,
                 want_lm: bool = False) -> Outputs:
    """Teacher forward (no grad) then student forward for one micro-batch, with whatever the run's active
    components need (hidden states, captured attention, pooled teacher states).

    On the fused path the teacher stops at its final hidden state and KD+LM run chunked inside the
    student's head: `coef_kd`/`coef_lm` weight their gradient, `teacher_weight` is the teacher's full
    lm_head weight (gathered once per step by the caller) and `want_lm` forces the LM sums (eval).
    `temperature` is required (the curriculum's, at the caller's step): on the fused path KD runs here."""
    names = set(run.components)
    ignore = run.cfg.loss.ignore_index
    need_hidden = bool(names & TEACHER_HIDDEN)
    valid = torch.cat([shifted_mask(labels, ignore), torch.zeros_like(labels[:, :1], dtype=torch.bool)], dim=1)
    with torch.no_grad():
        t_out = run.teacher(input_ids=input_ids, output_hidden_states=need_hidden)
        t_hidden = t_out.hidden_states if need_hidden else None
        t_qk = run.teacher_capture.collect() if run.teacher_capture is not None else {}
        pooled = mean_pool(t_hidden[-1].float(), valid).to(t_hidden[-1].dtype) if "contrastive" in names else None
    fused = None
    if run.fused:
        from dsdistill.heads import FusedArgs

        want_kd = "kd" in names
        if want_kd and teacher_weight is None:  # callers in a loop gather it once per step and pass it in
            from dsdistill.heads import full_weight

            teacher_weight = full_weight(run.teacher_head_weight)
        options = kd_options(run, temperature=temperature, want_kd=want_kd, want_lm=want_lm or "lm" in names)
        fused = FusedArgs(labels=labels, teacher_hidden=t_out.logits if want_kd else None,
                          teacher_weight=teacher_weight if want_kd else None, coef_kd=coef_kd, coef_lm=coef_lm,
                          options=options, vocab=run.vocab, ignore_index=ignore)
    s_out = run.student(input_ids=input_ids, valid=valid, teacher_pooled=pooled, fused=fused)
    s_qk = run.student_capture.collect() if run.student_capture is not None else {}
    t_logits = None
    if not run.fused:
        s_out["logits"], t_logits = align_vocab(s_out["logits"], t_out.logits, run.vocab)
    return Outputs(labels=labels, student=s_out, teacher_logits=t_logits, teacher_hidden=t_hidden, s_qk=s_qk, t_qk=t_qk)


def _gather_teachers(t_emb: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' teacher embeddings (autograd-aware) and this rank's offset among them."""
    import torch.distributed.nn.functional as dist_fn

    parts = dist_fn.all_gather(t_emb.contiguous())
    return torch.cat(parts, dim=0), dist.get_rank() * t_emb.size(0)


def _one(name: str, out: Outputs, *, temperature: float, cfg: LossConfig, plan: LayerPlan):
    labels, s = out.labels, out.student
    ign = cfg.ignore_index
    if "fused" in s and name in ("kd", "lm"):
        _, m = s["fused"]
        return m[name], {"count": m["count"], "kl": m["kl"]}
    if name == "kd":
        return kd_loss(s["logits"], out.teacher_logits, labels, temperature=temperature, ignore_index=ign, top_k=cfg.kd_top_k,
                       top_k_rest=cfg.kd_top_k_rest, divergence_kind=cfg.kd_divergence, beta=cfg.kd_beta, alpha=cfg.kd_alpha)
    if name == "lm":
        return lm_loss(s["logits"], labels, ignore_index=ign)
    th = out.teacher_hidden
    if name == "feature":
        pairs = [(p, th[t]) for p, (_, t) in zip(s["feature"], plan.feature)]
        return feature_loss(pairs, labels, ignore_index=ign, metric=cfg.feature_metric, normalized=cfg.feature_normalize)
    if name == "layerwise":
        return layerwise_loss([(p, th[t]) for p, (_, t) in zip(s["layerwise"], plan.layerwise)], labels, ignore_index=ign)
    if name == "attention":
        pairs = [(out.s_qk[si], out.t_qk[ti]) for si, ti in plan.attention]
        return attention_loss(pairs, labels, ignore_index=ign, chunk=cfg.attention_chunk)
    if name == "contrastive":
        s_emb, t_emb = s["contrastive"]
        valid = shifted_mask(labels, ign).any(1)
        negatives, offset = None, 0
        if cfg.contrastive_gather and dist.is_initialized() and dist.get_world_size() > 1:
            negatives, offset = _gather_teachers(t_emb)
        return info_nce(s_emb, t_emb, temperature=cfg.contrastive_temperature, valid=valid, teacher_negatives=negatives, offset=offset)
    if name == "routing_feature":
        return routing_feature_loss(s["routing_feature"], list(th[1:]), s["gates"], labels, ignore_index=ign)
    if name == "routing_load_balance":
        value, m = load_balance_loss(s["gates"])
        return (value, m) if shifted_mask(labels, ign).any() else (value * 0.0, {"count": 0})
    if name == "routing_attention_alignment":
        rows = [si - 1 for si in plan.routed_attention_students]
        gates = s["gates"][rows] if s["gates"].dim() == 2 else s["gates"][:, rows]
        teacher_qk = [out.t_qk[j] for j in range(1, plan.n_teacher + 1)]
        student_qk = [out.s_qk[si] for si in plan.routed_attention_students]
        return routing_attention_loss(student_qk, teacher_qk, gates, labels, ignore_index=ign, chunk=cfg.attention_chunk)
    raise ValueError(f"component {name!r} is not computed by this version")


def component_sums(names, out: Outputs, *, temperature: float, loss_cfg: LossConfig, plan: LayerPlan,
                   grad: Optional[set[str]] = None) -> Sums:
    """Every named component on one micro-batch, as sums over its units. Components outside `grad`
    (e.g. weight 0 at this step) are computed without building a graph."""
    result = Sums()
    for name in names:
        ctx = nullcontext() if grad is None or name in grad else torch.no_grad()
        with ctx:
            total, m = _one(name, out, temperature=temperature, cfg=loss_cfg, plan=plan)
        if not torch.is_tensor(total):
            total = torch.tensor(float(total), device=out.labels.device)
        result.sums[name] = total
        result.counts[name] = m["count"]
        if name == "kd":
            result.extras["kd_kl"] = m["kl"]
    if "gates" in out.student:
        result.extras["gate_usage"] = gate_usage(out.student["gates"])
    if "fused" in out.student:
        result.fused = out.student["fused"][0]
    return result


def weighted_sum(sums: Sums, *, weights: dict[str, float], normalizers: dict[str, float]) -> torch.Tensor:
    """sum_c w_c * sum_c / N_c: this micro-batch's share of the window objective (differentiable)."""
    terms = [sums.sums[n] * (weights[n] / max(normalizers[n], 1)) for n in sums.sums if weights.get(n, 0.0) != 0.0]
    if sums.fused is not None:
        # fused KD/LM: the value comes from their exact sums above; the gradient from the fused scalar,
        # whose coefficients the caller set to the same weight / normaliser (its value is added as 0)
        terms.append(sums.fused - sums.fused.detach())
    if not terms:
        return next(iter(sums.sums.values())) * 0.0
    total = terms[0]
    for t in terms[1:]:
        total = total + t
    return total


def unit_of(name: str) -> str:
    return registry.COMPONENTS[name].unit


def objective_value(means: dict[str, float], weights: dict[str, float]) -> float:
    """The objective from component means: sum_c w_c * mean_c. Used for both train and eval records."""
    return float(sum(weights[n] * means[n] for n in weights if n in means))
