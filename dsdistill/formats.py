"""Data formats: how one source's raw examples become token ids and a per-token loss mask.

Every format renders a batch of raw rows (columns as `datasets` gives them) into `Example`s, or None for a
row that is skipped (empty text, nothing that carries loss). The mask says which tokens the student is
trained to predict; the packers (dsdistill/packing.py) turn it into labels. Teacher and student see the
same ids, so one rendering serves both.

Chat conversations are rendered once, whole, with the chat template; each assistant turn's characters are
found by rendering the conversation up to that turn (with and without it), and a token carries loss when it
starts inside one of those spans (fast tokenizers give character offsets). This works for any template that
renders a conversation's prefix as a prefix of the whole, which is what generation relies on too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dsdistill.config import FormatFields
from dsdistill.errors import DataError, one_line

ROLES = ("system", "user", "assistant", "tool")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + (message['content'] or '') + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The ChatML template (`data.chat_template: chatml`), for tokenizers that ship none."""


@dataclass(frozen=True)
class Example:
    """One rendered example: token ids and, per token, whether the model is trained to predict it."""

    ids: list[int]
    loss: list[bool]
    route: int = -1
    """`teachers:` routed per source: the index of the teacher this example's KD comes from (-1: every one)."""
    teacher: Optional["TeacherTokens"] = None
    """`teacher.cross_tokenizer`: the same example in the teacher's tokens, and which positions pair."""

    @property
    def loss_tokens(self) -> int:
        return sum(self.loss)


@dataclass(frozen=True)
class TeacherTokens:
    """An example as a teacher with another tokenizer reads it."""

    ids: list[int]
    loss: list[bool]
    """Its tokens whose text lies in the loss-bearing spans (what its perplexity counts)."""
    pair: list[int]
    """Per student token i: the teacher token whose position has read the same text as student position i
    (both predict text starting at the same character), or -1."""
    context: list[int]
    """Per student token: the pair's context (an index into `crosstok.CONTEXTS`), or -1."""

    def cut(self, n: int) -> "TeacherTokens":
        """For the student example cut to its first n tokens: the pairs there, and the teacher tokens up to
        the last one a kept pair reads (and the one it predicts)."""
        pair, context = self.pair[:n], self.context[:n]
        if n:  # the kept student example's last position has no next token left
            pair, context = pair[:-1] + [-1], context[:-1] + [-1]
        end = max((p for p in pair if p >= 0), default=-1) + 2
        return TeacherTokens(self.ids[:end], self.loss[:end], pair, context)


