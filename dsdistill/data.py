"""Data: load with HF `datasets`, render each source's format (dsdistill/formats.py), pack to `seq_len`
(dsdistill/packing.py), split, and shard per rank.

Two ways to the same rows:
- one source read whole (the default): rendered and packed up front with `datasets.map` (cached, memory-
  mapped); training draws rows with a seeded `DistributedSampler`, and the plan's counts are exact;
- streamed (`data.streaming`, or any mixture of `data.sources`): each rank reads and renders its own part
  lazily, a block of examples at a time, so startup and memory do not grow with the corpus. A block's
  source choices are drawn from (seed, rank, block), and a block's rows depend on that block alone, so a
  position (block, row, where each source stood) resumes exactly.

Evaluation shards by stride and pads the shorter ranks with fully-masked batches, so every rank runs the
same number of forwards (ZeRO-3 needs every rank in every forward) and nothing is counted twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import math
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from dsdistill.config import RunConfig, SourceConfig
from dsdistill.errors import DataError, one_line
from dsdistill.formats import Example, Renderer, TeacherText, TeacherTokens, renderer
from dsdistill.packing import TEACHER_IGNORE, Packer, PackStats

BLOCK = 1024
"""Examples per streamed block (rows never span blocks: a block's rows depend on it alone)."""
SAMPLE = 2000
"""Examples of a streamed source rendered by the plan (its counts are estimates from them)."""

BUILDERS = {".jsonl": "json", ".json": "json", ".txt": "text", ".text": "text", ".csv": "csv", ".parquet": "parquet"}


def _quiet_datasets():
    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


@contextlib.contextmanager
def main_process_first():
    """Rank 0 runs the block first (writing any dataset cache), then the others (reading it)."""
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank() if distributed else 0
    if distributed and rank != 0:
        dist.barrier()
    try:
        yield
    finally:
        if distributed and rank == 0:
            dist.barrier()


def _looks_local(path: str) -> bool:
    p = Path(path)
    return path.startswith((".", "/", "~")) or p.suffix.lower() in BUILDERS or path.count("/") != 1


def load_source(path: str, split: str, *, field: str, streaming: bool = False):
    """A `datasets.Dataset` (or, streaming, an `IterableDataset`) from a local file, a directory of data
    files, a directory written by `save_to_disk`, or a Hub dataset name."""
    datasets = _quiet_datasets()
    p = Path(path).expanduser()
    try:
        if p.is_file():
            builder = BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise DataError(f"{field}: '{path}' has extension '{p.suffix}'; expected one of {', '.join(BUILDERS)}")
            if split != "train":
                raise DataError(f"{field}: '{path}' is a single file and has only a 'train' split, not '{split}'")
            if builder not in ("parquet", "json") or p.stat().st_size < (64 << 20):
                _check_text_file(p, field=field, path=path)  # a streamed corpus is not scanned whole up front
            elif p.stat().st_size == 0:
                raise DataError(f"{field}: '{path}' is empty; expected at least one document")
            return datasets.load_dataset(builder, data_files={"train": str(p)}, split="train", streaming=streaming)
        if p.is_dir():
            if (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file():
                ds = datasets.load_from_disk(str(p))  # memory-mapped Arrow, whatever its size
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise DataError(f"{field}: '{path}' has no split '{split}'; splits are: {', '.join(ds)}")
                    ds = ds[split]
                elif split != "train":
                    raise DataError(f"{field}: '{path}' is a single saved dataset with no split '{split}'")
                return ds.to_iterable_dataset(num_shards=max(1, min(64, ds.num_rows))) if streaming else ds
            _check_data_dir(p, field=field, path=path)
            return datasets.load_dataset(str(p), split=split, streaming=streaming)
        if _looks_local(path):
            raise DataError(f"{field}: '{path}' does not exist; expected a data file, a dataset directory or a Hub name")
        return datasets.load_dataset(path, split=split, streaming=streaming)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the file and the reason
        cause = _root_cause(e)
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(
                f"{field}: '{path}' is not UTF-8 text ({cause.reason} at byte {cause.start} of a block); "
                "expected UTF-8 encoded text"
            ) from None
        bad = _first_bad_json_line(p) if p.is_file() and p.suffix.lower() in (".jsonl", ".json") else None
        if bad is not None:
            raise DataError(
                f"{field}: '{path}' line {bad[0]} is not a JSON object ({bad[1]}); expected one object per line"
            ) from None
        raise DataError(
            one_line(f"{field}: cannot load '{path}' (split '{split}'): {type(cause).__name__}: {cause}")[:400]
        ) from None


MODEL_FILES = ("config.json", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "tokenizer.json")


def _check_data_dir(p: Path, *, field: str, path: str) -> None:
    """A directory that holds data files `datasets` reads, not a model directory or nothing."""
    files = [f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in f.relative_to(p).parts)]
    if {f.name for f in files} & set(MODEL_FILES[1:]) and (p / "config.json").is_file():
        raise DataError(f"{field}: '{path}' is a model directory (config.json and weights or a tokenizer), not data")
    if not any(f.suffix.lower() in BUILDERS for f in files):
        raise DataError(
            f"{field}: '{path}' holds no data files; expected files ending in {', '.join(BUILDERS)}, or a directory "
            "written by save_to_disk"
        )


def _first_bad_json_line(p: Path, limit: int = 1 << 30) -> Optional[tuple[int, str]]:
    """(line number, what is wrong) of the first line of a JSON-lines file that is not a JSON object."""
    if p.stat().st_size > limit:
        return None
    with open(p, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError as e:
                return n, f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
            if not isinstance(obj, dict):
                return n, f"a {type(obj).__name__}"
    return None


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    nxt = e.__cause__ or e.__context__
    while nxt is not None and id(e) not in seen:
        seen.add(id(e))
        e, nxt = nxt, nxt.__cause__ or nxt.__context__
    return e


def _check_text_file(p: Path, *, field: str, path: str) -> None:
    """An empty file or bytes that are not UTF-8 are named here, before `datasets` turns them into
    StopIteration or DatasetGenerationError. The decode scan is streamed (a few GB/s)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    seen_text = False
    offset = 0
    with open(p, "rb") as fh:
        while chunk := fh.read(1 << 20):
            try:
                text = decoder.decode(chunk)
            except UnicodeDecodeError as e:
                raise DataError(
                    f"{field}: '{path}' is not UTF-8 text (byte 0x{chunk[e.start]:02x} at offset {offset + e.start}); "
                    "expected UTF-8 encoded text"
                ) from None
            seen_text = seen_text or bool(text.strip())
            offset += len(chunk)
    if not seen_text:
        raise DataError(f"{field}: '{path}' is empty; expected at least one document")


def _check_text_column(ds, text_field: str, field: str, where: str) -> int:
    """The text column of a whole dataset; the number of documents with a null or empty text (skipped)."""
    if len(ds) == 0:
        raise DataError(f"{where} is empty; expected at least one document")
    empty = count_empty(ds, text_field)
    if empty == len(ds):
        raise DataError(f"{field}.text_field: every one of the {len(ds)} documents in {where} has a null or empty '{text_field}'")
    return empty


def count_empty(ds, text_field: str) -> int:
    """Documents whose text is null or the empty string (counted on the Arrow column, no Python loop)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = ds.data.column(text_field)
    if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
        return col.null_count
    empty = pc.sum(pc.equal(pc.utf8_length(col), 0)).as_py() or 0
    return col.null_count + int(empty)


def unknown_share(rows, tokenizer, sample: int = 512) -> float:
    """Share of the tokenizer's unknown token among the first `sample` packed rows (0 without one)."""
    unk = tokenizer.unk_token_id
    if unk is None or len(rows) == 0:
        return 0.0
    ids = [rows[i]["input_ids"] for i in range(min(sample, len(rows)))]
    t = torch.cat([torch.as_tensor(x).flatten() for x in ids])
    return float((t == unk).float().mean())


# ---------------------------------------------------------------------------------------------- the plan


@dataclass
class SourcePlan:
    """One source as the plan reports it."""

    name: str
    path: str
    format: str
    weight: float
    streaming: bool
    train: PackStats
    eval: PackStats
    estimated: bool = False
    """The train counts come from the first examples of the stream (`sampled` of them), not a full pass."""
    sampled: int = 0
    rows: Optional[int] = None
    """Examples the source holds, when known without reading it (whole datasets, Parquet metadata)."""

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["train"]["loss_share"] = self.train.loss_share
        return out


@dataclass
class Splits:
    """The run's data: packed rows (or the recipe to stream them), eval rows, and what the plan reports."""

    train: Any
    """Packed training rows (a `datasets.Dataset`), or None when training streams."""
    eval: Any
    """Packed eval rows of every source (indexable; each row a dict of tensors)."""
    sources: list[SourcePlan]
    packing: str
    readers: list[Callable[[int, int], "SourceReader"]] = field(default_factory=list)
    """Streamed: per source, (rank, world) -> this rank's reader."""
    weights: list[float] = field(default_factory=list)
    eval_by_source: dict[str, Any] = field(default_factory=dict)
    """A mixture's eval rows per source name (empty for one source)."""
    unknown_share: float = 0.0
    """Share of unknown-token ids in (a sample of) the packed training data."""

    @property
    def streamed(self) -> bool:
        return self.train is None

    def totals(self) -> PackStats:
        out = PackStats()
        for s in self.sources:
            out.add(s.train)
        return out


def source_names(sources: list[SourceConfig]) -> list[str]:
    """Each source's name: given, else its file or directory name (made unique)."""
    names: list[str] = []
    for s in sources:
        base = s.name or Path(s.path.rstrip("/")).name or s.path
        name, k = base, 2
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


_TEACHER_TEXT: dict[str, TeacherText] = {}


def teacher_text(cfg: RunConfig, student_tokenizer) -> Optional[TeacherText]:
    """A cross-tokenizer run's teacher side of the data (its tokenizer and chat template), loaded once; None
    for a run whose teacher reads the student's ids."""
    spec = cfg.teacher
    if spec is None or spec.cross_tokenizer is None:
        return None
    key = f"{spec.model_dump_json()}|{getattr(student_tokenizer, 'name_or_path', '')}"
    if key not in _TEACHER_TEXT:
        from dsdistill.config import FormatFields
        from dsdistill.formats import resolve_template
        from dsdistill.models import load_tokenizer

        field = "teacher.cross_tokenizer"
        tok = load_tokenizer(spec, field="teacher")
        if not getattr(tok, "is_fast", False):
            raise DataError(
                f"{field}: the teacher's tokenizer '{spec.tokenizer or spec.path}' is a slow one; aligning two "
                "tokenisations needs character offsets (a fast tokenizer)"
            )
        given, own = spec.cross_tokenizer.chat_template, getattr(tok, "chat_template", None)
        template = None
        if given is not None or own:
            template = resolve_template(FormatFields(chat_template=given), tok, field=field)
        from dsdistill.crosstok import spaced

        _TEACHER_TEXT[key] = TeacherText(tok, template, same_spacing=spaced(tok) == spaced(student_tokenizer), field=field)
    return _TEACHER_TEXT[key]


def _packing(cfg: RunConfig, sources: list[SourceConfig]) -> str:
    if cfg.data.packing is not None:
        return cfg.data.packing
    cross = cfg.teacher is not None and cfg.teacher.cross_tokenizer is not None  # whole examples on both sides
    return "concat" if all(s.format == "text" for s in sources) and not cross else "documents"


def _packer(cfg: RunConfig, tokenizer, kind: str, sources: list[SourceConfig]) -> Packer:
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    return Packer(
        kind=kind,
        seq_len=cfg.train.seq_len,
        pad_id=pad,
        ignore_index=cfg.loss.ignore_index,
        overlong=cfg.data.overlong,
        labels=not (kind == "concat" and all(s.format == "text" for s in sources)),
    )


# ---------------------------------------------------------------------------------------------- whole datasets


def _render_dataset(ds, render: Renderer, *, with_loss: bool):
    """Stage 1, one row per example: its ids (empty when skipped) and, unless every token carries loss, its mask."""

    # row numbers in the file, also after a held-out split reordered the rows (errors name the real row)
    mapping = ds._indices.column(0) if getattr(ds, "_indices", None) is not None else None

    def fn(batch, idx):
        rows = idx if mapping is None or not idx else mapping.slice(idx[0], len(idx)).to_pylist()
        examples = render(batch, rows)
        out: dict[str, list] = {"input_ids": [ex.ids if ex else [] for ex in examples]}
        if with_loss:
            out["loss"] = [ex.loss if ex else [] for ex in examples]
        if cross:
            sides = [ex.teacher if ex else None for ex in examples]
            for column, attr in TEACHER_COLUMNS.items():
                out[column] = [getattr(t, attr) if t else [] for t in sides]
        return out

    cross = getattr(render, "teacher", None) is not None

    with main_process_first():
        return ds.map(fn, batched=True, batch_size=1000, with_indices=True, remove_columns=ds.column_names)


TEACHER_COLUMNS = {"t_ids": "ids", "t_loss": "loss", "t_pair": "pair", "t_context": "context"}
"""A cross-tokenizer run's rendered columns: each example's `TeacherTokens` field by field."""
CROSS_ROWS = ("t_input_ids", "t_labels", "t_position_ids", "x_pos", "x_ctx")
"""A cross-tokenizer run's packed columns: the teacher row (its own length) and, per student position, the
paired teacher position in it and the pair's context (see `Packer`)."""


def _examples(columns: dict[str, list]) -> Iterator[Optional[Example]]:
    """The examples of a batch of rendered rows (None where one was skipped)."""
    ids = columns["input_ids"]
    losses = columns.get("loss") or [None] * len(ids)
    sides = (
        [TeacherTokens(*(columns[c][k] for c in TEACHER_COLUMNS)) for k in range(len(ids))]
        if "t_ids" in columns
        else [None] * len(ids)
    )
    for i, m, side in zip(ids, losses, sides):
        yield Example(i, m if m is not None else [True] * len(i), teacher=side) if i else None


def _pack_dataset(rendered, packer: Packer):
    """Stage 2: rows of seq_len tokens (in batches of 2000 examples, so concat packing is what it always was)."""

    def fn(batch):
        rows = packer(_examples(batch))
        cols = ["input_ids"] + [c for c in ("labels", "position_ids", *CROSS_ROWS) if rows and c in rows[0]]
        return {c: [r[c] for r in rows] for c in cols}

    with main_process_first():
        out = rendered.map(fn, batched=True, batch_size=2000, remove_columns=rendered.column_names)
    if "input_ids" not in out.column_names:  # no batch produced a full block
        return out.select([])
    out.set_format("torch", columns=[c for c in ("input_ids", "labels", "position_ids", *CROSS_ROWS) if c in out.column_names])
    return out


def _exact_stats(rendered, packed, *, kind: str, seq_len: int, overlong: str, ignore_index: int) -> PackStats:
    """The counts of a whole dataset, from its Arrow columns (no Python loop over tokens)."""
    import pyarrow.compute as pc

    lengths = pc.list_value_length(rendered.data.column("input_ids"))
    st = PackStats()
    st.skipped = int(pc.sum(pc.equal(lengths, 0)).as_py() or 0)
    st.examples = len(rendered) - st.skipped
    st.sequences = len(packed)
    if kind != "concat":
        over = pc.greater(lengths, seq_len)
        n_over = int(pc.sum(over).as_py() or 0)
        st.dropped, st.truncated = (n_over, 0) if overlong == "drop" else (0, n_over)
        kept = pc.filter(lengths, pc.invert(over)) if overlong == "drop" else pc.min_element_wise(lengths, seq_len)
        st.tokens = int(pc.sum(kept).as_py() or 0)
        if n_over and overlong == "truncate" and "loss" in rendered.column_names:
            st.emptied = _emptied(pc.filter(rendered.data.column("loss"), over), seq_len)
            st.truncated -= st.emptied
            st.tokens -= st.emptied * seq_len
    else:
        st.tokens = len(packed) * seq_len
    if len(packed) == 0:
        return st
    if "labels" in packed.column_names:
        labels = packed.data.column("labels")
        carried = pc.sum(pc.not_equal(pc.list_flatten(labels), ignore_index)).as_py() or 0
        first = pc.sum(pc.not_equal(pc.list_element(labels, 0), ignore_index)).as_py() or 0
        st.loss_tokens = int(carried - first)
    else:
        st.loss_tokens = len(packed) * (seq_len - 1)
    return st


def _emptied(loss, seq_len: int) -> int:
    """Of these overlong examples' loss masks, how many carry loss but none of it after the cut (the
    Packer leaves those out; a first token is never a target)."""
    import pyarrow.compute as pc

    def with_loss(lists) -> int:
        return len(pc.unique(pc.filter(pc.list_parent_indices(lists), pc.list_flatten(lists))))

    return with_loss(loss) - with_loss(pc.list_slice(loss, 1, seq_len))


def _whole(ds, source: SourceConfig, tokenizer, cfg: RunConfig, packer: Packer, *, field: str, where: str):
    """(rendered, packed, stats) of a dataset read whole."""
    if len(ds) == 0:
        raise DataError(f"{where} is empty; expected at least one document")
    render = renderer(
        source,
        tokenizer,
        field=field,
        where=where,
        ignore_index=cfg.loss.ignore_index,
        columns=ds.column_names,
        teacher=teacher_text(cfg, tokenizer),
    )
    rendered = _render_dataset(ds, render, with_loss=source.format != "text")
    packed = _pack_dataset(rendered, packer)
    stats = _exact_stats(
        rendered,
        packed,
        kind=packer.kind,
        seq_len=cfg.train.seq_len,
        overlong=cfg.data.overlong,
        ignore_index=cfg.loss.ignore_index,
    )
    if stats.examples == 0:
        if source.format == "text":
            raise DataError(
                f"{field}.text_field: every one of the {len(ds)} documents in {where} has a null or empty '{source.text_field}'"
            )
        raise DataError(f"{field}: no example of {where} has a token that carries loss (format {source.format})")
    return rendered, packed, stats


def _held_out(ds, cfg: RunConfig, source: SourceConfig, *, field: str, where: str):
    """(train, eval) documents: the eval split or file if given, else a seeded held-out fraction."""
    d = cfg.data
    if source.eval_path is not None or source.eval_split is not None:
        src = source.eval_path or source.path
        with main_process_first():
            eval_docs = load_source(
                src, source.eval_split or "train", field=f"{field}.eval_path" if source.eval_path else f"{field}.eval_split"
            )
        return ds, eval_docs
    n = len(ds)
    if n < 2:
        raise DataError(
            f"{field}.path: {where} has {n} document; hold-out evaluation needs at least 2 (or set {field}.eval_path)"
        )
    n_eval = min(n - 1, max(1, round(n * d.eval_fraction)))
    parts = ds.train_test_split(test_size=n_eval, seed=cfg.train.seed, shuffle=True)
    return parts["train"], parts["test"]


# ---------------------------------------------------------------------------------------------- streams


class SourceReader:
    """One source's examples for one rank, epoch after epoch, rendered on the way; `position` is where it
    stands (epoch, raw examples consumed in it) and `seek` returns there."""

    def __init__(self, name: str, open_epoch: Callable[[int], Iterator[Any]], render: Optional[Renderer], *, field: str):
        self.name = name
        self.open_epoch = open_epoch
        """epoch -> iterator over this rank's raw rows (dicts), or rendered Examples when `render` is None."""
        self.render = render
        self.field = field
        self.epoch, self.consumed = 0, 0
        self._it: Optional[Iterator[Any]] = None

    @property
    def position(self) -> tuple[int, int]:
        return self.epoch, self.consumed

    def seek(self, epoch: int, consumed: int) -> None:
        self.epoch, self.consumed = int(epoch), int(consumed)
        self._it = None

    def take(self, n: int) -> list[Optional[Example]]:
        if n == 0:
            return []
        raw: list[Any] = []
        empty_epochs = 0
        while len(raw) < n:
            if self._it is None:
                self._it = itertools.islice(self.open_epoch(self.epoch), self.consumed, None)
            got = list(itertools.islice(self._it, n - len(raw)))
            raw.extend(got)
            self.consumed += len(got)
            if len(raw) < n:  # this rank's part of the source is exhausted: its next epoch
                empty_epochs = empty_epochs + 1 if self.consumed == 0 else 0
                if empty_epochs > 1:
                    raise DataError(f"{self.field}: source '{self.name}' has no examples for this rank")
                self.epoch, self.consumed, self._it = self.epoch + 1, 0, None
        if self.render is None:
            return raw
        columns = {k: [r[k] for r in raw] for k in raw[0]}
        return self.render(columns, range(self.consumed - len(raw), self.consumed))


class MixedStream:
    """This rank's endless stream of training micro-batches drawn from the sources by weight (one source is
    the mixture of one). `state()` / `restore()` resume at the exact row."""

    def __init__(
        self,
        readers: list[SourceReader],
        weights: list[float],
        packer: Packer,
        *,
        micro_batch: int,
        seed: int,
        rank: int,
        routes: Optional[list[int]] = None,
    ):
        import numpy as np

        self.readers, self.packer, self.micro_batch = readers, packer, micro_batch
        self.routes = routes
        """Per source, the teacher its examples are routed to (`RunConfig.routes`), or None."""
        self.seed, self.rank = seed, rank
        w = np.asarray(weights, dtype=np.float64)
        self.p = w / w.sum()
        self.block, self.row = 0, 0
        """The block being read and the rows of it already yielded."""
        self.starts = [r.position for r in readers]
        """Where each source stood when the current block began."""
        self.batches_per_epoch: Optional[int] = None
        self._ahead: Optional[tuple[int, threading.Thread, dict[str, Any]]] = None
        """The next block being read, rendered and packed on a thread while this one is trained on:
        (block, thread, its result or error). The readers are then past that block; `starts` is not."""

    def state(self) -> dict[str, Any]:
        return {"block": self.block, "row": self.row, "sources": [list(s) for s in self.starts]}

    def restore(self, state: dict[str, Any]) -> None:
        self._drop_ahead()  # it reads on from where the stream stood: never mix it into another position
        self.block, self.row = int(state["block"]), int(state["row"])
        self.starts = [tuple(s) for s in state["sources"]]
        for reader, (epoch, consumed) in zip(self.readers, self.starts):
            reader.seek(epoch, consumed)

    def _rows(self, block: int) -> list[dict[str, list[int]]]:
        import numpy as np

        rng = np.random.default_rng([self.seed, self.rank, block])
        choice = rng.choice(len(self.readers), size=BLOCK, p=self.p) if len(self.readers) > 1 else np.zeros(BLOCK, dtype=int)
        drawn = [iter(r.take(int((choice == i).sum()))) for i, r in enumerate(self.readers)]
        examples = [next(drawn[i]) for i in choice]
        if self.routes is not None:  # each example carries its source's teacher into the packed rows
            examples = [None if ex is None else Example(ex.ids, ex.loss, self.routes[i]) for ex, i in zip(examples, choice)]
        return self.packer(examples)

    def _block(self, block: int) -> tuple[list[dict[str, list[int]]], list[tuple[int, int]]]:
        """A block's packed rows and where each source stands after it."""
        rows = self._rows(block)
        return rows, [r.position for r in self.readers]

    def _read_ahead(self, block: int) -> None:
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["done"] = self._block(block)
            except BaseException as e:  # raised again when the block is needed
                box["error"] = e

        thread = threading.Thread(target=work, name="dsdistill-stream-read-ahead", daemon=True)
        thread.start()
        self._ahead = (block, thread, box)

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].join()  # it moves the readers: let it finish before anyone else does
            self._ahead = None

    def close(self) -> None:
        """Wait for a block being read ahead (training is over); the stream can still be restored and read."""
        self._drop_ahead()

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[dict[str, list[int]]] = []
        while True:
            block = self.block
            ahead, self._ahead = self._ahead, None
            if ahead is not None and ahead[0] == block:  # read, rendered and packed while the last block trained
                ahead[1].join()
                if "error" in ahead[2]:
                    raise ahead[2]["error"]
                rows, ends = ahead[2]["done"]
            else:
                if ahead is not None:
                    ahead[1].join()
                for reader, start in zip(self.readers, self.starts):
                    if reader.position != start:  # after a restore: reopen there (otherwise read on)
                        reader.seek(*start)
                rows, ends = self._block(block)
            # the next block is read, rendered and packed on a thread while this one's micro-batches train
            self._read_ahead(block + 1)
            for i in range(self.row, len(rows)):
                pending.append(rows[i])
                if len(pending) == self.micro_batch:
                    # the committed position is after this micro-batch: a checkpoint taken now resumes after it
                    self.row = i + 1
                    if self.row == len(rows):
                        self.block, self.row, self.starts = self.block + 1, 0, ends
                    yield collate(pending)
                    pending = []
            if self.block == block:  # the block ended inside a micro-batch (or gave no row): on to the next
                self.block, self.row, self.starts = block + 1, 0, ends


def _first_rows(ds, n: int) -> list[dict[str, Any]]:
    return list(itertools.islice(iter(ds), n))


def _columns(rows: list[dict[str, Any]]) -> dict[str, list]:
    return {k: [r.get(k) for r in rows] for k in rows[0]} if rows else {}


def _to_tensors(rows: list[dict[str, list[int]]]) -> list[dict[str, torch.Tensor]]:
    return [{k: torch.tensor(v) for k, v in row.items()} for row in rows]


def _rows_of(packed) -> list[dict[str, torch.Tensor]]:
    return [packed[i] for i in range(len(packed))]


def _known_rows(ds) -> Optional[int]:
    """Examples in a streamed split when its metadata says so (never by reading it)."""
    try:
        splits = ds.info.splits
        if splits:
            for info in splits.values():
                if info.num_examples:
                    return int(info.num_examples)
    except Exception:  # noqa: BLE001 - metadata is optional
        return None
    return None


def _streamed_source(s: SourceConfig, name: str, cfg: RunConfig, tokenizer, kind: str, sources: list[SourceConfig], field: str):
    """(reader factory, eval rows, plan) of a source read lazily."""
    d = cfg.data
    probe = load_source(s.path, s.split, field=f"{field}.path", streaming=True)
    head = _first_rows(probe, 1)
    if not head:
        raise DataError(f"{field}.path: '{s.path}' is empty; expected at least one document")
    where = f"'{s.path}'"
    render = renderer(
        s,
        tokenizer,
        field=field,
        where=where,
        ignore_index=cfg.loss.ignore_index,
        columns=list(head[0]),
        teacher=teacher_text(cfg, tokenizer),
    )
    held_out = 0
    if s.eval_path is not None or s.eval_split is not None:
        src = s.eval_path or s.path
        eval_ds = load_source(
            src, s.eval_split or "train", field=f"{field}.eval_path" if s.eval_path else f"{field}.eval_split", streaming=True
        )
    else:  # the first examples of the stream are held out, and training skips them
        held_out = d.eval_examples
        eval_ds = probe
    eval_raw = _first_rows(eval_ds, d.eval_examples)
    eval_packer = _packer(cfg, tokenizer, kind, sources)
    eval_rows = eval_packer(render(_columns(eval_raw), range(len(eval_raw)))) if eval_raw else []
    sample_packer = _packer(cfg, tokenizer, kind, sources)
    sample = _first_rows(probe.skip(held_out), min(SAMPLE, d.max_documents or SAMPLE))
    if not sample:
        raise DataError(
            f"{field}.path: '{s.path}' has no examples left for training after the {held_out} held out for evaluation"
        )
    sample_packer(render(_columns(sample), range(held_out, held_out + len(sample))))
    if sample_packer.stats.examples == 0:
        raise DataError(
            f"{field}: none of the first {len(sample)} examples of {where} has a token that carries loss (format {s.format})"
        )
    seed, buffer, limit = cfg.train.seed, d.shuffle_buffer, d.max_documents

    def make(rank: int, world: int) -> SourceReader:
        from datasets.distributed import split_dataset_by_node

        def open_epoch(epoch: int) -> Iterator[Any]:
            ds = load_source(s.path, s.split, field=f"{field}.path", streaming=True)
            if held_out:
                ds = ds.skip(held_out)
            if limit is not None:
                ds = ds.take(limit)
            ds = split_dataset_by_node(ds, rank=rank, world_size=world).shuffle(seed=seed, buffer_size=buffer)
            ds.set_epoch(epoch)
            return iter(ds)

        return SourceReader(name, open_epoch, render, field=field)

    plan = SourcePlan(
        name=name,
        path=s.path,
        format=s.format,
        weight=s.weight,
        streaming=True,
        train=sample_packer.stats,
        eval=eval_packer.stats,
        estimated=True,
        sampled=len(sample),
        rows=_known_rows(probe),
    )
    return make, eval_rows, plan


def _whole_source(s: SourceConfig, name: str, cfg: RunConfig, tokenizer, kind: str, sources, field: str):
    """(reader factory, eval rows, plan) of a source read whole and rendered up front, inside a mixture."""
    where = f"'{s.path}'"
    with main_process_first():
        ds = load_source(s.path, s.split, field=f"{field}.path")
    train_docs, eval_docs = _held_out(ds, cfg, s, field=field, where=where)
    rendered, _, train_stats = _whole(
        train_docs, s, tokenizer, cfg, _packer(cfg, tokenizer, kind, sources), field=field, where=where
    )
    _, eval_packed, eval_stats = _whole(
        eval_docs, s, tokenizer, cfg, _packer(cfg, tokenizer, kind, sources), field=field, where=f"the eval split of {where}"
    )
    seed = cfg.train.seed

    def make(rank: int, world: int) -> SourceReader:
        def open_epoch(epoch: int) -> Iterator[Optional[Example]]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
            order = torch.randperm(len(rendered), generator=g)[rank::world].tolist()
            for start in range(0, len(order), 1000):
                yield from _examples(rendered[order[start : start + 1000]])

        return SourceReader(name, open_epoch, None, field=field)

    plan = SourcePlan(
        name=name,
        path=s.path,
        format=s.format,
        weight=s.weight,
        streaming=False,
        train=train_stats,
        eval=eval_stats,
        rows=len(ds),
    )
    return make, _rows_of(eval_packed), plan


def build_splits(cfg: RunConfig, tokenizer) -> Splits:
    """Load, split and pack (or prepare to stream) the run's data: the same result on every rank."""
    d = cfg.data
    sources = d.resolved_sources()
    names = source_names(sources)
    kind = _packing(cfg, sources)
    seq = cfg.train.seq_len
    if d.sources is None and not d.streaming:
        s = sources[0]
        where = f"'{s.path}'"
        with main_process_first():
            docs = load_source(s.path, s.split, field="data.path")
        if s.format == "text" and s.text_field in docs.column_names:
            _check_text_column(docs, s.text_field, "data", where)
        if d.max_documents is not None and len(docs) > d.max_documents:
            docs = docs.select(range(d.max_documents))
        train_docs, eval_docs = _held_out(docs, cfg, s, field="data", where=where)
        _, train, train_stats = _whole(
            train_docs, s, tokenizer, cfg, _packer(cfg, tokenizer, kind, sources), field="data", where=where
        )
        _, evals, eval_stats = _whole(
            eval_docs, s, tokenizer, cfg, _packer(cfg, tokenizer, kind, sources), field="data", where="the eval split"
        )
        if len(evals) == 0:
            raise DataError(
                f"data: the eval split holds fewer than seq_len={seq} tokens; use a larger eval set or a smaller train.seq_len"
            )
        plan = SourcePlan(
            name=names[0],
            path=s.path,
            format=s.format,
            weight=1.0,
            streaming=False,
            train=train_stats,
            eval=eval_stats,
            rows=len(docs),
        )
        share = unknown_share(train, tokenizer)
        _check_unknown(share, s.path, tokenizer, field="data.path")
        return Splits(train=train, eval=evals, sources=[plan], packing=kind, unknown_share=share)

    readers, plans, eval_by_source = [], [], {}
    for i, (s, name) in enumerate(zip(sources, names)):
        field = "data" if d.sources is None else f"data.sources[{i}]"
        streaming = s.streaming if s.streaming is not None else d.streaming
        build = _streamed_source if streaming else _whole_source
        make, rows, plan = build(s, name, cfg, tokenizer, kind, sources, field)
        if not rows:
            raise DataError(
                f"{field}: the eval split of '{s.path}' holds fewer than seq_len={seq} tokens; "
                "use a larger eval set or a smaller train.seq_len"
            )
        readers.append(make)
        plans.append(plan)
        eval_by_source[name] = rows if isinstance(rows[0].get("input_ids"), torch.Tensor) else _to_tensors(rows)
    routes = cfg.routes()
    if routes is not None:  # a source's eval rows are its own: one teacher index for each of their tokens
        for (name, rows), route in zip(eval_by_source.items(), routes):
            eval_by_source[name] = [{**row, "route": torch.full_like(row["input_ids"], route)} for row in rows]
    evals = [row for rows in eval_by_source.values() for row in rows]
    share = unknown_share(evals, tokenizer)
    _check_unknown(
        share,
        sources[0].path if len(sources) == 1 else "the eval data",
        tokenizer,
        field="data.path" if d.sources is None else "data.sources",
    )
    return Splits(
        train=None,
        eval=evals,
        sources=plans,
        packing=kind,
        readers=readers,
        weights=[s.weight for s in sources],
        eval_by_source=eval_by_source if len(sources) > 1 else {},
        unknown_share=share,
    )


def _check_unknown(share: float, path: str, tokenizer, *, field: str) -> None:
    if share > 0.5:
        raise DataError(
            f"{field}: {share:.0%} of the tokens of '{path}' are the tokenizer's unknown token "
            f"({tokenizer.unk_token!r}); the data does not match the student's tokenizer"
        )


def make_stream(cfg: RunConfig, splits: Splits, tokenizer, *, rank: int, world: int):
    """This rank's training stream: rows of the packed dataset, or the mixture of its streamed sources."""
    if not splits.streamed:
        return TrainStream(splits.train, micro_batch=cfg.train.micro_batch_size, rank=rank, world=world, seed=cfg.train.seed)
    sources = cfg.data.resolved_sources()
    packer = _packer(cfg, tokenizer, splits.packing, sources)
    routes = cfg.routes()
    packer.routes = routes is not None
    readers = [make(rank, world) for make in splits.readers]
    return MixedStream(
        readers, splits.weights, packer, micro_batch=cfg.train.micro_batch_size, seed=cfg.train.seed, rank=rank, routes=routes
    )


def collate(rows) -> dict[str, torch.Tensor]:
    """Rows (lists or tensors) -> a micro-batch; labels are the ids when a row carries none. A cross-tokenizer
    run's teacher rows are padded to the longest of the micro-batch (`pad_teacher_rows`)."""
    batch = {k: torch.stack([torch.as_tensor(r[k]) for r in rows]) for k in rows[0] if k not in TEACHER_ROWS}
    if "t_input_ids" in rows[0]:
        batch.update(pad_teacher_rows([{k: r[k] for k in TEACHER_ROWS} for r in rows]))
    if "labels" not in batch:
        batch["labels"] = batch["input_ids"].clone()
    return batch


TEACHER_ROWS = ("t_input_ids", "t_labels", "t_position_ids")


def pad_teacher_rows(rows: list[dict[str, Any]], multiple: int = 8) -> dict[str, torch.Tensor]:
    """Teacher rows of different lengths as [B, L] tensors, L the longest rounded up to `multiple`: padding ids
    0, labels ignored (`TEACHER_IGNORE`), positions
    restarting (the padding is an example of its own, attending to nothing real)."""
    longest = max(len(r["t_input_ids"]) for r in rows)
    width = max(multiple, -(-longest // multiple) * multiple)
    out: dict[str, list] = {k: [] for k in TEACHER_ROWS}
    for r in rows:
        ids = torch.as_tensor(r["t_input_ids"], dtype=torch.long)
        pad = width - len(ids)
        out["t_input_ids"].append(torch.cat([ids, ids.new_zeros(pad)]))
        out["t_labels"].append(
            torch.cat([torch.as_tensor(r["t_labels"], dtype=torch.long), ids.new_full((pad,), TEACHER_IGNORE)])
        )
        out["t_position_ids"].append(torch.cat([torch.as_tensor(r["t_position_ids"], dtype=torch.long), torch.arange(pad)]))
    return {k: torch.stack(v) for k, v in out.items()}


class TrainStream:
    """Endless, deterministic, per-rank stream of training micro-batches, epoch after epoch.

    The order of epoch e is fixed by (seed, e), so `state()` / `restore()` resume exactly."""

    def __init__(self, ds, *, micro_batch: int, rank: int, world: int, seed: int):
        self.ds = ds
        self.micro_batch, self.world = micro_batch, world
        self.sampler: DistributedSampler = DistributedSampler(
            ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
        self.batches_per_epoch: Optional[int] = len(self.sampler) // micro_batch
        self.epoch = 0
        self.position = 0
        """Micro-batches consumed in the current epoch."""

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def reshard(self, state: dict[str, int], world: int) -> dict[str, int]:
        """The position saved by `world` ranks, on this run's ranks. Every rank reads every world-th row of one
        seeded order, so the ranks together had read a prefix of it; each rank goes on after that prefix
        (rounded down to whole micro-batches of all ranks: at most that many rows are seen twice)."""
        read = int(state["position"]) * self.micro_batch * world
        return {"epoch": int(state["epoch"]), "position": read // (self.micro_batch * self.world)}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        assert self.batches_per_epoch is not None
        while True:
            self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)
            while self.position < self.batches_per_epoch:
                start = self.position * self.micro_batch
                idx = order[start : start + self.micro_batch]
                self.position += 1
                batch = dict(self.ds[idx])
                if "t_input_ids" in batch:
                    batch.update(pad_teacher_rows([{k: batch[k][i] for k in TEACHER_ROWS} for i in range(len(idx))]))
                if "labels" not in batch:
                    batch["labels"] = batch["input_ids"].clone()
                batch["row"] = torch.tensor(idx)  # which packed rows: what an offline teacher cache is keyed by
                yield batch
            self.epoch += 1
            self.position = 0


def eval_batches(
    ds,
    *,
    micro_batch: int,
    rank: int,
    world: int,
    ignore_index: int,
    max_batches: Optional[int],
    row_offset: Optional[int] = None,
):
    """This rank's eval micro-batches; every rank yields the same number (padding with masked batches).
    With `row_offset`, each batch's `row` holds the rows' numbers after the training rows (-1 for padding)."""
    n = len(ds)
    per_rank = math.ceil(n / world)
    n_batches = math.ceil(per_rank / micro_batch)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    mine = list(range(rank, n, world))
    for b in range(n_batches):
        idx = mine[b * micro_batch : (b + 1) * micro_batch]
        missing = micro_batch - len(idx)
        # rows that count nothing keep every rank's batch the same shape for the collectives (collated with the
        # real rows: a cross-tokenizer batch's teacher rows are padded to one width)
        batch = collate([ds[i] for i in idx] + [ds[0]] * missing)
        if row_offset is not None:
            batch["row"] = torch.cat([torch.tensor(idx, dtype=torch.long) + row_offset, torch.full((missing,), -1)])
        if missing:
            filler = slice(len(idx), None)
            batch["labels"][filler] = ignore_index
            if "t_labels" in batch:
                batch["t_labels"][filler] = TEACHER_IGNORE
                batch["x_pos"][filler] = -1
        yield batch


def data_fingerprint(splits: Splits, cfg: RunConfig) -> str:
    """What fixes the meaning of a saved data position: packed rows (first, middle, last), or for streamed
    data the sources, their weights, the packing and the held-out rows (any change moves it)."""
    h = hashlib.sha256()
    if not splits.streamed:
        ds = splits.train
        n = len(ds)
        for i in sorted({0, n // 2, n - 1} if n else set()):
            h.update(ds[i]["input_ids"].numpy().tobytes())
        return f"{n} sequences, {h.hexdigest()[:16]}"
    # a source's teacher is not part of its data (and an unset one leaves older fingerprints as they were)
    spec = [s.model_dump(mode="json", exclude={"teacher"}) for s in cfg.data.resolved_sources()]
    h.update(json.dumps({"sources": spec, "packing": splits.packing, "overlong": cfg.data.overlong}, sort_keys=True).encode())
    for row in (splits.eval[0], splits.eval[-1]):
        h.update(row["input_ids"].numpy().tobytes())
    return f"{len(splits.sources)} streamed sources, {h.hexdigest()[:16]}"


def plan_json(splits: Splits) -> dict[str, Any]:
    """The data part of the plan (what `dsdistill check --json` and run_start carry)."""
    total = splits.totals()
    estimated = any(s.estimated for s in splits.sources)
    return {
        "packing": splits.packing,
        "streamed": splits.streamed,
        "estimated": estimated,
        "examples": None if estimated else total.examples,
        "tokens": None if estimated else total.tokens,
        "loss_tokens": None if estimated else total.loss_tokens,
        "loss_share": total.loss_share,
        "sequences": None if estimated else total.sequences,
        "skipped": total.skipped,
        "truncated": total.truncated,
        "dropped": total.dropped,
        "emptied": total.emptied,
        "eval_sequences": len(splits.eval),
        "sources": [s.to_json() for s in splits.sources],
    }
