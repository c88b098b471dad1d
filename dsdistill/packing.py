"""Packing: rendered examples into fixed-length rows of `seq_len` tokens.

- `concat` joins examples and cuts the stream into blocks (attention runs across example boundaries; the
  right choice for pretraining-style text, and what dsdistill always did).
- `documents` puts whole examples side by side: each example's positions restart at 0, which transformers
  turns into a block-diagonal causal mask (SDPA) or variable-length flash attention, so no example attends
  to another; the rest of a row is padding.
- `none` gives each example its own row, padded.

Labels are the ids where a token carries loss and the ignore index elsewhere. A row's first token of each
packed example never carries loss (the position before it belongs to another example), and padding never
does. Rows carry `position_ids` unless packing is `concat` (then the model's own positions are exact).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch

from dsdistill.errors import DataError
from dsdistill.formats import Example

Row = dict[str, list[int]]
TEACHER_IGNORE = -100
"""A cross-tokenizer teacher row's label where its token carries no loss (any negative reads as none)."""


@dataclass
class PackStats:
    """What packing did to a run of examples (added up over batches and sources)."""

    examples: int = 0
    """Examples rendered (skipped ones not included)."""
    skipped: int = 0
    """Rows that rendered to nothing: empty text, or no token that carries loss."""
    truncated: int = 0
    """Examples longer than seq_len cut to it (documents/none packing)."""
    dropped: int = 0
    """Examples longer than seq_len left out (documents/none packing with overlong: drop)."""
    emptied: int = 0
    """Examples that truncation to seq_len left with none of their loss-bearing tokens (say `loss_on:
    last_assistant` with the last answer past the cut): left out, since they would train on nothing."""
    sequences: int = 0
    """Packed rows."""
    tokens: int = 0
    """Token positions in the rows that are not padding."""
    loss_tokens: int = 0
    """Positions whose next token carries loss: what every token-level normaliser counts."""

    def add(self, other: "PackStats") -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))

    @property
    def loss_share(self) -> float:
        return self.loss_tokens / self.tokens if self.tokens else 0.0


