"""The offline teacher cache's format, shared by its writer (cache_writer.py) and reader (cached.py): run
the teacher once over the packed rows training will see, store its top-k
token distribution for every loss-bearing position (compressed by dsdistill/codec.py), and distil from
that as often as needed without loading the teacher.

On disk (`DIR`):
    manifest.json        format version, teacher and tokenizer hashes, data fingerprints, k, token count,
                         bytes per token, fidelity; written last, so its presence means the cache is whole
    plan.json            what the cache is of (written first; a resumed write must match it)
    ranks.bin            uint32[V]: each token's rank by frequency in the training rows (the codec's id map)
    teacher/config.json  the teacher's model config (the plan's shapes; no weights)
    train/NNNNN.bin, eval/NNNNN.bin
                         shards of SHARD_ROWS packed rows each, written whole or not at all (temp file +
                         rename): a header (JSON: rows, positions and byte offsets per row, fidelity of the
                         shard's first micro-batch) and the rows' blobs, memory-mapped when read. A row's
                         blob is float16 [n, len(tail_temperatures)] tail statistics, then the codec blob.

Temperatures: the loss at T needs the teacher's tail at T, log sum over the tail of p_i^(1/T), which the
mass at T = 1 does not determine. The writer stores that statistic for every temperature other than 1 that
the run's curriculum schedules (`tail_temperatures` in the manifest), so KD from the cache equals live
top-k + rest at each of them; a run that schedules another temperature is refused by `check`.

Rows are the packed dataset's rows (their order is fixed by the data, tokenizer, seq_len and packing, which
the manifest's fingerprints pin), so training reads row i's positions wherever its sampler puts it. Shards
go to ranks round-robin and are computed from the rows alone, so any number of ranks writes the same bytes,
and a write that stopped resumes with the shards that are missing.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dsdistill.errors import ConfigError, DistillError
from dsdistill.rundir import write_atomic, write_failure

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 1 caches (no tail statistics) still serve runs at T = 1."""
MAX_TEMPERATURES = 16
"""Tail statistics a cache stores at most (one float16 per position each)."""
MAGIC = b"DSDTC1\n"
SHARD_ROWS = 64
"""Packed rows per shard file (default of `--shard-rows`)."""
MANIFEST = "manifest.json"


class CacheError(DistillError):
    """A teacher cache is missing, damaged, or of something other than this run."""


# ---------------------------------------------------------------------------------------------- hashes


def tokenizer_hash(tokenizer) -> str:
    """The vocabulary (token -> id) and the special tokens: what makes two tokenizers read ids alike."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    specials = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return hashlib.sha256(json.dumps([vocab, specials]).encode()).hexdigest()[:16]


def config_hash(model_config) -> str:
    d = model_config.to_dict()
    for k in ("_name_or_path", "transformers_version", "torch_dtype", "dtype", "_attn_implementation_autoset"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rank_table(rows, vocab: int, sample: int = 20000) -> np.ndarray:
    """Each token's rank by how often it occurs in (the first `sample` of) the training rows, ties by id."""
    ids = np.asarray(rows[: min(sample, len(rows))]["input_ids"]).ravel()  # one read of the packed rows
    counts = np.bincount(ids[ids < vocab], minlength=vocab)
    order = np.argsort(-counts, kind="stable")
    ranks = np.empty(vocab, dtype=np.uint32)
    ranks[order] = np.arange(vocab, dtype=np.uint32)
    return ranks


# ---------------------------------------------------------------------------------------------- shards


def write_atomic_or_fail(path: Path, data: bytes) -> None:
    """The file whole or not at all; a full disk or any refused write is one line naming the file."""
    try:
        write_atomic(path, data, field="teacher-cache --out")
    except OSError as e:
        raise CacheError(
            f"teacher-cache: writing '{path}' failed ({write_failure(e, path.parent)}); the files written before are "
            "kept, and the same command resumes the write"
        ) from None


def write_shard(path: Path, header: dict[str, Any], blobs: list[bytes]) -> None:
    offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    header = {**header, "offsets": offsets, "payload_bytes": offsets[-1]}
    head = json.dumps(header, sort_keys=True).encode()
    write_atomic_or_fail(path, MAGIC + struct.pack("<Q", len(head)) + head + b"".join(blobs))


MANIFEST_FIELDS: dict[str, type | tuple[type, ...]] = {
    "k": int,
    "level_bits": int,
    "vocab": int,
    "shard_rows": int,
    "tokens": int,
    "bytes_per_token": (int, float),
    "tokenizer_hash": str,
    "teacher": dict,
    "data": dict,
}
DATA_FIELDS = ("train_rows", "eval_rows", "seq_len", "packing", "train_fingerprint", "eval_fingerprint")


def check_manifest(m: Any, path: Path, field: str) -> None:
    """Every field the reader and `check` use, with its type: one line naming the first that is not."""

    def bad(what: str) -> CacheError:
        return CacheError(f"{field}: '{path}' {what} (a damaged manifest); run dsdistill teacher-cache again")

    if not isinstance(m, dict):
        raise bad("is not a JSON object")
    for key, kind in MANIFEST_FIELDS.items():
        if not isinstance(m.get(key), kind) or isinstance(m.get(key), bool):
            raise bad(f"has no valid '{key}'")
    for key in DATA_FIELDS:
        if key not in m["data"]:
            raise bad(f"has no 'data.{key}'")
    if not (m["k"] >= 1 and 2 <= m["level_bits"] <= 12 and m["vocab"] > m["k"] and m["shard_rows"] >= 1):
        raise bad("has values out of range (k, level_bits, vocab or shard_rows)")


def read_header(path: Path) -> Optional[dict[str, Any]]:
    """A shard's header if the file is whole (magic, header and payload length agree), else None."""
    try:
        with open(path, "rb") as fh:
            if fh.read(len(MAGIC)) != MAGIC:
                return None
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 1 << 26:
                return None
            header = json.loads(fh.read(n))
            header["_data_start"] = len(MAGIC) + 8 + n
        if path.stat().st_size != header["_data_start"] + header["payload_bytes"]:
            return None
        return header
    except (OSError, ValueError, KeyError, struct.error):
        return None


@dataclass
class Shard:
    header: dict[str, Any]
    payload: np.ndarray
    """The memory-mapped row blobs."""


# ---------------------------------------------------------------------------------------------- reading


def run_temperatures(cfg, total_steps: int) -> tuple[float, ...]:
    """Every KD temperature the run's curriculum uses, or a one-line error when a cache cannot store them all."""
    from dsdistill.curriculum import Curriculum

    temps = Curriculum(cfg.curriculum).temperatures(total_steps=total_steps, limit=MAX_TEMPERATURES)
    if temps is None:
        raise ConfigError(
            f"curriculum.temperature: this schedule takes more than {MAX_TEMPERATURES} distinct values over {total_steps} "
            "steps and a teacher cache stores exact tails for at most that many; use a constant temperature (or steps)"
        )
    return temps


def eval_fingerprint(splits) -> str:
    h = hashlib.sha256()
    n = len(splits.eval)
    for i in sorted({0, n // 2, n - 1} if n else set()):
        h.update(np.asarray(splits.eval[i]["input_ids"]).tobytes())
    return f"{n} sequences, {h.hexdigest()[:16]}"


# ---------------------------------------------------------------------------------------------- writing
