"""Logit-level losses as value + gradient in closed form: no autograd graph, a few passes over the logits.

Every loss here maps a block of logits [N, V] to per-row values and, when asked, the gradient of a weighted
sum of them with respect to those logits. The fused head (`losses/fused.py`) calls it chunk by chunk and
the full-logit path (`kd_loss`, `lm_loss` callers) calls it on the whole block through one autograd
Function, so a divergence written here gets the chunked, the cached-teacher and the full-logit path at once.

How a divergence supplies its gradient. Write J(q) for the divergence as a function of the student's
probabilities q = softmax(a) over some buckets (the vocabulary, or a top-k support, or a support plus one
bucket for the rest). A divergence gives, besides its value, r = q * dJ/dq (the gradient with respect to
log q, read as free coordinates). Through the softmax the gradient with respect to the logits a is then
dJ/da = r - q * sum(r), so r is needed only up to a multiple of q. When the buckets are not single tokens
(the rest bucket), a token j inside bucket b gets q_j / q_b of that bucket's r_b.

Passes (fp32, forward KL at T = 2, with LM): three log-softmaxes, one exp, the value (a difference and a row
dot), the student's division by T and two softmax gradients: about 85 bytes moved per logit outside the
GEMMs, against 172 for the naive autograd loss (`bench/traffic.py`). With `loss.fused_compile` the same
terms (`forward_kl_lm`) become one kernel per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dsdistill.losses.kd import _ABSENT, _mix, divergence, t2_factor, topk_support
from dsdistill.losses.lm import shifted_mask


@dataclass(frozen=True)
class DivergenceSpec:
    """Which divergence, with its parameters (see `losses/kd.py`)."""

    kind: str = "forward_kl"
    beta: float = 0.5
    alpha: float = 0.1

    def reduced(self) -> str:
        """The kind this spec computes: jsd and the skews at their endpoints are forward or reverse KL (or 0)."""
        k = self.kind
        if k == "jsd":
            return "forward_kl" if self.beta <= 0.0 else "reverse_kl" if self.beta >= 1.0 else "jsd"
        if k == "skew_kl":
            return "forward_kl" if self.alpha <= 0.0 else "zero" if self.alpha >= 1.0 else "skew_kl"
        if k == "skew_rkl":
            return "reverse_kl" if self.alpha <= 0.0 else "zero" if self.alpha >= 1.0 else "skew_rkl"
        return k


def _where_pos(mass: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return torch.where(mass > 0, x, 0.0)


def value_and_r(lp: torch.Tensor, lq: torch.Tensor, spec: DivergenceSpec, *, p=None, q=None, grad: bool = True):
    """(per-row J, r) for teacher log-probs `lp` and student log-probs `lq` over the same buckets [N, B].

    r = q * dJ/dq up to a multiple of q (None without `grad`). `p`, `q` are exp(lp), exp(lq) when the caller
    has them. The values use the same formulas as `kd.divergence`, which stays the reference. Slots of zero
    mass on a side (a repeated support slot, an underflowed bucket) contribute nothing to either."""
    kind = spec.reduced()
    if kind == "zero":
        zero = lq.new_zeros(lq.shape[:-1])
        return zero, (torch.zeros_like(lq) if grad else None)
    p = lp.exp() if p is None else p
    q = lq.exp() if q is None else q
    if kind == "forward_kl":
        value = (p * _where_pos(p, lp - lq)).sum(-1)
        return value, (-p if grad else None)
    if kind == "reverse_kl":
        d = _where_pos(q, lq - lp)
        return (q * d).sum(-1), (q * d if grad else None)
    if kind == "tv":
        value = 0.5 * (p - q).abs().sum(-1)
        return value, (0.5 * q * torch.sign(q - p) if grad else None)
    value = divergence(lp, lq, spec.kind, beta=spec.beta, alpha=spec.alpha)
    if not grad:
        return value, None
    if kind == "jsd":  # dJ/dq = (1 - beta) log(q / m), m = beta p + (1 - beta) q
        return value, (1 - spec.beta) * q * _where_pos(q, lq - _mix(lp, lq, spec.beta))
    if kind == "skew_kl":  # J = KL(p || m), m = alpha p + (1 - alpha) q: dJ/dq = -(1 - alpha) p / m
        a = spec.alpha
        return value, -(1 - a) * _where_pos(p, (lp + lq - _mix(lp, lq, a)).exp())
    if kind == "skew_rkl":  # J = KL(q || m), m = alpha q + (1 - alpha) p: dJ/dq = log(q / m) + 1 - alpha q / m
        a = spec.alpha
        ratio = _where_pos(q, lq - _mix(lq, lp, a))
        return value, q * (ratio - a * ratio.exp())
    raise ValueError(f"unknown divergence {spec.kind!r}")


@dataclass(frozen=True)
class SparseSide:
    """A teacher known only on a support per row (a cache or a server): its bucket log-probs at the loss's
    temperature [N, k + 1] (the k tokens, then the rest) over `ids` [N, k]."""

    ids: torch.Tensor
    logp: torch.Tensor
    absent: Optional[torch.Tensor] = None
    """[N, k] slots holding no token (`SparseTeacher.absent`), or None."""


def softmax_grad(go: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
    """go - softmax * sum(go): the gradient with respect to logits of a loss whose gradient with respect to
    their log-softmax `ls` is `go` (read as free coordinates). One op: PyTorch's own log-softmax backward."""
    return torch._log_softmax_backward_data(go, ls, -1, ls.dtype)


