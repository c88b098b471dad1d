"""Cross-tokenizer KD terms over an alignment (`dsdistill.crosstok`): pure functions returning (sum, metrics).

Two methods, both comparing only positions that have read the same text (the first token of each chunk):

- `exact_and_sorted` (GOLD-style): the next-token distributions at each aligned pair, split into the tokens
  whose text both vocabularies share and the rest. On the shared tokens the two distributions, each
  renormalised there, go through the ordinary KD divergence (`kd_loss`: the same divergences, temperature
  and T^2); on the rest, where no token corresponds to another, the sorted probabilities are compared (the
  L1 distance of the two descending probability vectors, zero-padded: a ULD-style term that needs no token
  correspondence). With one tokenizer on both sides every token is shared and every chunk is one token, so
  the term is ordinary KD.
- `chunk_likelihood` (ALM-style): each aligned chunk's likelihood under each model (the product of its own
  tokens' probabilities, raised to 1/T), compared as two Bernoulli distributions (binarised KL of the
  teacher's from the student's, `chunk_likelihood.chunk_divergence`). It needs no shared vocabulary and covers
  chunks of any length. Training computes it in the fused head (dsdistill/losses/chunk_likelihood.py); this
  one-sequence form over an `Alignment` is its reference.
"""

from __future__ import annotations

import torch

from dsdistill.losses.chunk_likelihood import chunk_divergence
from dsdistill.losses.closed_form import kd_loss


def exact_and_sorted(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_pos: torch.Tensor,
    teacher_pos: torch.Tensor,
    student_shared: torch.Tensor,
    teacher_shared: torch.Tensor,
    *,
    temperature: float,
    sorted_weight: float = 1.0,
    divergence_kind: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
):
    """GOLD-style term summed over the aligned pairs.

    `student_logits` [Ns, Vs] and `teacher_logits` [Nt, Vt] are one sequence each; `student_pos[i]` and
    `teacher_pos[i]` are the i-th aligned pair; `student_shared[j]` and `teacher_shared[j]` are the ids of
    the j-th token text both vocabularies have. Returns (sum, {"count", "exact", "sorted", "shared_mass"}).
    """
    s = student_logits.index_select(0, student_pos).double()
    t = teacher_logits.index_select(0, teacher_pos).double()
    n = s.shape[0]
    if n == 0:
        zero = student_logits.sum() * 0.0
        return zero, {"count": 0.0, "exact": 0.0, "sorted": 0.0, "shared_mass": 0.0}
    # exact: the divergence between the two distributions on the shared tokens (a padding row closes the
    # sequence, since `kd_loss` counts position p when the label at p+1 is counted)
    s_sh = torch.cat([s.index_select(1, student_shared), s.new_zeros(1, len(student_shared))])
    t_sh = torch.cat([t.index_select(1, teacher_shared), t.new_zeros(1, len(teacher_shared))])
    labels = torch.zeros(1, n + 1, dtype=torch.long, device=s.device)
    exact, _ = kd_loss(
        s_sh[None],
        t_sh[None],
        labels,
        temperature=temperature,
        divergence_kind=divergence_kind,
        beta=beta,
        alpha=alpha,
    )
    # the rest: sorted probabilities (at temperature T) of the tokens with no counterpart
    ls = torch.log_softmax(s / temperature, dim=-1)
    lt = torch.log_softmax(t / temperature, dim=-1)
    s_rest = _without(ls.exp(), student_shared)
    t_rest = _without(lt.exp(), teacher_shared)
    width = max(s_rest.shape[1], t_rest.shape[1])
    s_sorted = torch.nn.functional.pad(s_rest.sort(dim=-1, descending=True).values, (0, width - s_rest.shape[1]))
    t_sorted = torch.nn.functional.pad(t_rest.sort(dim=-1, descending=True).values, (0, width - t_rest.shape[1]))
    rest = (s_sorted - t_sorted).abs().sum()
    total = exact + sorted_weight * rest
    mass = lt.detach().exp().index_select(1, teacher_shared).sum()
    metrics = {"count": float(n), "exact": float(exact.detach()), "sorted": float(rest.detach()), "shared_mass": float(mass)}
    return total.to(student_logits.dtype), metrics


def _without(p: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(p.shape[1], dtype=torch.bool, device=p.device)
    keep[ids] = False
    return p[:, keep]


def chunk_likelihood(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    student_ids: torch.Tensor,
    teacher_ids: torch.Tensor,
    s_start: torch.Tensor,
    s_end: torch.Tensor,
    t_start: torch.Tensor,
    t_end: torch.Tensor,
    *,
    temperature: float,
):
    """ALM-style term summed over the chunks that have a position before them on both sides.

    `*_ids` are each sequence's own token ids; chunk k covers student tokens [s_start[k], s_end[k]) and
    teacher tokens [t_start[k], t_end[k]). Returns (sum, {"count": chunks}).
    """
    keep = (s_start > 0) & (t_start > 0)
    s_start, s_end, t_start, t_end = s_start[keep], s_end[keep], t_start[keep], t_end[keep]
    if len(s_start) == 0:
        return student_logits.sum() * 0.0, {"count": 0.0}
    log_s = _chunk_logprob(student_logits, student_ids, s_start, s_end)
    log_t = _chunk_logprob(teacher_logits, teacher_ids, t_start, t_end)
    kl, _ = chunk_divergence(log_t, log_s, temperature)
    return kl.sum().to(student_logits.dtype), {"count": float(len(s_start))}


def _chunk_logprob(logits, ids, start, end) -> torch.Tensor:
    """Sum of log p(token j | tokens before j) over each chunk's tokens (at T = 1: the temperature applies to
    the chunk's likelihood, `chunk_divergence`)."""
    logp = torch.log_softmax(logits[:-1].double(), dim=-1).gather(1, ids[1:, None])[:, 0]
    # token j is predicted at position j-1: a cumulative sum over tokens 1..N-1 gives every chunk's sum
    cum = torch.cat([logp.new_zeros(1), logp.cumsum(0)])
    return cum[end - 1] - cum[start - 1]
