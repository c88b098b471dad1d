"""The teacher server's replies as arrays: `Scored` (every asked position of a request, in order), and its
two binary forms, both without the JSON's text to parse (the hot part of a client's wait):

- `binary`: exact float32, about a third of the JSON's bytes. b"DSD1" | u32 little-endian header length |
  header JSON {"model", "tokenizer", "counts" (positions per sequence), "k", "m" (temperatures), "labels"} |
  ids i32[N, k] | logp f32[N, k] | log_rest f32[N] | tails f32[N, m] | label_logp f32[N] (with labels).
- `codec`: the offline cache's codec (dsdistill/codec.py: about a byte per kept token, log-probs quantised to
  `level_bits`, token ids as their own ranks) for ids, log-probs and the rest, with the tail statistics and
  label log-probs as float32: KD from it is exact where the cache's is. b"DSC1" | u32 | header (as above, with
  "level_bits" and "blobs": each sequence's codec bytes) | the blobs | tails f32[N, m] | label_logp f32[N].
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

MAGIC = b"DSD1"
CODEC_MAGIC = b"DSC1"
CONTENT_TYPE = "application/x-dsdistill-scores"


@dataclass
class Scored:
    """A request's asked positions, sequence after sequence."""

    counts: list[int]
    """Positions per sequence."""
    ids: np.ndarray
    """[N, k] int64 token ids."""
    logp: np.ndarray
    """[N, k] float32 log-probs at T = 1."""
    log_rest: np.ndarray
    """[N] float32 log of the mass outside the k."""
    tails: np.ndarray
    """[N, m] float32 log sum over the tail of p^(1/T), one column per asked temperature."""
    label_logp: Optional[np.ndarray] = None
    """[N] float32 the label's own log-prob (when asked for)."""

    @classmethod
    def from_results(cls, results: list[dict[str, Any]], k: int, m: int) -> "Scored":
        """From per-sequence lists (the JSON reply, or vLLM's parsed one)."""
        counts = [len(r["log_rest"]) for r in results]
        n = sum(counts)

        def cat(key: str, shape: tuple[int, ...], dtype) -> np.ndarray:
            return np.asarray([v for r in results for v in r[key]], dtype=dtype).reshape(shape)

        labels = bool(results) and all("label_logp" in r for r in results)
        return cls(
            counts,
            cat("ids", (n, k), np.int64),
            cat("logp", (n, k), np.float32),
            cat("log_rest", (n,), np.float32),
            cat("tails", (n, m), np.float32) if m else np.zeros((n, 0), np.float32),
            cat("label_logp", (n,), np.float32) if labels else None,
        )


def _header(scored: Scored, *, model: str, tokenizer: str, **more: Any) -> bytes:
    header = {
        "model": model,
        "tokenizer": tokenizer,
        "counts": scored.counts,
        "k": scored.ids.shape[1],
        "m": scored.tails.shape[1],
        "labels": scored.label_logp is not None,
        **more,
    }
    return json.dumps(header).encode()


def encode(scored: Scored, *, model: str, tokenizer: str) -> bytes:
    head = _header(scored, model=model, tokenizer=tokenizer)
    parts = [
        MAGIC,
        struct.pack("<I", len(head)),
        head,
        scored.ids.astype("<i4").tobytes(),
        scored.logp.astype("<f4").tobytes(),
        scored.log_rest.astype("<f4").tobytes(),
        scored.tails.astype("<f4").tobytes(),
    ]
    if scored.label_logp is not None:
        parts.append(scored.label_logp.astype("<f4").tobytes())
    return b"".join(parts)


def decode(data: bytes | bytearray) -> tuple[dict[str, Any], Scored]:
    """(header, arrays) of a binary reply; a ValueError in one line for anything that is not one."""
    if data[:4] != MAGIC or len(data) < 8:
        raise ValueError("not a dsdistill binary reply")
    data = bytearray(data)  # writable arrays: torch takes them without a copy of its own
    (size,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8 : 8 + size])
    counts = [int(c) for c in header["counts"]]
    n, k, m, labels = sum(counts), int(header["k"]), int(header["m"]), bool(header["labels"])
    at = 8 + size
    want = n * k * 8 + n * 4 + n * m * 4 + (n * 4 if labels else 0)
    if len(data) - at != want:
        raise ValueError(f"binary reply of {len(data) - at} bytes for {n} positions; expected {want}")

    def take(count: int, dtype: str) -> np.ndarray:
        nonlocal at
        out = np.frombuffer(data, dtype=dtype, count=count, offset=at)
        at += count * 4
        return out

    ids = take(n * k, "<i4").reshape(n, k).astype(np.int64)
    logp = take(n * k, "<f4").reshape(n, k)
    log_rest = take(n, "<f4")
    tails = take(n * m, "<f4").reshape(n, m)
    label_logp = take(n, "<f4") if labels else None
    return header, Scored(counts, ids, logp, log_rest, tails, label_logp)


def encode_codec(scored: Scored, *, model: str, tokenizer: str, level_bits: int) -> bytes:
    from dsdistill import codec

    blobs, at = [], 0
    for count in scored.counts:
        part = slice(at, at + count)
        blobs.append(codec.encode(scored.ids[part], scored.logp[part], scored.log_rest[part], level_bits=level_bits))
        at += count
    head = _header(scored, model=model, tokenizer=tokenizer, level_bits=level_bits, blobs=[len(b) for b in blobs])
    parts = [CODEC_MAGIC, struct.pack("<I", len(head)), head, *blobs, scored.tails.astype("<f4").tobytes()]
    if scored.label_logp is not None:
        parts.append(scored.label_logp.astype("<f4").tobytes())
    return b"".join(parts)


def decode_any(data: bytes) -> tuple[dict[str, Any], Scored]:
    """(header, arrays) of a reply in either binary form."""
    return decode_codec(data) if data[:4] == CODEC_MAGIC else decode(data)


def decode_codec(data: bytes) -> tuple[dict[str, Any], Scored]:
    from dsdistill import codec

    (size,) = struct.unpack("<I", data[4:8])
    header = json.loads(data[8 : 8 + size])
    counts, sizes = [int(c) for c in header["counts"]], [int(b) for b in header["blobs"]]
    n, k, m, labels, bits = sum(counts), int(header["k"]), int(header["m"]), bool(header["labels"]), int(header["level_bits"])
    at = 8 + size
    if len(data) - at != sum(sizes) + n * m * 4 + (n * 4 if labels else 0):
        raise ValueError(f"codec reply of {len(data) - at} bytes does not match its header")
    ids, logp, rest = [], [], []
    for count, length in zip(counts, sizes):
        d = codec.decode(data[at : at + length], count, k, level_bits=bits)
        ids.append(d.ranks)
        logp.append(d.logp)
        rest.append(d.log_rest)
        at += length
    tails = np.frombuffer(data, dtype="<f4", count=n * m, offset=at).reshape(n, m).copy()
    at += n * m * 4
    label_logp = np.frombuffer(data, dtype="<f4", count=n, offset=at).copy() if labels else None
    return header, Scored(
        counts,
        np.concatenate(ids).astype(np.int64) if ids else np.zeros((0, k), np.int64),
        np.concatenate(logp).astype(np.float32) if logp else np.zeros((0, k), np.float32),
        np.concatenate(rest).astype(np.float32) if rest else np.zeros(0, np.float32),
        tails,
        label_logp,
    )