def row_dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """sum(x * y, -1) per row. Off CUDA a batched dot product, which reads each operand once and writes no
    [N, V] product; on CUDA the product and sum (a batched GEMM there could run in TF32)."""
    if x.is_cuda:
        return (x * y).sum(-1)
    return torch.bmm(x.unsqueeze(1), y.unsqueeze(2)).view(x.shape[:-1])


def kd_rows(
    a: torch.Tensor,
    teacher,
    spec: DivergenceSpec,
    *,
    top_k: Optional[int] = None,
    rest: bool = False,
    support: str = "auto",
    grad: bool = True,
):
    """KD between student logits `a` [N, V] and a teacher, both already divided by T: (per-row divergence
    J, go, m, ls). ls is the student's log-softmax; with `grad`, m x `softmax_grad(go, ls)` is dJ/da (see the
    module docstring); go is the caller's to modify.

    `teacher`: dense logits [N, V] at T, or a `SparseSide`. The support follows `kd.topk_support`."""
    ls = torch.log_softmax(a, dim=-1)
    if isinstance(teacher, SparseSide):
        value, go = _on_buckets(ls, teacher.ids, teacher.absent, teacher.logp, spec, rest=True, grad=grad)
        return value, go, 1.0, ls
    lt = torch.log_softmax(teacher, dim=-1, dtype=a.dtype)  # a half-precision teacher is read as fp32 here
    if top_k is None or top_k >= a.size(-1):
        p = lt.exp()
        if spec.reduced() == "forward_kl":  # the common case: one difference and a row dot; the gradient is q - p
            # (the difference first: sum p lt - sum p ls would cancel two entropy-sized sums for a small KL)
            value = row_dot(p, lt - ls)
            return value, (p if grad else None), -1.0, ls
        value, r = value_and_r(lt, ls, spec, p=p, grad=grad)
        return value, r, 1.0, ls
    idx, dup = topk_support(ls, lt, top_k, spec.kind, support)
    lp = _buckets(lt, lt.exp() if rest else None, idx, dup, rest)
    value, go = _on_buckets(ls, idx, dup, lp, spec, rest=rest, grad=grad)
    return value, go, 1.0, ls


def _buckets(full_lp: torch.Tensor, full_p: Optional[torch.Tensor], idx, dup, rest: bool):
    """Log-probs over the support (repeated slots hold no mass), renormalised, or with a rest bucket whose
    mass is summed over the tail itself (no 1 - kept cancellation)."""
    top = full_lp.gather(-1, idx)
    if dup is not None:
        top = top.masked_fill(dup, _ABSENT)
    if not rest:
        return torch.log_softmax(top, dim=-1)
    assert full_p is not None
    tail = full_p.scatter(-1, idx, 0.0).sum(-1, keepdim=True)
    if dup is not None:  # a row whose every slot holds no token: the id they repeat is in the tail after all
        tail = tail + torch.where(dup.all(-1, keepdim=True), full_p.gather(-1, idx[:, :1]), 0.0)
    return torch.cat([top, tail.log()], dim=-1)


def _on_buckets(ls, idx, dup, lp, spec: DivergenceSpec, *, rest: bool, grad: bool):
    q = ls.exp() if rest else None
    lq = _buckets(ls, q, idx, dup, rest)
    qb = lq.exp()
    value, rb = value_and_r(lp, lq, spec, q=qb, grad=grad)
    if rb is None:
        return value, None
    k = idx.size(-1)
    if rest:
        # a tail token j carries q_j / q_rest of the rest bucket's r; a support token its own slot's r
        assert q is not None
        share = torch.where(qb[:, k:] > 0, rb[:, k:] / qb[:, k:].clamp_min(torch.finfo(qb.dtype).tiny), 0.0)
        go = q.mul_(share)
        go.scatter_add_(-1, idx, rb[:, :k] - qb[:, :k] * share)  # repeated slots: q = r = 0, they add nothing
        return value, go
    # renormalised over the support: its own softmax's gradient, whose rows sum to 0 (so `softmax_grad`
    # leaves it as it is)
    go = torch.zeros_like(ls)
    go.scatter_add_(-1, idx, rb - qb * rb.sum(-1, keepdim=True))
    return value, go