class TeacherText:
    """The teacher's side of a cross-tokenizer run's examples: its tokenizer and chat template, and the pairing
    of its positions with the student's (dsdistill/crosstok.py)."""

    def __init__(self, tokenizer, template: Optional[str], *, same_spacing: bool, field: str = "teacher.cross_tokenizer"):
        self.tokenizer, self.template, self.field = tokenizer, template, field
        self.eos = tokenizer.eos_token_id
        self.same_spacing = same_spacing
        """Both tokenizers keep spaces in their tokens, or both drop them (`crosstok.shared_maps`: one map)."""

    def encode(
        self,
        text: str,
        s_offsets,
        spans: list[tuple[int, int]],
        *,
        s_count: int,
        eos: bool,
        teacher_text: Optional[str] = None,
        segments=None,
        teacher_spans: Optional[list[tuple[int, int]]] = None,
        encoded=None,
    ) -> TeacherTokens:
        """The teacher's tokens of `text` (or of `teacher_text`, its own rendering, whose `segments` hold the same
        text as the student's), paired with the student's `s_count` tokens (`s_offsets` into `text`; one more,
        an appended EOS, when `eos`)."""
        from dsdistill.crosstok import pair_positions

        t_text = text if teacher_text is None else teacher_text
        if encoded is None:  # (ids, offsets) of the teacher's text, when a batch was tokenised at once
            enc = self.tokenizer(t_text, add_special_tokens=False, return_offsets_mapping=True)
            encoded = (enc["input_ids"], enc["offset_mapping"])
        t_ids, t_off = list(encoded[0]), encoded[1]
        loss = _in_spans([a for a, _ in t_off], spans if teacher_spans is None else teacher_spans)
        sp, tp, ctx = pair_positions(s_offsets, t_off, text, teacher_text=teacher_text, segments=segments)
        pair, context = [-1] * s_count, [-1] * s_count
        for i, j, c in zip(sp.tolist(), tp.tolist(), ctx.tolist()):
            if self.same_spacing:  # every pair compares, by one shared map
                pair[i], context[i] = j, 0
            elif c >= 0:  # else a pair whose next text opens with whitespace has no counterpart token: none
                pair[i], context[i] = j, c
        if eos and self.eos is not None:
            if t_ids and len(s_offsets) and self.eos is not None and teacher_text is None:
                # the last text tokens on both sides predict the end of the document
                pair[len(s_offsets) - 1], context[len(s_offsets) - 1] = len(t_ids) - 1, 0 if self.same_spacing else 2
            t_ids.append(self.eos)
            loss.append(True)
        return TeacherTokens(t_ids, loss, pair, context)

    def render(self, messages: list[dict[str, Any]], *, generation: bool, guard: Callable[[Callable[[], str]], str]) -> str:
        return guard(
            lambda: self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation
            )
        )

    def segments(self, messages: list[dict[str, Any]], s_text: str, t_text: str, n: int, where: str):
        """(student start, end, teacher start, end) of each message's content in the two renderings, found in
        order; a DataError when a template renders some message's content otherwise (drops, rewrites or
        reorders it): then the two models would not read the same conversation."""
        out, s_at, t_at = [], 0, 0
        for j, m in enumerate(messages):
            content = m.get("content") or ""
            if not content:
                continue
            s_lo, t_lo = s_text.find(content, s_at), t_text.find(content, t_at)
            if s_lo < 0 or t_lo < 0:
                side = "student's" if s_lo < 0 else "teacher's"
                raise DataError(
                    f"{self.field}.chat_template: example {n} of {where}: the {side} template does not render message "
                    f"{j}'s content as given, so the two models would read different conversations; use templates that "
                    "keep every message's text (or the same template for both)"
                )
            out.append((s_lo, s_lo + len(content), t_lo, t_lo + len(content)))
            s_at, t_at = s_lo + len(content), t_lo + len(content)
        return out


Renderer = Callable[[dict[str, list], Sequence[int]], list[Optional[Example]]]
"""(a batch of raw rows by column, their row numbers in the source) -> one Example or None per row."""


def resolve_template(source: FormatFields, tokenizer, *, field: str) -> str:
    """The chat template to render with: `chat_template` (text, a file, or `chatml`) or the tokenizer's."""
    given = source.chat_template
    if given is None:
        own = getattr(tokenizer, "chat_template", None)
        if isinstance(own, dict):  # several named templates: the default one
            own = own.get("default")
        if not own:
            raise DataError(
                f"{field}.chat_template: the tokenizer '{getattr(tokenizer, 'name_or_path', '?')}' has no chat template; "
                "set it to a Jinja template, a .jinja file or 'chatml'"
            )
        return own
    if given == "chatml":
        return CHATML
    if "{" not in given:
        p = Path(given).expanduser()
        if not p.is_file():
            raise DataError(f"{field}.chat_template: '{given}' is neither a Jinja template, an existing file nor 'chatml'")
        try:
            return p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{field}.chat_template: cannot read '{given}' ({e})") from None
    return given


def required_columns(source: FormatFields) -> list[tuple[str, str]]:
    """(config field, column name) every row of the source must have."""
    if source.format == "text":
        return [("text_field", source.text_field)]
    if source.format == "chat":
        return [("messages_field", source.messages_field)]
    if source.format == "prompt_completion":
        return [("prompt_field", source.prompt_field), ("completion_field", source.completion_field)]
    return [("input_ids_field", source.input_ids_field)]


def check_columns(source: FormatFields, columns: list[str], *, field: str, where: str) -> None:
    """Every column the format reads exists (one line naming the field and the columns there are)."""
    for name, column in required_columns(source):
        if column not in columns:
            raise DataError(
                f"{field}.{name}: '{column}' is not a column of {where} (format {source.format}); "
                f"columns are: {', '.join(columns)}"
            )
    if source.format == "pretokenized":
        for name, optional in (("labels_field", source.labels_field), ("loss_mask_field", source.loss_mask_field)):
            if optional is not None and optional not in columns:
                raise DataError(f"{field}.{name}: '{optional}' is not a column of {where}; columns are: {', '.join(columns)}")
        if source.labels_field is not None and source.loss_mask_field is not None:
            raise DataError(f"{field}: set labels_field or loss_mask_field, not both")


