"""Chunk-likelihood matching (`teacher.cross_tokenizer.method: chunk_likelihood`): a teacher with another
tokenizer compared on the likelihood each model gives to the same stretch of text, whatever its tokens.

A chunk is the text between two consecutive pairs (`crosstok.Chunks`). Its log-likelihood under a model is the
sum of the model's log-probabilities of its own tokens of that text: l_t for the teacher, l_s for the student.
Both are probabilities of one event, "the next text is this chunk", so they compare as two Bernoulli
distributions (the chunk, or anything else): the divergence per chunk is

    f(l_t, l_s) = p (l_t - l_s) + (1 - p) (log(1 - p) - log(1 - q)),   p = exp(l_t / T), q = exp(l_s / T)

(the binary KL from teacher to student, on likelihoods raised to 1/T), summed over chunks. No vocabulary has to
be shared, and a chunk of many tokens on one side and one on the other compares as well as 1:1. What it does not
see is the distribution over the text that did not come: one number per chunk instead of a row per position
(`shared_topk` gives the row where the next tokens are shared).

The student's side runs in the fused head's manner: pass 1 forms the chunk's logits block by block and keeps
each row's log-probability of its label (no graph); the chunk sums then give f and its derivative per chunk;
pass 2 forms the logits again and takes each row's gradient, f'(its chunk) (onehot - softmax), into the hidden
state's and head's gradient buffers at once. Full [rows, vocab] logits never exist, and nothing of the head is
needed after the forward (as with `fused.fused_kd_lm`, which ZeRO-3's gathered head relies on).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dsdistill.losses.fused import _mm_f32, chunked_head

LOG_FLOOR = -1e-6
"""A chunk's log-likelihood is kept at or below this (q < 1): log(1 - q) stays finite."""


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate at both ends."""
    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def chunk_divergence(teacher: torch.Tensor, student: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-chunk binary KL from teacher to student, its derivative in the student's chunk log-likelihood), in
    float64, from the chunks' log-likelihoods [C] (`teacher` may be any float tensor; no gradient is taken)."""
    lt = (teacher.double() / temperature).clamp(max=LOG_FLOOR)
    ls = (student.double() / temperature).clamp(max=LOG_FLOOR)
    p = lt.exp()
    l1t, l1s = _log1mexp(lt), _log1mexp(ls)
    value = p * (lt - ls) + (1 - p) * (l1t - l1s)
    # d/d ls of -p ls - (1 - p) log(1 - e^ls) is -p + (1 - p) q / (1 - q); d ls / d l_s = 1 / T
    grad = (-p + (1 - p) * torch.exp(ls - l1s)) / temperature
    return value, grad


def label_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each row's log-probability of its target under logits hidden @ weight^T ([N, D], [V, D], [N]), block by
    block, without a graph: [N] fp32 (fp64 for fp64 inputs)."""
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    out = torch.empty(hidden.size(0), dtype=acc, device=hidden.device)
    w = weight.detach()
    with torch.no_grad():
        for lo in range(0, hidden.size(0), chunk):
            hi = min(hidden.size(0), lo + chunk)
            logits = _mm_f32(hidden[lo:hi].detach().to(w.dtype), w.T).to(acc)
            out[lo:hi] = logits.gather(1, targets[lo:hi, None]).squeeze(1) - torch.logsumexp(logits, dim=-1)
    return out


@dataclass
class RowWeightedLogprob:
    """The fused head's `LogitLoss` of pass 2: the gradient of sum_r w_r log q_r(target_r) with respect to the
    logits, w_r (onehot - softmax); its value is given (`total`: the chunks' objective from pass 1)."""

    targets: torch.Tensor
    weights: torch.Tensor
    """[N] f'(the row's chunk) x the objective's coefficient."""
    total: torch.Tensor
    names: tuple[str, ...] = ("objective",)

    @property
    def wants_grad(self) -> bool:
        return True

    def chunk(self, start, end, logits, grad):
        value = self.total if start == 0 else self.total.new_zeros(())
        if not grad:
            return (value,), None
        g = torch.softmax(logits, dim=-1)
        g.neg_().scatter_add_(1, self.targets[start:end, None], torch.ones_like(g[:, :1]))
        g.mul_(self.weights[start:end, None].to(g.dtype))
        return (value,), (g, 1.0)


def fused_chunk_likelihood(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_of: torch.Tensor,
    teacher: torch.Tensor,
    *,
    coef: float,
    temperature: float,
    chunk: int,
    coef_lm: float = 0.0,
) -> tuple[torch.Tensor, dict]:
    """The chunk-likelihood term, and LM, over the student rows `s_hidden` [N, D] (loss-bearing positions),
    their `targets` [N] and chunks `chunk_of` [N] (-1: in none), against the teacher's chunk log-likelihoods
    `teacher` [C]. Both terms need only each row's log-probability of its target, so one pair of passes serves
    them: the LM gradient is -coef_lm (onehot - softmax) on every row, the chunk term's coef f' (onehot - softmax)
    on the rows in a chunk. Returns (differentiable coef x chunk sum + coef_lm x LM sum, {"kd": chunk sum
    (float64), "lm": LM sum, "count": C})."""
    count = int(teacher.numel())
    n = s_hidden.size(0)
    logq = label_logprobs(s_hidden, s_weight, targets, chunk) if n else s_hidden.new_zeros(0, dtype=torch.float32)
    inside = (chunk_of >= 0).nonzero().flatten()
    members = chunk_of.index_select(0, inside)
    ls = torch.zeros(count, dtype=torch.float64, device=s_hidden.device)
    ls.index_add_(0, members, logq.index_select(0, inside).double())
    value, grad = chunk_divergence(teacher.to(ls.device), ls, temperature)
    total = value.sum()
    lm = -logq.sum()
    weights = torch.full((n,), -coef_lm, dtype=torch.float64, device=s_hidden.device)
    weights.index_add_(0, inside, (coef * grad).index_select(0, members))
    acc = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
    loss = RowWeightedLogprob(targets, weights, (coef * total + coef_lm * lm.double()).to(acc))
    if (coef == 0.0 and coef_lm == 0.0) or not n:
        objective = s_hidden.sum() * 0.0 + loss.total  # keeps the graph (and ZeRO-3's hooks) without gradient work
    else:
        objective = chunked_head(s_hidden, s_weight, loss, chunk)["objective"]
    return objective, {"kd": total, "lm": lm, "count": count}


def teacher_chunk_rows(ids: torch.Tensor, logp: torch.Tensor, chunk_of: torch.Tensor, count: int):
    """The teacher's chunk log-likelihoods as the one-slot rows a sparse teacher carries (and a cache stores):
    `ids` [C] the student's next token at each pair, `logp` [N] the teacher's log-probabilities of its own
    tokens, `chunk_of` [N] their chunks. The rest is the other outcome, 1 - p."""
    from dsdistill.losses.fused import SparseTeacher

    lt = torch.zeros(count, dtype=torch.float64, device=logp.device).index_add_(0, chunk_of, logp.double())
    lt = lt.clamp(max=LOG_FLOOR)
    return SparseTeacher(ids.reshape(count, 1).long(), lt.float()[:, None], _log1mexp(lt).float())
