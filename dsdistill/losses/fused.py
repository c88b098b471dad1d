"""KD + LM from final hidden states and lm_head weights, chunk by chunk: full [tokens, vocab] logits are
never materialised for either model.

For each chunk of valid positions the student and teacher logits of that chunk are formed, the KD
divergence (any of `kd.DIVERGENCES`, top-k optional) and the LM cross-entropy are computed with the same
functions as the unchunked loss, and -- when gradients are needed -- the chunk's gradient with respect
to the student hidden states and the student lm_head weight is taken right away (one logits computation
per chunk, no recomputation in backward). Backward then only scales the stored gradients.

Precision: the GEMMs run in the models' dtype (bf16/fp16 on tensor cores, fp32 accumulation); only the
[chunk, vocab] logits are upcast to fp32 for the softmax math, and no full weight is ever copied or cast.
Gradients are taken by hand from the fp32 logit gradient: d hidden = g @ W and d W += g^T @ h, with fp32
outputs into fp32 buffers where the backend has such a GEMM (CUDA), so the head's gradient does not round
to bf16 once per chunk. (PyTorch's CPU backend has no bf16 GEMM with an fp32 output; there each chunk's
contribution is rounded to bf16 before it is added to the fp32 buffer.)

Memory: one chunk holds about `BYTES_PER_LOGIT` bytes per logit (both models' fp32 logits, log-softmaxes,
probabilities, the divergence's elementwise terms and the logit gradient); besides, the gathered teacher
head and the fp32 gradient buffers of the student's hidden states and head live for the whole call.
`chunk_rows` sizes chunks from that model against a budget: a fraction of free device memory on a GPU
(hundreds to thousands of rows at a 150k vocabulary), a fixed budget on CPU.
The gradient is that of `coef_kd * kd_sum + coef_lm * lm_sum` (the caller's curriculum weight divided by
the window's token count), so one set of buffers serves both terms.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from dsdistill.losses.closed_form import DivergenceSpec, KDLMTerms, SparseSide, forward_kl_lm
from dsdistill.losses.kd import _ABSENT, t2_factor

BYTES_PER_LOGIT = 4 * 8
"""Live fp32 buffers per logit of one chunk: student and teacher logits, both log-softmaxes, a probability
(exp), the divergence's elementwise product, the logit gradient, and one temporary."""
MIN_ROWS, MAX_ROWS = 16, 16384
CPU_BUDGET_BYTES = 256 << 20
GPU_FREE_FRACTION = 0.5
CHUNK_CAP_BYTES = 4 << 30
"""A chunk's buffers never need more: its GEMMs are compute-bound from a few hundred rows, so more rows buy
no speed, only memory (at V = 151,936 half the free memory of an 80 GB GPU gave ~7,000 rows, 33 GiB)."""
EFFICIENT_ROWS = 512
"""The cap never goes below this many rows (where the chunk's GEMMs stop being efficient)."""


def fixed_bytes(*, tokens: int, vocab: int, s_width: int, t_width: int, t_dtype_bytes: int, grads: bool) -> int:
    """Buffers that live for a whole call, whatever the chunk: the gathered teacher head (its own dtype) and,
    with gradients, the fp32 gradient buffers of the student's hidden states and head, plus the fp32
    [vocab, width] product of one chunk's head gradient before it is added in."""
    out = vocab * t_width * t_dtype_bytes
    if grads:
        out += 4 * (tokens * s_width + 2 * vocab * s_width)
    return out