def renderer(
    source: FormatFields,
    tokenizer,
    *,
    field: str,
    where: str,
    ignore_index: int,
    columns: Optional[list[str]] = None,
    teacher: Optional[TeacherText] = None,
) -> Renderer:
    """The function that renders this source's raw rows (checked against `columns` when they are known);
    with `teacher` (a cross-tokenizer run) every example carries the teacher's tokens too."""
    if columns is not None:
        check_columns(source, columns, field=field, where=where)
    if source.format == "text":
        return _TextRenderer(source, tokenizer, field=field, where=where, teacher=teacher)
    if source.format in ("chat", "prompt_completion"):
        return _ChatRenderer(source, tokenizer, field=field, where=where, teacher=teacher)
    if teacher is not None:
        raise DataError(
            f"{field}.format: pretokenized data holds only the student's ids; a teacher with another tokenizer "
            "(teacher.cross_tokenizer) needs the text: use text, chat or prompt_completion data"
        )
    labels = source.labels_field
    mask = source.loss_mask_field
    if columns is not None and labels is None and mask is None:
        labels = "labels" if "labels" in columns else None
        mask = "loss_mask" if labels is None and "loss_mask" in columns else None
    return _PretokenizedRenderer(source, tokenizer, field=field, where=where, labels=labels, mask=mask, ignore_index=ignore_index)


def separator_id(source: FormatFields, tokenizer, *, field: str) -> Optional[int]:
    """The id that closes each text document: `separator` (a token of the vocabulary), else the EOS."""
    if source.separator is None:
        return tokenizer.eos_token_id
    vocab = tokenizer.get_vocab()
    if source.separator not in vocab:
        raise DataError(
            f"{field}.separator: {source.separator!r} is not a token of the tokenizer's vocabulary; expected one token "
            f"such as {tokenizer.eos_token!r}"
        )
    return vocab[source.separator]


class _TextRenderer:
    """Raw text: every token carries loss; EOS closes each document."""

    def __init__(self, source: FormatFields, tokenizer, *, field: str, where: str, teacher: Optional[TeacherText] = None):
        self.column, self.tokenizer, self.field, self.where = source.text_field, tokenizer, field, where
        self.eos = separator_id(source, tokenizer, field=field)
        self.teacher = teacher

    def __call__(self, batch: dict[str, list], rows: Sequence[int]) -> list[Optional[Example]]:
        texts = batch[self.column]
        for i, t in enumerate(texts):
            if t is not None and not isinstance(t, str):
                raise DataError(
                    f"{self.field}.text_field: '{self.column}' in {self.where} holds {type(t).__name__} values "
                    f"(example {rows[i]}); expected strings"
                )
        keep = [i for i, t in enumerate(texts) if t]
        cross = self.teacher is not None
        enc = self.tokenizer([texts[i] for i in keep], add_special_tokens=False, return_offsets_mapping=cross) if keep else {}
        ids = enc["input_ids"] if keep else []
        out: list[Optional[Example]] = [None] * len(texts)
        if self.teacher is not None and keep:  # the teacher's tokens of the batch in one call
            t_enc = self.teacher.tokenizer([texts[i] for i in keep], add_special_tokens=False, return_offsets_mapping=True)
        for n, (i, doc) in enumerate(zip(keep, ids)):
            doc = list(doc) + ([self.eos] if self.eos is not None else [])
            side = None
            if self.teacher is not None:
                text = texts[i]
                side = self.teacher.encode(
                    text,
                    enc["offset_mapping"][n],
                    [(0, len(text))],
                    s_count=len(doc),
                    eos=self.eos is not None,
                    encoded=(t_enc["input_ids"][n], t_enc["offset_mapping"][n]),
                )
            out[i] = _aligned(Example(doc, [True] * len(doc), teacher=side))
        return out


