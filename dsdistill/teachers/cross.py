"""A teacher with another tokenizer (`teacher.cross_tokenizer`): the model teacher of `teacher.path`, run on its
own tokens of the same examples, whose next-token distribution at every position paired with a student
position (dsdistill/crosstok.py) is projected onto the student's vocabulary as top-k + rest rows. The KD path
then compares them as it compares a cache's or a server's rows; the student's loss-bearing positions with no
paired teacher position get LM alone (`TeacherSignal.kd_rows`), and KD is averaged over the pairs.

The data carries both tokenisations (dsdistill/formats.py `TeacherText`, the packer's teacher rows), so the
plan here only checks what the two tokenizers can compare and builds the model as any live teacher.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from dsdistill.errors import ConfigError, DistillError
from dsdistill.teachers.base import Capabilities, DenseLogits, HiddenHead, RunContext, TeacherInput, TeacherSignal
from dsdistill.teachers.live import LiveTeacher

if TYPE_CHECKING:
    from dsdistill.crosstok import SharedMaps
    from dsdistill.needs import Needs

ROWS_PER_PASS = 1024
"""Paired positions whose teacher logits are formed at once (a [rows, teacher vocabulary] fp32 block)."""


def cross_capabilities(top_k: int, inner: Capabilities) -> Capabilities:
    # its hidden states and attention are at its own positions, not the student's: no component reads them
    return Capabilities(
        distribution="sparse",
        top_k=top_k,
        scores_new_text=inner.scores_new_text,
        temperatures=inner.temperatures,
        model_in_job=inner.model_in_job,
        remote=inner.remote,
        reads_ahead=inner.reads_ahead,
    )


class CrossTeacher:
    """The teacher (a live model or a server) on its own tokens; KD rows projected onto the student's vocabulary."""

    def __init__(
        self,
        inner: Any,
        maps: "SharedMaps",
        *,
        top_k: int,
        temperatures: tuple[float, ...],
        ignore_index: int,
        student_tokenizer: Any = None,
        text: Any = None,
        student_rows: bool = False,
        method: str = "shared_topk",
    ):
        self.inner = inner
        self.method = method
        """`shared_topk`: rows projected onto the student's vocabulary; `chunk_likelihood`: the teacher's
        log-likelihood of each chunk of text (dsdistill/losses/chunk_likelihood.py)."""
        self.student_rows = student_rows
        """The inner source reads the student's rows (a cache of this teacher's rows already projected onto the
        student's vocabulary at the paired positions), not the teacher's own tokens."""
        self.maps = maps
        self.top_k = top_k
        self.temperatures = temperatures
        self.ignore_index = ignore_index
        self.student_tokenizer = student_tokenizer
        self.text = text
        """The data's `formats.TeacherText` (its tokenizer and the pairing), for sampled rows."""
        self.unmatched = 0
        """Sampled rows whose text did not tokenise back to the student's ids (no KD on them)."""
        self._table: Optional[torch.Tensor] = None
        """`crosstok.student_of` for a server's rows, built on their device once."""

    def retokenise(self, window: list[dict[str, torch.Tensor]], places) -> list[dict[str, torch.Tensor]]:
        """The window after on-policy sampling, with each sampled row re-read in the teacher's tokens: the
        student's ids decoded to text (a trailing EOS kept as EOS on both sides), tokenised by both, paired
        as the data's rows are. A row whose text does not tokenise back to the same student ids (a tokenizer
        whose decoding is not its inverse there) gets no pair: LM still trains on it, KD leaves it out."""
        from dsdistill.data import TEACHER_ROWS, pad_teacher_rows

        out = [dict(mb) for mb in window]
        rows_of: dict[int, list[int]] = {}
        for b, i in places:
            rows_of.setdefault(b, []).append(i)
        for b, rows in rows_of.items():
            mb = out[b]
            width = mb["input_ids"].shape[1]
            teacher_rows = [{k: mb[k][r] for k in TEACHER_ROWS} for r in range(mb["input_ids"].shape[0])]
            x_pos, x_ctx = mb["x_pos"].clone(), mb["x_ctx"].clone()
            for i in rows:
                side, n = self._sampled(mb, i)
                t_labels = [t if keep else -100 for t, keep in zip(side.ids, side.loss)]
                if t_labels:
                    t_labels[0] = -100
                teacher_rows[i] = {
                    "t_input_ids": torch.tensor(side.ids, dtype=torch.long),
                    "t_labels": torch.tensor(t_labels, dtype=torch.long),
                    "t_position_ids": torch.arange(len(side.ids)),
                }
                x_pos[i] = torch.tensor(side.pair + [-1] * (width - n))
                x_ctx[i] = torch.tensor(side.context + [-1] * (width - n))
            mb.update(pad_teacher_rows(teacher_rows))
            mb["x_pos"], mb["x_ctx"] = x_pos, x_ctx
        return out

    def _sampled(self, mb: dict[str, torch.Tensor], i: int):
        """(the teacher's side of sampled row i, the row's length)."""
        from dsdistill.formats import TeacherTokens

        pos = mb["position_ids"][i].tolist() if "position_ids" in mb else None
        n = next((k for k in range(1, len(pos)) if pos[k] == 0), len(pos)) if pos else mb["input_ids"].shape[1]
        ids = mb["input_ids"][i, :n].tolist()
        loss = (mb["labels"][i, :n] != self.ignore_index).tolist()
        tok = self.student_tokenizer
        eos = bool(ids) and ids[-1] == tok.eos_token_id
        body = ids[:-1] if eos else ids
        text = tok.decode(body, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(enc["input_ids"]) != body or not any(loss):
            self.unmatched += 1
            if self.unmatched == 1:
                print(
                    "dsdistill: note: an on-policy sample's text does not tokenise back to the student's ids; KD "
                    "leaves such samples out (LM trains on them)",
                    flush=True,
                )
            return TeacherTokens([], [], [-1] * n, [-1] * n), n
        first = loss.index(True)
        spans = [(enc["offset_mapping"][first][0] if first < len(body) else len(text), len(text))]
        return self.text.encode(text, enc["offset_mapping"], spans, s_count=n, eos=eos), n

    @property
    def engine(self):
        """A live teacher's engine (ZeRO-3, or the replicated wrapper)."""
        return self.inner.engine

    def capabilities(self) -> Capabilities:
        own = self.inner.capabilities()
        if self.method == "chunk_likelihood":
            return cross_capabilities(1, own)
        return cross_capabilities(own.top_k if self.student_rows else self.maps.k(self.top_k), own)

    def _input(self, batch: TeacherInput) -> TeacherInput:
        return self._student(batch) if self.student_rows else self._own(batch)

    def _served_chunks(self) -> bool:
        """A server asked for its label log-probs (chunk_likelihood): asked when the rows are read, not ahead."""
        return self.method == "chunk_likelihood" and not self.student_rows and hasattr(self.inner, "_score")

    def prepare(self, window, needs) -> Optional[str]:
        if self._served_chunks():
            return None
        return self.inner.prepare([self._input(x) for x in window], needs)

    def prefetch(self, window, needs) -> None:
        if not self._served_chunks():
            self.inner.prefetch([self._input(x) for x in window], needs)

    def _student(self, batch: TeacherInput) -> TeacherInput:
        """The student's rows with `valid` the paired loss-bearing positions: what a cross-tokenizer cache holds."""
        c = batch.cross
        if c is None:
            raise DistillError("a teacher with another tokenizer got a batch without its tokens (teacher.cross_tokenizer)")
        return TeacherInput(batch.input_ids, c.paired.to(batch.input_ids.device), batch.position_ids, batch.rows, c)

    def begin_step(self, needs: "Needs") -> None:
        self.inner.begin_step(needs)

    def end_step(self) -> None:
        self.inner.end_step()

    def _own(self, batch: TeacherInput, rows: Optional[torch.Tensor] = None) -> TeacherInput:
        c = batch.cross
        if c is None:
            raise DistillError("a teacher with another tokenizer got a batch without its tokens (teacher.cross_tokenizer)")
        # `valid`: the paired positions (what a server is asked to score), in the flat order of the pairs; or
        # the given flat `rows`
        dev = batch.input_ids.device
        rows = c.rows if rows is None else rows
        valid = torch.zeros(c.ids.numel(), dtype=torch.bool).index_fill_(0, rows, True).view_as(c.ids)
        return TeacherInput(c.ids.to(dev), valid.to(dev), c.position_ids.to(dev), batch.rows)

    def signal(self, batch: TeacherInput, needs: "Needs") -> TeacherSignal:
        from dsdistill.crosstok import project_rows

        if not needs.teacher_logits:
            return TeacherSignal()
        if self.method == "chunk_likelihood":
            return self._chunk_signal(batch, needs)
        c = batch.cross
        if self.student_rows:
            rows = self.inner.signal(self._student(batch), needs).sparse
            return TeacherSignal(distribution=rows, kd_rows=(c.kd, c.lm_only))  # type: ignore[union-attr]
        own = self._own(batch)
        assert c is not None  # `_own` refused a batch without it
        sig = self.inner.signal(own, needs)
        if sig.sparse is not None:  # a server's top-k over its own vocabulary, at the paired positions in order
            from dsdistill.crosstok import project_sparse, student_of

            ids = sig.sparse.ids
            if self._table is None or self._table.device != ids.device:
                self._table = student_of(self.maps, len(self.text.tokenizer)).to(ids.device)
            if ids.numel() and int(ids.max()) >= self._table.shape[1]:  # the server's reply is checked, not trusted
                raise DistillError(
                    f"teacher.url: the server answered token id {int(ids.max())}; its tokenizer has {self._table.shape[1]} tokens"
                )
            projected = project_sparse(sig.sparse, c.contexts, self.maps, top_k=self.top_k, table=self._table)
            projected = self._merged(projected, batch, lambda at: self._served_logp(batch, at))
            return TeacherSignal(distribution=projected, kd_rows=(c.kd, c.lm_only))
        rows = c.rows.to(own.input_ids.device)
        logits_of = _logits_of(sig, self.inner.vocab)
        parts = []
        with torch.no_grad():
            for lo in range(0, max(len(rows), 1), ROWS_PER_PASS):
                at = rows[lo : lo + ROWS_PER_PASS]
                parts.append(
                    project_rows(
                        logits_of(at),
                        c.contexts[lo : lo + ROWS_PER_PASS],
                        self.maps,
                        top_k=self.top_k,
                        temperatures=self.temperatures,
                    )
                )
        from dsdistill.crosstok import _concat

        flat_ids = own.input_ids.reshape(-1)
        merged = self._merged(_concat(parts), batch, lambda at: _own_token_logp(logits_of, flat_ids, at))
        return TeacherSignal(distribution=merged, kd_rows=(c.kd, c.lm_only))

    def _merged(self, rows, batch: TeacherInput, logp_at: Callable[[torch.Tensor], torch.Tensor]):
        """`rows` with the teacher's multi-token spans merged (`crosstok.merge_spans`); `logp_at(flat teacher
        rows)` gives the teacher's log-probs of its own next tokens there."""
        from dsdistill.crosstok import merge_spans, student_of

        c = batch.cross
        assert c is not None and c.chunks is not None
        merged, sel = c.chunks.to_merge
        if not len(merged):
            return rows
        dev = rows.ids.device
        at = torch.from_numpy(c.chunks.t_rows[sel])
        if self._table is None or self._table.device != dev:
            self._table = student_of(self.maps, len(self.text.tokenizer)).to(dev)
        return merge_spans(
            rows,
            c.chunks,
            next_ids=batch.input_ids[:, 1:][c.paired[:, :-1].to(batch.input_ids.device)],
            t_logp=logp_at(at),
            t_next=c.ids.reshape(-1).index_select(0, at + 1),
            contexts=c.contexts,
            table=self._table,
        )

    def _served_logp(self, batch: TeacherInput, at: torch.Tensor) -> torch.Tensor:
        """A server's log-probs of the teacher's own next tokens at the flat rows `at` (ascending)."""
        own = self._own(batch, rows=at)
        scored = self.inner._score(own, own.valid.cpu(), labels=True)
        return torch.from_numpy(scored.label_logp.astype("float32")).to(batch.input_ids.device)

    def _chunk_signal(self, batch: TeacherInput, needs: "Needs") -> TeacherSignal:
        """The teacher's log-likelihood of each chunk (as the `logp` of a one-slot row per pair, whose id is the
        student's next token there), and where the student's chunks lie."""
        from dsdistill.losses.chunk_likelihood import teacher_chunk_rows

        c = batch.cross
        if c is None or c.chunks is None:
            raise DistillError("a teacher with another tokenizer got a batch without its tokens (teacher.cross_tokenizer)")
        ch = c.chunks
        members = (torch.from_numpy(ch.s_members), torch.from_numpy(ch.s_chunk))
        if self.student_rows:  # a cache of this method holds exactly those rows
            rows = self.inner.signal(self._student(batch), needs).sparse
            return TeacherSignal(distribution=rows, kd_rows=(c.kd, c.lm_only), chunks=members)
        dev = batch.input_ids.device
        t_rows = torch.from_numpy(ch.t_rows)
        if self._served_chunks():
            logp = self._served_logp(batch, t_rows)
        else:
            own = self._own(batch, rows=t_rows)
            logits_of = _logits_of(self.inner.signal(own, needs), self.inner.vocab)
            logp = _own_token_logp(logits_of, own.input_ids.reshape(-1), t_rows)
        ids = batch.input_ids[:, 1:][c.paired[:, :-1].to(dev)]
        rows = teacher_chunk_rows(ids, logp, torch.from_numpy(ch.t_chunk).to(dev), ch.count)
        return TeacherSignal(distribution=rows, kd_rows=(c.kd, c.lm_only), chunks=members)

    def lm_sums(self, batch: TeacherInput, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The teacher's LM sums on its own tokens (its perplexity is per teacher token)."""
        if self.student_rows:  # from the cached rows: the student's next tokens at the paired positions
            student = self._student(batch)
            at = torch.cat([torch.zeros_like(student.valid[:, :1]), student.valid[:, :-1]], dim=1).to(labels.device)
            return self.inner.lm_sums(student, labels.masked_fill(~at, self.ignore_index))
        own = self._own(batch)
        t_labels = batch.cross.labels.to(labels.device)  # type: ignore[union-attr]
        t_labels = t_labels.masked_fill(t_labels < 0, self.ignore_index)
        return self.inner.lm_sums(own, t_labels)

    def params(self) -> int:
        return self.inner.params()

    def where(self) -> str:
        return f"{self.inner.where()}, its own tokenizer"

    def exact_share(self) -> Optional[float]:
        return None

    def separation_forward(self) -> Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        forward, vocab = self.inner.separation_forward(), self.inner.vocab
        if forward is None:
            return None
        return lambda ids, pos: forward(ids % vocab, pos)  # the check's ids are the student's


def _check_chunk_options(cfg: Any, options: Any) -> None:
    """`chunk_likelihood` compares one likelihood per chunk: the options of a distribution over a vocabulary
    would be ignored, so they are refused rather than dropped."""
    kd = cfg.loss.section("kd")
    what = "compares each chunk's likelihood by the binary KL from teacher to student"
    if kd.divergence != "forward_kl":
        raise ConfigError(
            f"loss.kd.divergence: {kd.divergence} compares distributions over a vocabulary; teacher.cross_tokenizer."
            f"method: chunk_likelihood {what}; leave loss.kd.divergence at forward_kl"
        )
    if kd.top_k is not None:
        raise ConfigError(
            f"loss.kd.top_k: teacher.cross_tokenizer.method: chunk_likelihood {what}, with no top-k; remove loss.kd.top_k"
        )
    if "top_k" in options.model_fields_set:
        raise ConfigError(
            "teacher.cross_tokenizer.top_k: it sizes shared_topk's rows; method: chunk_likelihood keeps one "
            "likelihood per chunk; remove top_k"
        )


def _own_token_logp(logits_of: Callable[[torch.Tensor], torch.Tensor], flat_ids: torch.Tensor, at: torch.Tensor) -> torch.Tensor:
    """The teacher's log-probs of its own next tokens at the flat rows `at`, `ROWS_PER_PASS` rows of logits at a
    time: [len(at)] fp32 on the ids' device."""
    out = [torch.zeros(0, device=flat_ids.device)]
    with torch.no_grad():
        for lo in range(0, len(at), ROWS_PER_PASS):
            part = at[lo : lo + ROWS_PER_PASS].to(flat_ids.device)
            lp = torch.log_softmax(logits_of(part).float(), dim=-1)
            out.append(lp.gather(1, flat_ids.index_select(0, part + 1)[:, None]).squeeze(1))
    return torch.cat(out)


def _logits_of(sig: TeacherSignal, vocab: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """rows (flat teacher positions) -> the teacher's logits there, [rows, vocab]."""
    d = sig.distribution
    if isinstance(d, HiddenHead):
        hidden = d.hidden.reshape(-1, d.hidden.size(-1))
        head = d.head[:vocab]
        return lambda rows: hidden.index_select(0, rows).to(head.dtype) @ head.T
    if isinstance(d, DenseLogits):
        flat = d.logits.reshape(-1, d.logits.size(-1))[:, :vocab]
        return lambda rows: flat.index_select(0, rows)
    raise DistillError(f"teacher.cross_tokenizer: the teacher gave {type(d).__name__}; expected its logits")


class CrossPlan:
    """`teacher.path` with `teacher.cross_tokenizer`: a model teacher whose tokenizer is not the student's."""

    field = "teacher.cross_tokenizer"
    noun = "a teacher with another tokenizer (its positions are not the student's)"

    def __init__(self, cfg: Any, student_tokenizer: Any, *, rank: int):
        from dsdistill.crosstok import shared_maps
        from dsdistill.models import load_tokenizer
        from dsdistill.teachers.kinds import plan_class

        self.cfg = cfg
        self.options = cfg.teacher.cross_tokenizer
        self.tokenizer = load_tokenizer(cfg.teacher, field="teacher")
        # the teacher's own kind, opened for its own tokenizer (a server checks it serves that one)
        self.cached = cfg.teacher.chosen == "cache"
        """A cache of this teacher's rows, already over the student's vocabulary (checked against its tokenizer)."""
        self.inner = plan_class(cfg.teacher.chosen).open(cfg, student_tokenizer if self.cached else self.tokenizer, rank=rank)
        self.source = self.inner.source
        self.model_config = self.inner.model_config
        self.student_tokenizer = student_tokenizer
        self.maps = shared_maps(student_tokenizer, self.tokenizer)
        self.chunked = self.options.method == "chunk_likelihood"
        if not self.chunked and self.maps.k(self.options.top_k) < 1:
            raise ConfigError(
                f"{self.field}: the two tokenizers share no token; KD across them has nothing to compare (method: "
                "chunk_likelihood needs none)"
            )
        if self.chunked:
            _check_chunk_options(cfg, self.options)
        self.temperatures: tuple[float, ...] = ()

    @classmethod
    def open(cls, cfg: Any, student_tokenizer: Any, *, rank: int) -> "CrossPlan":
        return cls(cfg, student_tokenizer, rank=rank)

    def capabilities(self) -> Capabilities:
        own = self.inner.capabilities()
        if self.chunked:
            return cross_capabilities(1, own)
        return cross_capabilities(own.top_k if self.cached else self.maps.k(self.options.top_k), own)

    def verify(self, ctx: RunContext) -> None:
        from dsdistill.teachers.cache_format import run_temperatures

        self.inner.verify(ctx)
        self._check_sampled_text(ctx)
        if self.cached:
            from dsdistill.teachers.cache_format import tokenizer_hash

            crossed = self.inner.cache.manifest.get("cross_tokenizer")
            written, ours = (
                crossed.get("teacher_tokenizer_hash") if isinstance(crossed, dict) else None,
                tokenizer_hash(self.tokenizer),
            )
            if not isinstance(written, str):
                raise ConfigError(
                    f"teacher.cache: '{self.source}' has no valid cross_tokenizer entry in its manifest (damaged); run "
                    "dsdistill teacher-cache again"
                )
            if written != ours:
                raise ConfigError(
                    f"teacher.tokenizer: the cache '{self.source}' was written for a teacher tokenizer {written}; "
                    f"this one's is {ours}"
                )
            method = crossed.get("method", "shared_topk")
            if method != self.options.method:
                raise ConfigError(
                    f"teacher.cross_tokenizer.method: the cache '{self.source}' holds {method} rows; this run compares "
                    f"by {self.options.method} (write the cache with this config)"
                )
            return
        own = self.inner.capabilities()
        k = self.maps.k(self.options.top_k)
        if own.distribution == "sparse" and not self.chunked and (own.top_k or 0) < k:
            raise ConfigError(
                f"teacher.options.top_k: {self.inner.noun} sends {own.top_k} tokens per position; "
                f"teacher.cross_tokenizer keeps {k} shared ones, so it needs at least as many (more is better: "
                "only its tokens that the student's vocabulary shares are kept)"
            )
        try:
            self.temperatures = tuple(t for t in run_temperatures(ctx.cfg, ctx.total_steps) if t != 1.0)
        except ConfigError as e:
            raise ConfigError(str(e).replace("a teacher cache stores", "a teacher with another tokenizer keeps")) from None

    def _check_sampled_text(self, ctx: RunContext) -> None:
        """A sampled row is text in the student's template: a teacher with a template of its own could only read
        it in that one, which is not what it reads elsewhere in the run."""
        from dsdistill.curriculum import Curriculum
        from dsdistill.data import teacher_text
        from dsdistill.formats import resolve_template

        cfg = ctx.cfg
        if not (Curriculum(cfg.curriculum).ever_on_policy or cfg.generation.probes(False)):
            return
        side = teacher_text(cfg, self.student_tokenizer)
        if side is None or side.template is None:
            return
        for i, src in enumerate(cfg.data.resolved_sources()):
            field = "data" if cfg.data.sources is None else f"data.sources[{i}]"
            if src.format == "chat" and resolve_template(src, self.student_tokenizer, field=field) != side.template:
                raise ConfigError(
                    f"{self.field}.chat_template: sampled completions are text in the student's chat template, and "
                    "this teacher renders conversations in its own; set teacher.cross_tokenizer.chat_template to the "
                    "student's template for on-policy distillation"
                )

    def placement(self, precision: str) -> str:
        return self.inner.placement(precision) if hasattr(self.inner, "placement") else "zero3"

    def describe(self) -> str:
        return f"{self.inner.describe()}, its own tokenizer ({len(self.tokenizer)} tokens; {self.shared_line()})"

    def shared_line(self) -> str:
        s, _ = self.maps.maps["any"] if self.maps.same else self.maps.maps["space"]
        if self.chunked:
            return f"{len(s) / len(self.student_tokenizer):.1%} of the student's tokens shared; chunks' likelihoods compared"
        k = self.maps.k(self.options.top_k)
        return f"{len(s) / len(self.student_tokenizer):.1%} of the student's tokens shared, top-{k} + rest per pair"

    def alignment(self, sample: int = 256) -> dict[str, Any]:
        """How the two tokenisations pair on the first `sample` examples of each source, rendered as the run
        renders them: what `dsdistill check` prints (computed once)."""
        if getattr(self, "_alignment", None) is None:
            self._alignment = _alignment(self, sample)
        return self._alignment

    def plan_lines(self) -> list[str]:
        a = self.alignment()
        lines = [
            f"cross-tokenizer ({self.options.method}): {a['shared_share']:.1%} of the student's tokens shared with the "
            f"teacher's; {a['teacher_per_student']:.2f} teacher tokens per student token; {a['paired_share']:.1%} of the "
            f"loss-bearing positions paired, {a['exact_share']:.1%} exactly (the same next token on both sides); "
            f"{a['unaligned']} of {a['examples']} sampled examples cannot align (dropped)"
        ]
        if (
            self.temperatures and not self.chunked
        ):  # what docs/quality.md measured: T = 2 made the demo's student worse than no teacher
            temps = ", ".join(f"{t:g}" for t in self.temperatures)
            lines.append(
                f"warning: curriculum.temperature reaches {temps}: with another tokenizer the rest bucket holds the "
                "teacher's mass on tokens the student's vocabulary lacks, and above T = 1 that mass grows; keep T = 1"
            )
        return lines

    def plan_json(self) -> dict[str, Any]:
        return {
            **self.inner.plan_json(),
            "cross_tokenizer": {"top_k": self.maps.k(self.options.top_k), "method": self.options.method, **self.alignment()},
        }

    def kd_semantics(self) -> dict[str, Any]:
        return {"top_k_support": "teacher", "cross_tokenizer": self.options.method}

    def build(self, plan: Any, *, needs: "Needs") -> CrossTeacher:
        inner = self.inner.build(plan, needs=needs)
        if isinstance(inner, LiveTeacher):
            inner.vocab = len(self.tokenizer)  # its own vocabulary, not the student's
        from dsdistill.data import teacher_text

        return CrossTeacher(
            inner,
            self.maps,
            top_k=self.options.top_k,
            temperatures=self.temperatures,
            ignore_index=plan.cfg.loss.ignore_index,
            student_tokenizer=self.student_tokenizer,
            text=teacher_text(self.cfg, self.student_tokenizer),
            student_rows=self.cached,
            method=self.options.method,
        )


def _alignment(plan: CrossPlan, sample: int) -> dict[str, Any]:
    """The alignment figures of `CrossPlan.alignment`, from each source's first examples."""
    import numpy as np

    from dsdistill.data import load_source, teacher_text
    from dsdistill.formats import renderer

    cfg, tok = plan.cfg, plan.student_tokenizer
    side = teacher_text(cfg, tok)
    by_context = [dict(zip(*(x.tolist() for x in plan.maps.of(c)))) for c in range(3)]
    examples = unaligned = s_tokens = t_tokens = bearing = paired = exact = 0
    for i, src in enumerate(cfg.data.resolved_sources()):
        field = "data" if cfg.data.sources is None else f"data.sources[{i}]"
        rows = list(itertools.islice(iter(load_source(src.path, src.split, field=f"{field}.path", streaming=True)), sample))
        if not rows:
            continue
        batch, idx = {k: [r.get(k) for r in rows] for k in rows[0]}, list(range(len(rows)))
        args = dict(field=field, where=f"'{src.path}'", ignore_index=cfg.loss.ignore_index, columns=list(rows[0]))
        alone = renderer(src, tok, **args)(batch, idx)
        both = renderer(src, tok, teacher=side, **args)(batch, idx)
        for a, ex in zip(alone, both):
            if a is None:
                continue  # no loss-bearing token at all: skipped in any run
            examples += 1
            if ex is None or ex.teacher is None:
                unaligned += 1
                continue
            t = ex.teacher
            s_tokens, t_tokens = s_tokens + len(ex.ids), t_tokens + len(t.ids)
            for p in range(len(ex.ids) - 1):
                if not ex.loss[p + 1]:
                    continue
                bearing += 1
                j = t.pair[p]
                if j >= 0:
                    paired += 1
                    exact += by_context[t.context[p]].get(ex.ids[p + 1]) == t.ids[j + 1] if j + 1 < len(t.ids) else 0
    s_shared = plan.maps.maps["any" if plan.maps.same else "space"][0]
    return {
        "shared_share": float(len(np.unique(s_shared)) / len(tok)),
        "teacher_per_student": t_tokens / s_tokens if s_tokens else 0.0,
        "paired_share": paired / bearing if bearing else 0.0,
        "exact_share": exact / bearing if bearing else 0.0,
        "unaligned": unaligned,
        "examples": examples,
    }