def lm_rows(ls1: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row next-token cross-entropy from the log-softmax at T = 1."""
    return -ls1.gather(-1, targets[:, None]).squeeze(-1)


@dataclass(frozen=True)
class KDLMTerms:
    """The KD and LM terms of one block of rows, in closed form: `rows` gives the per-row KD (unscaled), the
    per-row LM and, with `coef_kd`/`coef_lm`, the gradient of coef_kd * T^2 * KD + coef_lm * LM (tv: no T^2)
    with respect to the student's raw logits."""

    temperature: float
    spec: DivergenceSpec
    top_k: Optional[int] = None
    rest: bool = False
    support: str = "auto"
    want_kd: bool = True
    want_lm: bool = True

    def one_expression(self, dense_teacher: bool) -> bool:
        """Whether `forward_kl_lm` computes these terms (what `loss.fused_compile` compiles): a dense teacher,
        forward KL on the whole vocabulary (or no KD)."""
        if not self.want_kd:
            return True
        return dense_teacher and self.top_k is None and self.spec.reduced() == "forward_kl"

    def rows(
        self,
        s: torch.Tensor,
        teacher,
        targets: Optional[torch.Tensor],
        *,
        coef_kd: float,
        coef_lm: float,
        grad: bool,
        teacher_at_t: bool = False,
        consume: bool = True,
    ):
        """s: raw student logits [N, V] (fp32 or fp64; with `consume` it may be overwritten). teacher: raw
        dense logits (already divided by T with `teacher_at_t`; with `consume` overwritten too; half precision
        is read as fp32), a `SparseSide` at T, or None.

        Returns (kd per row or None, lm per row or None, g, factor): the gradient of the weighted sum with
        respect to s is factor x g (a scalar left to the caller's GEMMs, which scale for free), or g is None."""
        T = self.temperature
        kd = lm = go = ls = None
        want_kd, want_lm = self.want_kd, self.want_lm and targets is not None
        lm_grad = grad and want_lm and coef_lm != 0.0
        kd_factor = coef_kd * t2_factor(self.spec.kind, T) / T if grad and want_kd else 0.0
        ls1 = None
        if want_lm and T != 1.0:  # LM at T = 1 first: then s can be divided by T in place
            assert targets is not None
            ls1 = torch.log_softmax(s, dim=-1)
            lm = lm_rows(ls1, targets)
        if want_kd:
            a = s if T == 1.0 else s.mul_(1.0 / T) if consume else s * (1.0 / T)
            t = teacher
            if not (isinstance(teacher, SparseSide) or T == 1.0 or teacher_at_t):
                t = teacher.mul_(1.0 / T) if consume and teacher.dtype == s.dtype else teacher.to(s.dtype) * (1.0 / T)
            kd, go, m, ls = kd_rows(
                a, t, self.spec, top_k=self.top_k, rest=self.rest, support=self.support, grad=kd_factor != 0.0
            )
            kd_factor *= m
        if want_lm and T == 1.0:
            assert targets is not None
            if ls is None:
                ls = torch.log_softmax(s, dim=-1)
            lm = lm_rows(ls, targets)
        if go is None and not lm_grad:
            return kd, lm, None, 0.0
        # the gradient is F x softmax_grad(go', ls'): the LM's -one-hot joins go (divided by F) and, at T != 1,
        # the KD part first takes its own softmax_grad and then the LM's log-softmax at T = 1 (whose softmax_grad
        # leaves the KD part alone: its rows already sum to 0)
        if go is None:  # LM alone: -coef_lm x softmax_grad(one-hot)
            factor, go, onehot = -coef_lm, torch.zeros_like(s), 1.0
        else:
            factor, onehot = kd_factor, -coef_lm / kd_factor if lm_grad else 0.0
            if ls1 is not None:
                assert ls is not None
                go = softmax_grad(go, ls)
                if not onehot:
                    return kd, lm, go, factor
        if onehot:
            assert targets is not None
            go.scatter_add_(-1, targets[:, None], go.new_full((go.size(0), 1), onehot))
        last = ls1 if ls1 is not None else ls
        assert last is not None
        return kd, lm, softmax_grad(go, last), factor


def forward_kl_lm(
    s: torch.Tensor,
    t: Optional[torch.Tensor],
    targets: torch.Tensor,
    temperature: float,
    kd_scale: float,
    coef_lm: float,
    want_kd: bool,
    want_lm: bool,
    grad: bool,
    teacher_at_t: bool,
):
    """The common case -- a dense teacher, forward KL at T, LM at 1 -- as one out-of-place expression, for
    `torch.compile`: Inductor fuses it into one kernel per chunk that reads the two logit blocks and writes
    the gradient, with no [rows, V] intermediate in memory (the eager `KDLMTerms.rows` needs several).
    Returns (kd per row, lm per row, kd_scale x dKD/ds + coef_lm x dLM/ds), each None when not asked."""
    kd = lm = g = None
    if want_lm:
        ls1 = torch.log_softmax(s, dim=-1)
        hit = torch.arange(s.size(-1), device=s.device)[None, :] == targets[:, None]
        lm = -torch.where(hit, ls1, 0.0).sum(-1)
        if grad:
            g = coef_lm * (ls1.exp() - hit.to(s.dtype))
    if want_kd:
        assert t is not None
        ls = torch.log_softmax(s * (1.0 / temperature), dim=-1)
        lt = torch.log_softmax(t if teacher_at_t else t * (1.0 / temperature), dim=-1)
        p = lt.exp()
        kd = (p * (lt - ls)).sum(-1)
        if grad:
            gk = kd_scale * (ls.exp() - p)
            g = gk if g is None else g + gk
    return kd, lm, g


class _FullLogits(torch.autograd.Function):
    """KD (+ LM) over whole [B, S, V] logits with the closed-form gradient: the full-logit path's autograd
    node. Every position is a row (the last one and ignored ones masked), so no slice is copied."""

    @staticmethod
    def forward(ctx, s3, t3, labels, ignore_index: int, terms: KDLMTerms, coef_kd: float, coef_lm: float):
        v = s3.size(-1)
        dtype = torch.float64 if s3.dtype == torch.float64 else torch.float32
        s = s3.detach().reshape(-1, v).to(dtype)
        t = t3.detach().reshape(-1, v).to(dtype) if t3 is not None else None
        nxt = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], ignore_index)], dim=1).reshape(-1)
        mask = nxt != ignore_index
        targets = torch.where(mask, nxt, 0)
        need = ctx.needs_input_grad[0]
        kd, lm, g, factor = terms.rows(s, t, targets, coef_kd=coef_kd, coef_lm=coef_lm, grad=need, consume=False)
        zero = s.new_zeros(())
        kd_sum = torch.where(mask, kd, 0.0).sum() if kd is not None else zero
        lm_sum = torch.where(mask, lm, 0.0).sum() if lm is not None else zero
        if g is not None:
            g = torch.where(mask[:, None], g, 0.0)
        ctx.save_for_backward(g if g is not None else zero)
        ctx.meta = (g is not None, factor, s3.shape, s3.dtype)
        ctx.mark_non_differentiable(kd_sum, lm_sum)
        return coef_kd * t2_factor(terms.spec.kind, terms.temperature) * kd_sum + coef_lm * lm_sum, kd_sum, lm_sum

    @staticmethod
    def backward(ctx, g_out, *_unused):
        (g,) = ctx.saved_tensors
        has, factor, shape, dtype = ctx.meta
        out = (g * (g_out * factor)).to(dtype).view(shape) if has else None
        return out, None, None, None, None, None, None