def row_cap(vocab: int) -> int:
    """The most rows a chunk gets at this vocabulary, whatever memory is free (`CHUNK_CAP_BYTES`)."""
    return max(EFFICIENT_ROWS, min(MAX_ROWS, CHUNK_CAP_BYTES // max(1, vocab * BYTES_PER_LOGIT)))


def auto_chunk(vocab: int, hidden: int, *, budget_bytes: int, fixed: int = 0) -> int:
    """Rows per chunk so one chunk's logits and intermediates fit in `budget_bytes` less the `fixed` buffers,
    and no more than `row_cap(vocab)`."""
    room = max(0, budget_bytes - fixed)
    return max(MIN_ROWS, min(row_cap(vocab), room // max(1, vocab * BYTES_PER_LOGIT)))


def default_budget(device: torch.device) -> int:
    """Bytes one call may use: a fraction of the GPU's memory free now (the driver's free memory plus the
    blocks PyTorch holds unused), rounded down to 256 MiB steps so the chunk size rarely changes; a fixed
    budget on CPU."""
    if device.type == "cuda" and torch.cuda.is_available():
        free, _total = torch.cuda.mem_get_info(device)
        free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free * GPU_FREE_FRACTION) >> 28 << 28
    return CPU_BUDGET_BYTES


_OUT_F32: dict = {}


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with an fp32 result. Half-precision operands stay in their dtype (tensor cores, fp32
    accumulation); CUDA writes the fp32 result directly, elsewhere the half-precision result is upcast."""
    if a.dtype not in (torch.bfloat16, torch.float16):
        return a @ b
    if a.is_cuda and _OUT_F32.get(a.dtype, True):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            _OUT_F32[a.dtype] = False
    return (a @ b).float()


@dataclass(frozen=True)
class KDOptions:
    temperature: float
    divergence: str = "forward_kl"
    beta: float = 0.5
    alpha: float = 0.1
    top_k: Optional[int] = None
    top_k_rest: bool = False
    top_k_support: str = "auto"
    chunk: int = 1024
    want_kd: bool = True
    want_lm: bool = True
    compile: bool = False
    """torch.compile the per-chunk math where it is one expression (dense forward KL + LM: `closed_form.
    forward_kl_lm`); other divergences and top-k run the eager closed form."""


@dataclass(frozen=True)
class SparseTeacher:
    """A teacher given by its top-k per loss-bearing position (an offline cache or a server), with what the
    rest bucket needs at each temperature: `log_rest` = log of the tail's mass at T = 1, and for every T in
    `temperatures` the column of `tails` = log sum over the tail of p_i^(1/T) (the tail's unnormalised mass
    at T). With those, the buckets at T equal live top-k + rest exactly."""

    ids: torch.Tensor
    """[N, k] token ids."""
    logp: torch.Tensor
    """[N, k] log-probabilities at T = 1."""
    log_rest: torch.Tensor
    """[N] log of the mass outside the k tokens, at T = 1."""
    tails: Optional[torch.Tensor] = None
    """[N, len(temperatures)] log sum over the tail of p_i^(1/T), one column per temperature."""
    temperatures: tuple[float, ...] = ()
    """The temperatures other than 1 that `tails` serves."""
    absent: Optional[torch.Tensor] = None
    """[N, k] slots that hold no token (a row with fewer than k tokens: a server's top-k over another vocabulary,
    of which fewer than k have a counterpart): each repeats a token of its row's support, or of the row's first
    slot when it has none, and carries no mass on either side."""

    def _map(self, f) -> "SparseTeacher":
        opt = lambda t: None if t is None else f(t)  # noqa: E731
        return SparseTeacher(f(self.ids), f(self.logp), f(self.log_rest), opt(self.tails), self.temperatures, opt(self.absent))

    def take(self, index: torch.Tensor) -> "SparseTeacher":
        """The positions `index` (ordinals into this one's), in that order."""
        index = index.to(self.ids.device)
        return self._map(lambda t: t.index_select(0, index))

    def to(self, device) -> "SparseTeacher":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pinned(self) -> "SparseTeacher":
        return self._map(lambda t: t.pin_memory())

    def rows(self, start: int, end: int) -> "SparseTeacher":
        return self._map(lambda t: t[start:end])

    def log_tail(self, temperature: float) -> torch.Tensor:
        """log sum over the tail of p_i^(1/T): exact, or a ValueError naming what the source can serve."""
        if temperature == 1.0:
            return self.log_rest
        if self.tails is not None and temperature in self.temperatures:
            return self.tails[:, self.temperatures.index(temperature)]
        served = ", ".join(f"{t:g}" for t in (1.0, *self.temperatures))
        raise ValueError(
            f"the sparse teacher holds exact tails for T in {{{served}}}, not T = {temperature:g} "
            "(write the cache with this run's curriculum)"
        )


def as_sparse(t_sparse) -> Optional[SparseTeacher]:
    """`SparseTeacher`, or today's (ids, log-probs, log rest) tuple (T = 1 only), or None."""
    if t_sparse is None or isinstance(t_sparse, SparseTeacher):
        return t_sparse
    ids, logp, log_rest = t_sparse
    return SparseTeacher(ids, logp, log_rest)


def sparse_side(sp: SparseTeacher, temperature: float, dtype: torch.dtype) -> SparseSide:
    """The sparse teacher's buckets at T: its k tokens and the rest, renormalised."""
    tail = sp.log_tail(temperature).to(dtype)
    t = torch.cat([sp.logp.to(dtype) / temperature, tail[:, None]], dim=-1)
    if sp.absent is None:
        return SparseSide(sp.ids, torch.log_softmax(t, dim=-1))
    lp = torch.log_softmax(t.masked_fill(torch.nn.functional.pad(sp.absent, (0, 1)), float("-inf")), dim=-1)
    return SparseSide(sp.ids, lp.masked_fill(torch.nn.functional.pad(sp.absent, (0, 1)), _ABSENT), sp.absent)


def terms_of(o: KDOptions) -> KDLMTerms:
    return KDLMTerms(
        temperature=o.temperature,
        spec=DivergenceSpec(o.divergence, o.beta, o.alpha),
        top_k=o.top_k,
        rest=o.top_k_rest,
        support=o.top_k_support,
        want_kd=o.want_kd,
        want_lm=o.want_lm,
    )


class LogitLoss(Protocol):
    """A loss on the logits of blocks of rows, as the chunked head needs it: for rows [start, end) and their
    student logits (fp32 or fp64, the loss's to overwrite) it returns its sums (the first is the objective,
    the one the gradient is of) and the gradient of that objective with respect to the logits as (g, factor),
    meaning factor x g (None without `grad`). The head forms the logits, runs the GEMMs (where the factor
    costs nothing) and accumulates; a loss never sees the weights."""

    names: tuple[str, ...]

    @property
    def wants_grad(self) -> bool:
        """False when every coefficient is 0: the head then does no gradient work at all."""
        ...

    def chunk(
        self, start: int, end: int, logits: torch.Tensor, grad: bool
    ) -> tuple[tuple[torch.Tensor, ...], Optional[tuple[torch.Tensor, float]]]: ...


def _exact_scale(temperature: float, dtype: torch.dtype) -> bool:
    """Whether dividing the teacher's hidden state by T (a [rows, width] pass) may replace dividing its
    logits (a [rows, vocab] pass): always in fp32/fp64, and in half precision when T is a power of two
    (then it is exact)."""
    if dtype in (torch.float32, torch.float64):
        return True
    m, _ = math.frexp(temperature)
    return m == 0.5


@dataclass
class KDLMLoss:
    """KD (dense teacher from its hidden state and head, or a sparse teacher) + LM, weighted by the
    objective's coefficients: the fused head's `LogitLoss`."""

    terms: KDLMTerms
    targets: torch.Tensor
    coef_kd: float
    coef_lm: float
    t_hidden: Optional[torch.Tensor] = None
    t_weight: Optional[torch.Tensor] = None
    sparse: Optional[SparseTeacher] = None
    compile: bool = False
    names: tuple[str, ...] = ("objective", "kd", "kl", "lm")

    @property
    def wants_grad(self) -> bool:
        return self.coef_kd != 0.0 or self.coef_lm != 0.0

    def chunk(self, start, end, logits, grad):
        terms, teacher, at_t = self.terms, None, False
        if terms.want_kd:
            if self.sparse is not None:
                teacher = sparse_side(self.sparse.rows(start, end), terms.temperature, logits.dtype)
            else:
                assert self.t_hidden is not None and self.t_weight is not None, (
                    "dense KD needs the teacher's hidden state and head"
                )
                th = self.t_hidden[start:end].to(self.t_weight.dtype)
                if terms.temperature != 1.0 and _exact_scale(terms.temperature, th.dtype):
                    th, at_t = th * (1.0 / terms.temperature), True
                with torch.no_grad():
                    teacher = _mm_f32(th, self.t_weight.T).to(logits.dtype)
        targets = self.targets[start:end]
        compiled = _compiler() if self.compile and terms.one_expression(torch.is_tensor(teacher)) else None
        if compiled is not None:
            # the compiled path: one fused kernel per chunk (the coefficients are symbolic: no recompile per step)
            T = terms.temperature
            kd_scale = self.coef_kd * t2_factor(terms.spec.kind, T) / T
            kd, lm, g = compiled(logits, teacher, targets, T, kd_scale, self.coef_lm, terms.want_kd, terms.want_lm, grad, at_t)
            factor = 1.0
        else:
            kd, lm, g, factor = terms.rows(
                logits, teacher, targets, coef_kd=self.coef_kd, coef_lm=self.coef_lm, grad=grad, teacher_at_t=at_t
            )
        zero = logits.new_zeros(())
        raw = kd.sum() if kd is not None else zero
        kd_sum = raw * t2_factor(terms.spec.kind, terms.temperature)
        lm_sum = lm.sum() if lm is not None else zero
        return (self.coef_kd * kd_sum + self.coef_lm * lm_sum, kd_sum, raw, lm_sum), (None if g is None else (g, factor))


_COMPILED: list = []


def _compiler():
    """`forward_kl_lm` compiled once (dynamic shapes for the uneven last chunk, symbolic coefficients), or
    None where torch.compile cannot run here (said once, in one line: the head then runs eagerly)."""
    if not _COMPILED:
        try:
            fn = torch.compile(forward_kl_lm, dynamic=True)
            x = torch.zeros(2, 3)
            fn(x, x.clone(), torch.zeros(2, dtype=torch.long), 2.0, 1.0, 1.0, True, True, True, False)  # compiles now
            _COMPILED.append(fn)
        except Exception as e:  # no C++ compiler, no Triton, an unsupported backend
            import sys

            print(
                f"dsdistill: note: loss.fused_compile: torch.compile is not available here ({type(e).__name__}); the fused head runs eagerly",
                file=sys.stderr,
            )
            _COMPILED.append(None)
    return _COMPILED[0]


class _ChunkedHead(torch.autograd.Function):
    """Any `LogitLoss` over the logits h @ W^T, chunk by chunk: the logits GEMM in the weight's dtype, the
    loss's value and logit gradient, then d hidden = g @ W and d W += g^T @ h right away. No autograd graph
    inside a chunk; backward only scales what the forward stored."""

    @staticmethod
    def forward(ctx, s_hidden, s_weight, loss: LogitLoss, chunk: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need = (need_h or need_w) and loss.wants_grad
        acc_dtype = torch.float64 if s_hidden.dtype == torch.float64 else torch.float32
        grad_h = torch.zeros(s_hidden.shape, dtype=acc_dtype, device=s_hidden.device) if need and need_h else None
        grad_w = torch.zeros(s_weight.shape, dtype=acc_dtype, device=s_weight.device) if need and need_w else None
        w = s_weight.detach()
        w_dh = _dh_layout(w) if need_h else w
        totals = None
        for start in range(0, max(1, s_hidden.size(0)), chunk):
            end = min(s_hidden.size(0), start + chunk)
            # the chunk's rows take the weight's dtype (never the other way round: no full-weight copy)
            h = s_hidden[start:end].detach().to(w.dtype)
            with torch.no_grad():
                s_logits = _mm_f32(h, w.T).to(acc_dtype)
                sums, g = loss.chunk(start, end, s_logits, need)
                if g is not None:
                    _accumulate(*g, h, w, w_dh, grad_h, grad_w, start, end)
                del g
            totals = list(sums) if totals is None else [a + b for a, b in zip(totals, sums)]
        assert totals is not None
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.flags = (grad_h is not None, grad_w is not None)
        ctx.dtypes = (s_hidden.dtype, s_weight.dtype)
        ctx.mark_non_differentiable(*totals[1:])
        return tuple(totals)

    @staticmethod
    def backward(ctx, g_objective, *_unused):
        saved = iter(ctx.saved_tensors)
        has_h, has_w = ctx.flags
        gh = (next(saved) * g_objective).to(ctx.dtypes[0]) if has_h else None
        gw = (next(saved) * g_objective).to(ctx.dtypes[1]) if has_w else None
        return gh, gw, None, None


def _dh_layout(w: torch.Tensor) -> torch.Tensor:
    """The weight as d hidden = g @ W reads it. PyTorch's CPU kernels multiply a half-precision [rows, V] by a
    row-major [V, D] about 10x slower than by the same matrix stored column-major (AVX2, no bf16 units:
    7.8 s against 0.8 s at 1,024 x 32,000 x 128), so on CPU the half-precision weight is laid out once per
    call (one copy of it, never one per chunk); on GPUs the GEMM reads either layout at full speed."""
    if w.is_cuda or w.dtype not in (torch.bfloat16, torch.float16):
        return w
    return w.t().contiguous().t()


def _accumulate(g, factor, h, w, w_dh, grad_h, grad_w, start, end):
    """d hidden rows = factor g @ W, d W += factor g^T @ h: in place with an fp32/fp64 GEMM (the factor rides
    on the GEMM's alpha); in half precision the GEMMs take the model dtype (fp32 outputs where the backend
    has them)."""
    if w.dtype == g.dtype:
        if grad_h is not None:
            torch.mm(g, w, out=grad_h[start:end])
            grad_h[start:end].mul_(factor)
        if grad_w is not None:
            grad_w.addmm_(g.T, h, alpha=factor)
        return
    g_low = g.to(w.dtype)
    if grad_h is not None:
        grad_h[start:end] = _mm_f32(g_low, w_dh).mul_(factor)
    if grad_w is not None:
        _addmm_f32_(grad_w, g_low.T, h, factor)


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float) -> None:
    """acc += alpha a @ b for half-precision a, b and an fp32 acc: on CUDA one GEMM that accumulates into acc
    (no [V, D] temporary); elsewhere the product is upcast and added."""
    if a.is_cuda and _OUT_F32.get(("addmm", a.dtype), True):
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, alpha=alpha, out=acc)
            return
        except (RuntimeError, TypeError):
            _OUT_F32[("addmm", a.dtype)] = False
    acc.add_(_mm_f32(a, b), alpha=alpha)


def chunked_head(s_hidden: torch.Tensor, s_weight: torch.Tensor, loss: LogitLoss, chunk: int) -> dict:
    """`loss` over the logits s_hidden @ s_weight^T ([N, D] rows, [V, D] weight) chunk by chunk: its sums by
    name, the first differentiable in s_hidden and s_weight."""
    out = _ChunkedHead.apply(s_hidden, s_weight, loss, int(chunk))
    return dict(zip(loss.names, out))


def fused_kd_lm(
    s_hidden: torch.Tensor,
    s_weight: torch.Tensor,
    t_hidden: Optional[torch.Tensor],
    t_weight: Optional[torch.Tensor],
    labels: torch.Tensor,
    *,
    coef_kd: float,
    coef_lm: float,
    options: KDOptions,
    ignore_index: int = -100,
    t_sparse=None,
    positions: Optional[torch.Tensor] = None,
):
    """Chunked KD and LM over the valid next-token positions of a batch.

    s_hidden [B, S, Ds], s_weight [V, Ds] (student final hidden states and lm_head weight), t_hidden
    [B, S, Dt], t_weight [V, Dt] (teacher, no gradient), labels [B, S]. Only the first V rows of the
    weights are used, so padded embedding matrices line up with the shared tokenizer vocabulary. Instead of
    the teacher's hidden state and head, `t_sparse` = (ids [N, k], log-probs [N, k], log rest [N]) gives its
    cached top-k for the N valid positions in order (an offline teacher cache).
    Returns (differentiable coef_kd * kd_sum + coef_lm * lm_sum, {"kd": kd_sum, "kl": raw_sum,
    "lm": lm_sum, "count": valid positions}) -- the same sums as `kd_loss` and `lm_loss`."""
    if positions is None:
        mask = labels[:, 1:] != ignore_index
        sh = s_hidden[:, :-1][mask]
        th = t_hidden[:, :-1][mask] if t_hidden is not None else None
        targets = labels[:, 1:][mask]
        count = int(mask.sum())
    else:
        # `positions`: flat indices b * S + t of the same positions in the same order, computed on the host,
        # so the gathers need no device sync
        positions = positions.to(labels.device, non_blocking=True)
        sh = s_hidden.reshape(-1, s_hidden.size(-1)).index_select(0, positions)
        th = t_hidden.reshape(-1, t_hidden.size(-1)).index_select(0, positions) if t_hidden is not None else None
        targets = labels.reshape(-1).index_select(0, positions + 1)
        count = int(positions.numel())
    t_sparse = as_sparse(t_sparse)
    if t_sparse is not None and t_sparse.ids.size(0) != targets.size(0):
        raise ValueError(f"the teacher cache gave {t_sparse.ids.size(0)} positions for a batch with {targets.size(0)}")
    loss = KDLMLoss(terms_of(options), targets, float(coef_kd), float(coef_lm), th, t_weight, t_sparse, options.compile)
    out = chunked_head(sh, s_weight, loss, options.chunk)
    return out["objective"], {"kd": out["kd"], "kl": out["kl"], "lm": out["lm"], "count": count}
