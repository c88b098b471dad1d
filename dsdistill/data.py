"""Text data: load with HF `datasets`, tokenise, pack to `seq_len`, split, and shard per rank.

Training uses a seeded `DistributedSampler` (each rank its own shard, same number of batches everywhere).
Evaluation shards by stride and pads the shorter ranks with fully-masked batches, so every rank runs the
same number of forwards (ZeRO-3 needs every rank in every forward) and nothing is counted twice.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from dsdistill.config import RunConfig
from dsdistill.errors import DataError, one_line

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


def load_text(path: str, split: str, *, field: str):
    """A `datasets.Dataset` from a local file, a local dataset directory, or a Hub dataset name."""
    datasets = _quiet_datasets()
    p = Path(path).expanduser()
    try:
        if p.is_file():
            builder = BUILDERS.get(p.suffix.lower())
            if builder is None:
                raise DataError(f"{field}: '{path}' has extension '{p.suffix}'; expected one of {', '.join(BUILDERS)}")
            if split != "train":
                raise DataError(f"{field}: '{path}' is a single file and has only a 'train' split, not '{split}'")
            if builder != "parquet":
                _check_text_file(p, field=field, path=path)
            return datasets.load_dataset(builder, data_files={"train": str(p)}, split="train")
        if p.is_dir():
            return datasets.load_dataset(str(p), split=split)
        if _looks_local(path):
            raise DataError(f"{field}: '{path}' does not exist; expected a data file, a dataset directory or a Hub name")
        return datasets.load_dataset(path, split=split)
    except DataError:
        raise
    except Exception as e:  # datasets raises many types; the user needs the file and the reason
        cause = _root_cause(e)
        if isinstance(cause, UnicodeDecodeError):
            raise DataError(
                f"{field}: '{path}' is not UTF-8 text ({cause.reason} at byte {cause.start} of a block); "
                "expected UTF-8 encoded text"
            ) from None
        raise DataError(
            one_line(f"{field}: cannot load '{path}' (split '{split}'): {type(cause).__name__}: {cause}")[:400]
        ) from None


def _root_cause(e: BaseException) -> BaseException:
    seen = set()
    while (e.__cause__ or e.__context__) is not None and id(e) not in seen:
        seen.add(id(e))
        e = e.__cause__ or e.__context__
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


def _check_text_column(ds, text_field: str, where: str) -> int:
    """Validate the text column; the number of documents with a null or empty text (they are skipped)."""
    if text_field not in ds.column_names:
        raise DataError(f"data.text_field: '{text_field}' is not a column of {where}; columns are: {', '.join(ds.column_names)}")
    if len(ds) == 0:
        raise DataError(f"{where} is empty; expected at least one document")
    empty = count_empty(ds, text_field)
    if empty == len(ds):
        raise DataError(f"data.text_field: every one of the {len(ds)} documents in {where} has a null or empty '{text_field}'")
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


def unknown_share(ds, tokenizer, sample: int = 512) -> float:
    """Share of the tokenizer's unknown token among the first `sample` packed sequences (0 without one)."""
    unk = tokenizer.unk_token_id
    if unk is None or len(ds) == 0:
        return 0.0
    ids = ds[: min(sample, len(ds))]["input_ids"]
    ids = torch.as_tensor(ids) if not torch.is_tensor(ids) else ids
    return float((ids == unk).float().mean())


def pack(ds, tokenizer, *, text_field: str, seq_len: int, where: str):
    """Tokenise every document (EOS appended), concatenate and cut into blocks of `seq_len` tokens."""
    eos = tokenizer.eos_token_id

    def tokenize_and_pack(batch):
        texts = batch[text_field]
        bad = next((t for t in texts if not isinstance(t, str)), None)
        if bad is not None:
            raise DataError(f"data.text_field: '{text_field}' in {where} holds {type(bad).__name__} values; expected strings")
        ids = tokenizer([t for t in texts if t], add_special_tokens=False)["input_ids"]
        flat: list[int] = []
        for doc in ids:
            flat.extend(doc)
            if eos is not None:
                flat.append(eos)
        n = len(flat) // seq_len
        return {"input_ids": [flat[i * seq_len : (i + 1) * seq_len] for i in range(n)]}

    with main_process_first():
        out = ds.map(tokenize_and_pack, batched=True, batch_size=2000, remove_columns=ds.column_names)
    if "input_ids" not in out.column_names:  # no batch produced a full block
        return out.select([])
    out.set_format("torch", columns=["input_ids"])
    return out


@dataclass
class Splits:
    """Packed training and evaluation blocks."""

    train: Any
    """The packed training blocks (a `datasets.Dataset` of input_ids)."""
    eval: Any
    skipped_documents: int = 0
    """Training and eval documents skipped because their text was null or empty."""
    unknown_share: float = 0.0
    """Share of unknown-token ids in (a sample of) the packed training data."""