class _ChatRenderer:
    """Conversations (chat) and prompt/completion pairs, rendered with offsets so masks follow characters."""

    def __init__(self, source: FormatFields, tokenizer, *, field: str, where: str, teacher: Optional[TeacherText] = None):
        self.source, self.tokenizer, self.field, self.where = source, tokenizer, field, where
        self.teacher = teacher
        self.chat = source.format == "chat"
        self.template = resolve_template(source, tokenizer, field=field) if self.chat else None
        self.eos = tokenizer.eos_token_id
        self._direct_parts: Optional[tuple] = None
        if not getattr(tokenizer, "is_fast", False):
            raise DataError(
                f"{field}.format: {source.format} needs a fast tokenizer (character offsets locate the loss-bearing "
                f"tokens); '{getattr(tokenizer, 'name_or_path', '?')}' is a slow one"
            )

    # -- chat

    def _render(self, messages: list[dict[str, Any]], *, generation: bool = False, n: int = -1) -> str:
        return self._guard(
            lambda: self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, tokenize=False, add_generation_prompt=generation
            ),
            n,
        )

    def _guard(self, render: Callable[[], str], n: int) -> str:
        import jinja2

        try:
            return render()
        except jinja2.TemplateSyntaxError as e:
            raise DataError(f"{self.field}.chat_template: the template does not parse (line {e.lineno}: {e.message})") from None
        except jinja2.TemplateError as e:  # raise_exception(), an undefined name, a sandbox refusal
            what = "refused by the sandbox" if type(e).__name__ == "SecurityError" else "failed"
            raise DataError(
                one_line(f"{self.field}.chat_template: the template {what} on example {n} of {self.where}: {e}")[:400]
            ) from None

    def _check_messages(self, messages: Any, n: int) -> list[dict[str, Any]]:
        col = self.source.messages_field
        if not isinstance(messages, list) or not messages:
            raise DataError(
                f"{self.field}.messages_field: example {n} of {self.where} has {type(messages).__name__} in "
                f"'{col}'; expected a non-empty list of messages"
            )
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise DataError(
                    f"{self.field}.messages_field: example {n} of {self.where}, message {j}: expected a mapping with "
                    "'role' and 'content'"
                )
            if m["role"] not in ROLES:
                raise DataError(
                    f"{self.field}.messages_field: example {n} of {self.where}, message {j} has role {m['role']!r}; "
                    f"expected one of {', '.join(ROLES)}"
                )
            content = m.get("content")
            if content is not None and not isinstance(content, str):
                raise DataError(
                    f"{self.field}.messages_field: example {n} of {self.where}, message {j} has "
                    f"{type(content).__name__} content; expected text"
                )
            if content is None and not m.get("tool_calls"):
                raise DataError(f"{self.field}.messages_field: example {n} of {self.where}, message {j} has no content")
        # datasets fills missing keys of a struct column with None; a template sees only what was given
        return [{k: v for k, v in m.items() if v is not None} for m in messages]

    def _direct(self):
        """(compiled template, plain-data conversion, reasoning aliases, context) to render prefixes with the
        same compiled template `apply_chat_template` uses, without its per-call conversion of every message
        (which made rendering a conversation's prefixes quadratic twice over); None where this transformers
        has no such helpers (then every render goes through `apply_chat_template`)."""
        if self._direct_parts is None:
            try:
                from transformers.utils import chat_template_utils as ctu

                compiled = ctu._compile_jinja_template(self.template)
                plain, alias = ctu._plain_template_data, ctu._alias_reasoning_fields
                self._direct_parts = (compiled, plain, alias, plain(dict(self.tokenizer.special_tokens_map)))
            except Exception:  # another transformers: the public path only
                self._direct_parts = ()
        return self._direct_parts or None

    def _prefixes(self, messages: list[dict[str, Any]], full: str, n: int) -> Callable[[int, bool], str]:
        """(k, generation) -> the rendering of messages[:k]. Directly with the compiled template when that renders
        the whole conversation exactly as `apply_chat_template` did (checked on every conversation), else
        through `apply_chat_template`."""
        direct = self._direct()
        if direct is not None:
            compiled, plain, alias, context = direct
            chat = alias(plain(messages))

            def render(k: int, generation: bool) -> str:
                return compiled.render(messages=chat[:k], tools=None, documents=None, add_generation_prompt=generation, **context)

            try:
                same = render(len(chat), False) == full
            except Exception:
                same = False
            if same:
                return lambda k, generation: self._guard(lambda: render(k, generation), n)
        return lambda k, generation: self._render(messages[:k], generation=generation, n=n)

    def _spans(self, messages: list[dict[str, Any]], full: str, turns: list[int], n: int) -> list[tuple[int, int]]:
        """Character spans of the given assistant turns in the rendered conversation."""
        spans = []
        prefix = self._prefixes(messages, full, n) if turns else None
        for i in turns:
            assert prefix is not None
            before = prefix(i, True) if i > 0 else ""
            upto = prefix(i + 1, False)
            if not (full.startswith(before) and full.startswith(upto) and len(before) <= len(upto)):
                raise DataError(
                    f"{self.field}.chat_template: example {n} of {self.where}: the template does not render the "
                    f"conversation up to message {i} as a prefix of the whole, so its assistant tokens cannot be "
                    "located; use a template without history rewriting, or data.loss_on: all"
                )
            spans.append((len(before), len(upto)))
        return spans

    def _chat_example(self, messages: Any, n: int, *, first_loss_turn: int = 0) -> Optional[Example]:
        messages = self._check_messages(messages, n)
        full = self._render(messages, n=n)
        loss_on = self.source.loss_on if self.chat else "assistant"
        if loss_on == "all":
            spans = [(0, len(full))]
        else:
            turns = [i for i, m in enumerate(messages) if m["role"] == "assistant" and i >= first_loss_turn]
            if messages[-1]["role"] in ("user", "tool"):
                # a conversation waiting for its answer is all prompt (earlier answers are its context): the
                # whole history and the generation prompt, for on-policy sampling; no loss of its own
                prompt = self._render(messages, generation=True, n=n)
                return self._tokenize(prompt, [], eos=False, prompt_only=True, messages=(messages, True, n))
            if loss_on == "last_assistant":
                turns = turns[-1:]
            spans = self._spans(messages, full, turns, n)
        return self._tokenize(full, spans, eos=False, messages=(messages, False, n))

    # -- prompt / completion

    def _pair_example(self, prompt: Any, completion: Any, n: int) -> Optional[Example]:
        s = self.source
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational prompt and completion
            if self.template is None:
                self.template = resolve_template(s, self.tokenizer, field=self.field)
            return self._chat_example(prompt + completion, n, first_loss_turn=len(prompt))
        for name, value in (("prompt_field", prompt), ("completion_field", completion)):
            if not isinstance(value, str):
                raise DataError(
                    f"{self.field}.{name}: example {n} of {self.where} holds {type(value).__name__}; expected text "
                    "(or message lists in both fields)"
                )
        if not completion:
            return None
        return self._tokenize(prompt + completion, [(len(prompt), len(prompt) + len(completion))], eos=True)

    def _tokenize(
        self, text: str, spans: list[tuple[int, int]], *, eos: bool, prompt_only: bool = False, messages=None
    ) -> Optional[Example]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = list(enc["input_ids"])
        loss = _in_spans([start for start, _ in enc["offset_mapping"]], spans)
        if eos and self.eos is not None:
            ids.append(self.eos)
            loss.append(True)  # the student learns where a completion ends
        if not ids or not (any(loss) or prompt_only):
            return None
        side = None
        if self.teacher is not None:
            side = self._teacher_side(text, enc["offset_mapping"], spans, len(ids), eos=eos, messages=messages)
        return _aligned(Example(ids, loss, teacher=side)) if not prompt_only else Example(ids, loss, teacher=side)

    def _teacher_side(self, text: str, offsets, spans, count: int, *, eos: bool, messages) -> TeacherTokens:
        """The teacher's tokens of this example: of the same text, or of its own template's rendering of the same
        messages (then only the messages' content pairs, and its loss spans are the loss-bearing content)."""
        assert self.teacher is not None
        if messages is None or self.teacher.template is None:
            return self.teacher.encode(text, offsets, spans, s_count=count, eos=eos)
        msgs, generation, n = messages
        own = self.teacher.render(msgs, generation=generation, guard=lambda f: self._guard(f, n))
        if own == text:
            return self.teacher.encode(text, offsets, spans, s_count=count, eos=eos)
        segments = self.teacher.segments(msgs, text, own, n, self.where)
        t_spans = [
            (t_lo + max(a, s_lo) - s_lo, t_lo + min(b, s_hi) - s_lo)
            for s_lo, s_hi, t_lo, _ in segments
            for a, b in spans
            if max(a, s_lo) < min(b, s_hi)
        ]
        return self.teacher.encode(
            text, offsets, spans, s_count=count, eos=eos, teacher_text=own, segments=segments, teacher_spans=t_spans
        )

    def __call__(self, batch: dict[str, list], rows: Sequence[int]) -> list[Optional[Example]]:
        s = self.source
        if self.chat:
            return [self._chat_example(m, rows[i]) for i, m in enumerate(batch[s.messages_field])]
        return [
            self._pair_example(p, c, rows[i]) for i, (p, c) in enumerate(zip(batch[s.prompt_field], batch[s.completion_field]))
        ]