@dataclass
class Packer:
    """Packs one batch of examples at a time (rows never span batches, so a batch's rows depend on that
    batch alone: what makes a streamed position resumable)."""

    kind: str
    seq_len: int
    pad_id: int
    ignore_index: int
    overlong: str = "truncate"
    labels: bool = True
    """Write labels (False only for concat packing of all-loss text, whose labels are its ids)."""
    routes: bool = False
    """Write `route`: each token's example's teacher (`Example.route`; -1 for padding), for routed teachers."""
    stats: PackStats = field(default_factory=PackStats)

    def __call__(self, examples: Iterable[Optional[Example]]) -> list[Row]:
        batch = PackStats()
        kept: list[Example] = []
        for ex in examples:
            if ex is None:
                batch.skipped += 1
                continue
            batch.examples += 1
            if self.kind != "concat" and len(ex.ids) > self.seq_len:
                if self.overlong == "drop":
                    batch.dropped += 1
                    continue
                side = None if ex.teacher is None else ex.teacher.cut(self.seq_len)
                cut = Example(ex.ids[: self.seq_len], ex.loss[: self.seq_len], ex.route, side)
                if any(ex.loss) and not any(cut.loss[1:]):  # an example's first token is never a target
                    batch.emptied += 1
                    continue
                batch.truncated += 1
                ex = cut
            kept.append(ex)
        if self.kind == "concat" and any(ex.teacher is not None for ex in kept):
            raise DataError(
                "data.packing: concat cuts examples mid-text, where a teacher with another tokenizer "
                "(teacher.cross_tokenizer) has no matching cut; set data.packing: documents (or none)"
            )
        rows = self._concat(kept) if self.kind == "concat" else self._documents(kept, one_per_row=self.kind == "none")
        batch.sequences = len(rows)
        batch.tokens = len(rows) * self.seq_len if self.kind == "concat" else sum(len(ex.ids) for ex in kept)
        for row in rows:
            labels = row.get("labels", row["input_ids"])
            batch.loss_tokens += len(labels) - 1 - labels[1:].count(self.ignore_index)
        self.stats.add(batch)
        return rows

    def _label(self, ex: Example) -> list[int]:
        return [t if keep else self.ignore_index for t, keep in zip(ex.ids, ex.loss)]

    def _concat(self, examples: list[Example]) -> list[Row]:
        flat: list[int] = []
        labels: list[int] = []
        routes: list[int] = []
        for ex in examples:
            flat.extend(ex.ids)
            if self.labels:
                labels.extend(self._label(ex))
            if self.routes:
                routes.extend([ex.route] * len(ex.ids))
        n = len(flat) // self.seq_len
        rows = []
        for i in range(n):
            cut = slice(i * self.seq_len, (i + 1) * self.seq_len)
            row: Row = {"input_ids": flat[cut]}
            if self.labels:
                row["labels"] = labels[cut]
            if self.routes:
                row["route"] = routes[cut]
            rows.append(row)
        return rows

    def _documents(self, examples: list[Example], *, one_per_row: bool) -> list[Row]:
        rows: list[Row] = []
        ids: list[int] = []
        labels: list[int] = []
        pos: list[int] = []
        routes: list[int] = []
        # a cross-tokenizer run's teacher row: the same examples in the teacher's tokens (as long as they are)
        t_ids: list[int] = []
        t_labels: list[int] = []
        t_pos: list[int] = []
        x_pos: list[int] = []
        x_ctx: list[int] = []
        cross = any(ex.teacher is not None for ex in examples)

        def flush():
            if not ids:
                return
            pad = self.seq_len - len(ids)
            # padding is one more "example" of its own (positions from 0), so it attends only to itself
            row = {
                "input_ids": ids + [self.pad_id] * pad,
                "labels": labels + [self.ignore_index] * pad,
                "position_ids": pos + list(range(pad)),
            }
            if self.routes:
                row["route"] = routes + [-1] * pad
            if cross:
                row.update(
                    t_input_ids=list(t_ids),
                    t_labels=list(t_labels),
                    t_position_ids=list(t_pos),
                    x_pos=x_pos + [-1] * pad,
                    x_ctx=x_ctx + [-1] * pad,
                )
            rows.append(row)
            for part in (ids, labels, pos, routes, t_ids, t_labels, t_pos, x_pos, x_ctx):
                part.clear()

        for ex in examples:
            if one_per_row or len(ids) + len(ex.ids) > self.seq_len:
                flush()
            lab = self._label(ex)
            lab[0] = self.ignore_index  # predicted from the previous example's last position: never a target
            ids.extend(ex.ids)
            labels.extend(lab)
            pos.extend(range(len(ex.ids)))
            routes.extend([ex.route] * len(ex.ids))
            if cross:
                side = ex.teacher
                assert side is not None, "every example of a cross-tokenizer run has its teacher tokens"
                base = len(t_ids)
                t_lab = [t if keep else TEACHER_IGNORE for t, keep in zip(side.ids, side.loss)]
                if t_lab:
                    t_lab[0] = TEACHER_IGNORE
                t_ids.extend(side.ids)
                t_labels.extend(t_lab)
                t_pos.extend(range(len(side.ids)))
                x_pos.extend(p + base if p >= 0 else -1 for p in side.pair)
                x_ctx.extend(side.context)
        flush()
        return rows


def check_separation(
    role: str, model_type: str, logits_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *, vocab: int, device, half: bool
) -> None:
    """Refuse `documents` packing for a model that lets packed examples see each other: an example's logits
    must not change when another example is packed before it. transformers separates examples by their
    restarting positions for most families; some (OPT, Falcon) compute positions or masks their own way."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, vocab, (6,), generator=g), torch.randint(0, vocab, (5,), generator=g)
    with torch.no_grad():
        alone = logits_of(a[None].to(device), torch.arange(6)[None].to(device)).float()
        packed_ids = torch.cat([b, a])[None].to(device)
        packed_pos = torch.cat([torch.arange(5), torch.arange(6)])[None].to(device)
        packed = logits_of(packed_ids, packed_pos)[:, 5:].float()
    scale = max(1.0, float(alone.abs().max()))
    if float((packed - alone).abs().max()) > (5e-2 if half else 1e-3) * scale:
        raise DataError(
            f"data.packing: documents: the {role} ({model_type}) lets packed examples attend to each other (its "
            "attention does not follow restarting positions); use data.packing: none"
        )