def build_splits(cfg: RunConfig, tokenizer) -> Splits:
    """Load, split and pack the run's data (same result on every rank)."""
    d = cfg.data
    with main_process_first():
        train_docs = load_text(d.path, d.split, field="data.path")
    skipped = _check_text_column(train_docs, d.text_field, f"'{d.path}'")
    if d.max_documents is not None and len(train_docs) > d.max_documents:
        train_docs = train_docs.select(range(d.max_documents))
    if d.eval_path is not None or d.eval_split is not None:
        src = d.eval_path or d.path
        with main_process_first():
            eval_docs = load_text(src, d.eval_split or "train", field="data.eval_path" if d.eval_path else "data.eval_split")
        skipped += _check_text_column(eval_docs, d.text_field, f"'{src}'")
    else:
        n = len(train_docs)
        if n < 2:
            raise DataError(
                f"data.path: '{d.path}' has {n} document; hold-out evaluation needs at least 2 (or set data.eval_path)"
            )
        n_eval = min(n - 1, max(1, round(n * d.eval_fraction)))
        parts = train_docs.train_test_split(test_size=n_eval, seed=cfg.train.seed, shuffle=True)
        train_docs, eval_docs = parts["train"], parts["test"]
    seq = cfg.train.seq_len
    train = pack(train_docs, tokenizer, text_field=d.text_field, seq_len=seq, where=f"'{d.path}'")
    evals = pack(eval_docs, tokenizer, text_field=d.text_field, seq_len=seq, where="the eval split")
    if len(evals) == 0:
        raise DataError(
            f"data: the eval split holds fewer than seq_len={seq} tokens; use a larger eval set or a smaller train.seq_len"
        )
    share = unknown_share(train, tokenizer)
    if share > 0.5:
        raise DataError(
            f"data.path: {share:.0%} of the tokens of '{d.path}' are the tokenizer's unknown token "
            f"({tokenizer.unk_token!r}); the data does not match the student's tokenizer"
        )
    return Splits(train=train, eval=evals, skipped_documents=skipped, unknown_share=share)


def _collate(rows) -> dict[str, torch.Tensor]:
    ids = torch.stack([r["input_ids"] for r in rows])
    return {"input_ids": ids, "labels": ids.clone()}


class TrainStream:
    """Endless, deterministic, per-rank stream of training micro-batches, epoch after epoch.

    The order of epoch e is fixed by (seed, e), so `state()` / `restore()` resume exactly."""

    def __init__(self, ds, *, micro_batch: int, rank: int, world: int, seed: int):
        self.ds = ds
        self.micro_batch = micro_batch
        self.sampler = DistributedSampler(ds, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.batches_per_epoch = len(self.sampler) // micro_batch
        self.epoch = 0
        self.position = 0
        """Micro-batches consumed in the current epoch."""

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            self.sampler.set_epoch(self.epoch)
            order = list(self.sampler)
            while self.position < self.batches_per_epoch:
                start = self.position * self.micro_batch
                idx = order[start : start + self.micro_batch]
                self.position += 1
                ids = self.ds[idx]["input_ids"]
                yield {"input_ids": ids, "labels": ids.clone()}
            self.epoch += 1
            self.position = 0


def eval_batches(ds, *, micro_batch: int, rank: int, world: int, ignore_index: int, max_batches: Optional[int]):
    """This rank's eval micro-batches; every rank yields the same number (padding with masked batches)."""
    n = len(ds)
    per_rank = math.ceil(n / world)
    n_batches = math.ceil(per_rank / micro_batch)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    mine = list(range(rank, n, world))
    for b in range(n_batches):
        idx = mine[b * micro_batch : (b + 1) * micro_batch]
        batch = _collate([ds[i] for i in idx]) if idx else None
        missing = micro_batch - len(idx)
        if missing:  # rows that count nothing keep every rank's batch the same shape for the collectives
            filler = ds[0]["input_ids"].unsqueeze(0).expand(missing, -1).clone()
            pad = {"input_ids": filler, "labels": torch.full_like(filler, ignore_index)}
            batch = pad if batch is None else {k: torch.cat([batch[k], pad[k]]) for k in batch}
        yield batch


def data_fingerprint(ds) -> str:
    """Sequence count and a hash of the first, middle and last packed sequences (cheap; any change to the
    data, tokenizer or packing moves it)."""
    import hashlib

    n = len(ds)
    h = hashlib.sha256()
    for i in sorted({0, n // 2, n - 1} if n else set()):
        h.update(ds[i]["input_ids"].numpy().tobytes())
    return f"{n} sequences, {h.hexdigest()[:16]}"