def _aligned(ex: Example) -> Optional[Example]:
    """The example, or None (skipped, like an example with no loss) when it has a teacher side and none of its
    loss-bearing tokens is predicted at a position the teacher has one for: the two tokenisations never cut
    at the same character, so a cross-tokenizer run has nothing to compare on it."""
    if ex.teacher is None:
        return ex
    pair, loss = ex.teacher.pair, ex.loss
    return ex if any(pair[i] >= 0 and loss[i + 1] for i in range(len(loss) - 1)) else None


def _in_spans(starts: list[int], spans: list[tuple[int, int]]) -> list[bool]:
    """For each token start, whether it lies in one of the character spans (any order, may overlap)."""
    if not spans or not starts:
        return [False] * len(starts)
    if len(spans) == 1:
        a, b = spans[0]
        return [a <= s < b for s in starts]
    import numpy as np

    # merged, sorted spans: a start is inside when the last span beginning at or before it has not ended
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        elif a < b:
            merged.append([a, b])
    if not merged:
        return [False] * len(starts)
    lo = np.array([a for a, _ in merged])
    hi = np.array([b for _, b in merged])
    at = np.asarray(starts)
    j = np.searchsorted(lo, at, side="right") - 1
    return ((j >= 0) & (at < hi[np.maximum(j, 0)])).tolist()