def full_logits_kd(s: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, ignore_index: int, terms: KDLMTerms):
    """(T^2 x divergence summed over the positions whose next label counts, the divergence summed),
    differentiable in `s` through the closed-form gradient. s, teacher: [B, S, V] logits at T = 1."""
    combined, kd_sum, _ = _FullLogits.apply(s, teacher, labels, ignore_index, terms, 1.0, 0.0)
    return combined, kd_sum


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float,
    ignore_index: int = -100,
    top_k: Optional[int] = None,
    top_k_rest: bool = False,
    top_k_support: str = "auto",
    divergence_kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
):
    """Summed T^2 x divergence (tv: unscaled, see `t2_factor`) over valid positions.

    Both logits are [B, S, V] over the same vocabulary; position t is valid when labels[:, t+1] is not
    `ignore_index` (the positions the LM loss uses). Computed in at least fp32.
    Returns (sum, {"count": valid tokens, "kl": summed divergence without the T^2 factor}).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ")
    mask = shifted_mask(labels, ignore_index)
    # every position is a row, the ones without a counted next label masked: static shapes, so the host never
    # waits for a count; value and gradient in closed form (`closed_form.py`), as the fused head per chunk
    terms = KDLMTerms(
        temperature=temperature,
        spec=DivergenceSpec(divergence_kind, beta, alpha),
        top_k=top_k,
        rest=top_k_rest,
        support=top_k_support,
        want_lm=False,
    )
    total, raw = full_logits_kd(student_logits, teacher_logits, labels, ignore_index, terms)
    return total, {"count": mask.sum(), "kl": raw.detach()}