class _PretokenizedRenderer:
    """Token ids as given, with loss from a labels or a 0/1 loss-mask column (every token without either)."""

    def __init__(self, source: FormatFields, tokenizer, *, field: str, where: str, labels, mask, ignore_index: int):
        self.source, self.field, self.where = source, field, where
        self.labels, self.mask, self.ignore = labels, mask, ignore_index
        self.vocab = len(tokenizer)

    def __call__(self, batch: dict[str, list], rows: Sequence[int]) -> list[Optional[Example]]:
        s = self.source
        out: list[Optional[Example]] = []
        for i, ids in enumerate(batch[s.input_ids_field]):
            n = rows[i]
            if not isinstance(ids, (list, tuple)) or any(not isinstance(t, int) or isinstance(t, bool) for t in ids):
                raise DataError(f"{self.field}.input_ids_field: example {n} of {self.where}: expected a list of token ids")
            if not ids:
                out.append(None)
                continue
            bad = next((t for t in ids if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise DataError(
                    f"{self.field}.input_ids_field: example {n} of {self.where} holds token id {bad}; the tokenizer has "
                    f"{self.vocab} tokens (ids 0..{self.vocab - 1})"
                )
            if self.labels is not None:
                labels = batch[self.labels][i]
                if not isinstance(labels, (list, tuple)) or len(labels) != len(ids):
                    raise DataError(
                        f"{self.field}.labels_field: example {n} of {self.where}: expected {len(ids)} labels (one per token)"
                    )
                if any(lab != self.ignore and lab != t for lab, t in zip(labels, ids)):
                    raise DataError(
                        f"{self.field}.labels_field: example {n} of {self.where}: labels must equal input_ids where they "
                        f"carry loss and be {self.ignore} elsewhere (dsdistill shifts them itself)"
                    )
                loss = [lab != self.ignore for lab in labels]
            elif self.mask is not None:
                mask = batch[self.mask][i]
                if not isinstance(mask, (list, tuple)) or len(mask) != len(ids) or any(v not in (0, 1) for v in mask):
                    raise DataError(
                        f"{self.field}.loss_mask_field: example {n} of {self.where}: expected {len(ids)} values of 0 or 1"
                    )
                loss = [bool(v) for v in mask]
            else:
                loss = [True] * len(ids)
            out.append(Example(list(ids), loss) if any(loss) else None)
        return out
