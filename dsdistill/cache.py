"""The offline teacher cache: run the teacher once over the packed rows training will see, store its top-k
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

import functools
import hashlib
import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from dsdistill.codec import decode, encode, exact_bytes
from dsdistill.components.base import Needs
from dsdistill.errors import ConfigError, DistillError
from dsdistill.losses.fused import SparseTeacher
from dsdistill.rundir import sha256_file, sha256_files, write_atomic, write_failure
from dsdistill.teacher import TeacherSignal

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


def _write_atomic(path: Path, data: bytes) -> None:
    """The file whole or not at all; a full disk or any refused write is one line naming the file."""
    try:
        write_atomic(path, data, field="teacher-cache --out")
    except OSError as e:
        raise CacheError(
            f"teacher-cache: writing '{path}' failed ({write_failure(e, path.parent)}); the files written before are "
            "kept, and the same command resumes the write"
        ) from None


def _write_if(path: Optional[Path], header: dict[str, Any], blobs: list[bytes]) -> None:
    if path is not None:
        write_shard(path, header, blobs)


def write_shard(path: Path, header: dict[str, Any], blobs: list[bytes]) -> None:
    offsets = np.cumsum([0] + [len(b) for b in blobs]).tolist()
    header = {**header, "offsets": offsets, "payload_bytes": offsets[-1]}
    head = json.dumps(header, sort_keys=True).encode()
    _write_atomic(path, MAGIC + struct.pack("<Q", len(head)) + head + b"".join(blobs))


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


def _check_manifest(m: Any, path: Path, field: str) -> None:
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
class _Shard:
    header: dict[str, Any]
    payload: np.ndarray
    """The memory-mapped row blobs."""


# ---------------------------------------------------------------------------------------------- reading


class TeacherCache:
    """A written cache, opened for reading: `row(i)` decodes packed row i's positions (training rows first,
    then eval rows, numbered after them)."""

    def __init__(self, directory: str | Path, *, field: str = "teacher.cache"):
        self.dir = Path(directory)
        self.field = field
        path = self.dir / MANIFEST
        if not path.is_file():
            raise CacheError(
                f"{field}: '{self.dir}' has no {MANIFEST}; expected a directory written (to the end) by dsdistill teacher-cache"
            )
        try:
            self.manifest: dict[str, Any] = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CacheError(f"{field}: '{path}' is not readable JSON ({e})") from None
        if not isinstance(self.manifest, dict):
            raise CacheError(f"{field}: '{path}' is not a JSON object (a damaged manifest); run dsdistill teacher-cache again")
        if self.manifest.get("format_version") not in READABLE_VERSIONS:
            raise CacheError(
                f"{field}: '{self.dir}' has cache format {self.manifest.get('format_version')!r}; "
                f"this dsdistill reads {', '.join(map(str, READABLE_VERSIONS))}"
            )
        m = self.manifest
        _check_manifest(m, path, field)
        self.temperatures: tuple[float, ...] = tuple(float(t) for t in m.get("tail_temperatures", []))
        """Temperatures other than 1 whose exact tail statistic every position carries."""
        self.k, self.level_bits, self.vocab = int(m["k"]), int(m["level_bits"]), int(m["vocab"])
        try:
            ranks = np.fromfile(self.dir / "ranks.bin", dtype=np.uint32)
        except OSError as e:
            raise CacheError(
                f"{field}: '{self.dir / 'ranks.bin'}' cannot be read ({e.strerror or e}); run dsdistill teacher-cache again"
            ) from None
        if ranks.shape != (self.vocab,) or np.unique(ranks).size != self.vocab or int(ranks.max(initial=0)) >= self.vocab:
            raise CacheError(
                f"{field}: '{self.dir / 'ranks.bin'}' is not a ranking of {self.vocab} tokens (damaged); "
                "run dsdistill teacher-cache again"
            )
        self.id_of = np.argsort(ranks).astype(np.int64)
        self.shard_rows = int(m["shard_rows"])
        self.train_rows = int(m["data"]["train_rows"])
        self.eval_rows = int(m["data"]["eval_rows"])
        self.shard_sha256: dict[str, list[str]] = m.get("shard_sha256") or {}
        """Each shard file's SHA-256 by split (caches written since 2026-12-04), checked when it is opened."""
        self._shards: dict[tuple[str, int], _Shard] = {}

    def verify_shards(self) -> None:
        """Every shard against the manifest's checksums, in parallel (a damaged shard is refused when the
        cache opens, not when training first draws one of its rows)."""
        jobs = [(split, j, want) for split, hashes in self.shard_sha256.items() for j, want in enumerate(hashes)]
        paths = [self.dir / split / f"{j:05d}.bin" for split, j, _ in jobs]
        for path in paths:
            if not path.is_file():
                raise CacheError(f"{self.field}: shard '{path}' is missing; run dsdistill teacher-cache again to rewrite it")
        got = sha256_files(paths)
        for path, (_, _, want), have in zip(paths, jobs, got):
            if have != want:
                raise CacheError(
                    f"{self.field}: shard '{path}' does not match the checksum in the manifest (damaged); "
                    "run dsdistill teacher-cache again to rewrite it"
                )

    def _shard(self, split: str, j: int) -> _Shard:
        hit = self._shards.get((split, j))
        if hit is None:
            path = self.dir / split / f"{j:05d}.bin"
            header = read_header(path)
            if header is None:
                raise CacheError(
                    f"{self.field}: shard '{path}' is missing or damaged; run dsdistill teacher-cache again to rewrite it"
                )
            want = self.shard_sha256.get(split)
            if want is not None and (j >= len(want) or sha256_file(path) != want[j]):
                raise CacheError(
                    f"{self.field}: shard '{path}' does not match the checksum in the manifest (damaged); "
                    "run dsdistill teacher-cache again to rewrite it"
                )
            payload = np.memmap(path, dtype=np.uint8, mode="r", offset=header["_data_start"], shape=(header["payload_bytes"],))
            hit = self._shards[(split, j)] = _Shard(header, payload)
        return hit

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(token ids [n, k], log-probs [n, k], log rest [n], tail statistics [n, len(temperatures)]) of
        packed row i's loss-bearing positions."""
        split, local = ("train", i) if i < self.train_rows else ("eval", i - self.train_rows)
        if not 0 <= local < (self.train_rows if split == "train" else self.eval_rows):
            raise CacheError(f"{self.field}: row {i} is not in the cache ({self.train_rows} train + {self.eval_rows} eval rows)")
        shard = self._shard(split, local // self.shard_rows)
        h, r = shard.header, local % self.shard_rows
        try:
            n, m = h["tokens"][r], len(self.temperatures)
            blob = shard.payload[h["offsets"][r] : h["offsets"][r + 1]]
            tails = np.frombuffer(blob[: 2 * n * m].tobytes(), dtype=np.float16).astype(np.float32).reshape(n, m)
            d = decode(blob[2 * n * m :], n, self.k, level_bits=self.level_bits)
            return self.id_of[d.ranks], d.logp, d.log_rest, tails
        except (IndexError, ValueError, KeyError, TypeError) as e:
            raise CacheError(
                f"{self.field}: row {i} of shard '{self.dir / split / f'{local // self.shard_rows:05d}.bin'}' cannot be "
                f"decoded ({type(e).__name__}; damaged); run dsdistill teacher-cache again to rewrite it"
            ) from None


class CachedTeacher:
    """A `TeacherSource` that reads the teacher's distributions from a `TeacherCache` (no model)."""

    def __init__(self, cache: TeacherCache, *, vocab: int, ignore_index: int):
        self.cache = cache
        self.vocab = vocab
        self.ignore_index = ignore_index
        self.covered = 0
        """Teacher-perplexity tokens whose label was among the cached top-k (exact); the others are estimated."""
        self.estimated = 0

    def begin_step(self, needs: Needs) -> None:
        pass

    def end_step(self) -> None:
        pass

    def _sparse(self, valid: torch.Tensor, rows: Optional[torch.Tensor], device) -> SparseTeacher:
        if rows is None:
            raise CacheError(f"{self.cache.field}: a batch without row numbers cannot be read from a teacher cache")
        ids, lps, rests, tails = [], [], [], []
        for b, r in enumerate(rows.tolist()):
            want = int(valid[b].sum())
            if r < 0:  # an eval filler row carries no loss
                if want:
                    raise CacheError(f"{self.cache.field}: a padding row carries {want} loss-bearing positions")
                continue
            i, lp, rest, tail = self.cache.row(r)
            if i.shape[0] != want:
                raise CacheError(
                    f"{self.cache.field}: row {r} has {i.shape[0]} cached positions but the batch has {want}; "
                    "the cache is of other data (run dsdistill check)"
                )
            ids.append(i)
            lps.append(lp)
            rests.append(rest)
            tails.append(tail)
        k, m = self.cache.k, len(self.cache.temperatures)
        cat = lambda xs, shape, dt: torch.from_numpy(np.concatenate(xs)) if xs else torch.zeros(shape, dtype=dt)  # noqa: E731
        return SparseTeacher(
            cat(ids, (0, k), torch.int64).to(device),
            cat(lps, (0, k), torch.float32).to(device),
            cat(rests, (0,), torch.float32).to(device),
            cat(tails, (0, m), torch.float32).to(device),
            self.cache.temperatures,
        )

    def signal(self, input_ids, valid, needs: Needs, *, position_ids=None, rows=None) -> TeacherSignal:
        sig = TeacherSignal()
        if needs.teacher_logits:
            sig.sparse = self._sparse(valid, rows, input_ids.device)
        return sig

    def lm_sums(self, input_ids, labels, *, position_ids=None, rows=None) -> tuple[torch.Tensor, int]:
        """The teacher's cross-entropy from the cache: exact where the label is among the top-k, else the
        rest's mass spread evenly over the other tokens (an estimate; `covered` counts the exact ones)."""
        from dsdistill.objective import shifted_valid

        valid = shifted_valid(labels, self.ignore_index)
        sp = self._sparse(valid, rows, labels.device)
        ids, lp, rest = sp.ids, sp.logp, sp.log_rest
        targets = labels[:, 1:][labels[:, 1:] != self.ignore_index]
        full = torch.cat([lp, rest[:, None]], dim=-1)
        full = torch.log_softmax(full, dim=-1)
        hit = ids == targets[:, None]
        found = hit.any(-1)
        others = math.log(max(self.vocab - self.cache.k, 1))
        logp = torch.where(found, (full[:, :-1] * hit).sum(-1), full[:, -1] - others)
        self.covered += int(found.sum())
        self.estimated += int((~found).sum())
        return -logp.sum(), int(targets.numel())


# ---------------------------------------------------------------------------------------------- checking


def open_with_tokenizer(directory: str, tokenizer) -> TeacherCache:
    """The cache, refused in one line unless it was written with this tokenizer (checked first: any other
    difference would be read through the wrong vocabulary)."""
    cache = TeacherCache(directory)
    theirs, ours = cache.manifest["tokenizer_hash"], tokenizer_hash(tokenizer)
    if theirs != ours:
        raise CacheError(f"teacher.cache: '{cache.dir}' was written with another tokenizer ({theirs}; this run's is {ours})")
    return cache


def verify_for_run(
    cache: TeacherCache, cfg, splits, *, seq_len: int, components: dict[str, Any], layers, total_steps: int
) -> TeacherCache:
    """The cache against the run's data and components: one line naming the first thing that differs."""
    from dsdistill.data import data_fingerprint

    m = cache.manifest
    if splits.streamed:
        raise ConfigError(
            "teacher.cache: needs data read whole (a streamed source has no fixed row numbers); set data.streaming: false"
        )
    d = m["data"]
    for what, cached, now in (
        ("seq_len", d["seq_len"], seq_len),
        ("packing", d["packing"], splits.packing),
        ("training data", d["train_fingerprint"], data_fingerprint(splits, cfg)),
        ("eval data", d["eval_fingerprint"], eval_fingerprint(splits)),
    ):
        if cached != now:
            raise CacheError(f"teacher.cache: '{cache.dir}' is of other {what} (cache: {cached}; this run: {now})")
    internals = {
        name: need
        for name, c in components.items()
        for need in [c.needs(layers)]
        if need.teacher_hidden or need.teacher_pooled or need.teacher_qk
    }
    if internals:
        import yaml

        keep = {
            n: (sch.value if sch.kind == "constant" else sch.model_dump())
            for n, sch in cfg.curriculum.weights.items()
            if n not in internals
        }
        line = yaml.safe_dump(keep, default_flow_style=True, sort_keys=False).strip()
        raise ConfigError(
            f"teacher.cache: {', '.join(internals)} need the teacher's hidden states or attention, which a cache does not "
            f"hold; train from the cache with --set curriculum.weights='{line}' (or use teacher.path)"
        )
    if cfg.loss.kd_top_k is not None:
        raise ConfigError(f"loss.kd_top_k: the teacher cache sets k ({cache.k}, with a rest bucket); leave kd_top_k unset")
    if "kd" in components:
        missing = [t for t in run_temperatures(cfg, total_steps) if t != 1.0 and t not in cache.temperatures]
        if missing:
            served = ", ".join(f"{t:g}" for t in (1.0, *cache.temperatures))
            raise ConfigError(
                f"curriculum.temperature: this run uses T = {missing[0]:g}, but the teacher cache '{cache.dir}' holds exact "
                f"tails for T in {{{served}}} only; write the cache with this run's config (dsdistill teacher-cache)"
            )
    return cache


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


def fidelity(full_logp: torch.Tensor, ids: torch.Tensor, decoded_logp: np.ndarray, log_rest: torch.Tensor) -> dict[str, float]:
    """Sums over positions of KL(teacher || reconstruction) for the exact top-k and for the decoded cache
    (both with the rest spread evenly over the other tokens): what truncation and quantisation cost."""
    full = full_logp.double()
    V, k = full.size(-1), ids.size(-1)
    p = full.exp()
    tail = (log_rest.double() - math.log(V - k))[:, None]

    def kl(top_logp: torch.Tensor) -> torch.Tensor:
        recon = tail.expand_as(full).clone()
        recon.scatter_(-1, ids, top_logp)
        recon = torch.log_softmax(recon, dim=-1)
        return (p * (full - recon)).sum(-1)

    exact = kl(full.gather(-1, ids))
    quant = kl(torch.from_numpy(decoded_logp).double())
    return {"positions": float(full.size(0)), "kl_exact_sum": float(exact.sum()), "kl_cache_sum": float(quant.sum())}


AUTO_BITS = range(4, 11)
"""Level precisions `--level-bits auto` chooses among (the smallest that is precise enough)."""


def choose_level_bits(full_logp: torch.Tensor, ranks_of: torch.Tensor, top_k: int) -> int:
    """The fewest level bits whose quantisation adds at most 2% to the exact top-k's truncation error (or
    1e-5 nats, when truncation loses almost nothing because k is close to the vocabulary) on a sample."""
    top, ids = full_logp.topk(top_k, dim=-1)
    rest = torch.logsumexp(full_logp.scatter(-1, ids, float("-inf")), dim=-1)
    ranks = ranks_of[ids].numpy()
    order = np.argsort(ranks, axis=1, kind="stable")
    ids_sorted = torch.from_numpy(np.take_along_axis(ids.numpy(), order, 1))
    for bits in AUTO_BITS:
        d = decode(encode(ranks, top.numpy(), rest.numpy(), level_bits=bits), full_logp.size(0), top_k, level_bits=bits)
        f = fidelity(full_logp, ids_sorted, d.logp, rest)
        if f["kl_cache_sum"] - f["kl_exact_sum"] <= max(0.02 * f["kl_exact_sum"], 1e-5 * f["positions"]):
            return bits
    return AUTO_BITS[-1]


def write(
    session_parts, out: Path, *, top_k: int, level_bits: Optional[int], say, shard_rows: int = SHARD_ROWS
) -> dict[str, Any]:
    """Write (or finish writing) the cache of a run's data into `out`; returns the manifest."""
    plan, data, engine, tokenizer = session_parts
    import torch.distributed as dist

    from dsdistill.data import collate, data_fingerprint
    from dsdistill.dist import agree

    cfg, rank, world = plan.cfg, plan.rank, plan.world
    splits = data.splits
    if splits.streamed:
        raise ConfigError(
            "teacher-cache: needs data read whole (a streamed source has no fixed row numbers); set data.streaming: false"
        )
    if not 1 <= top_k <= plan.vocab - 1:
        raise ConfigError(
            f"teacher-cache: --top-k {top_k}: expected 1..{plan.vocab - 1} (the vocabulary has {plan.vocab} tokens)"
        )
    if level_bits is not None and not 2 <= level_bits <= 12:
        raise ConfigError(f"teacher-cache: --level-bits {level_bits}: expected 2..12 (or auto)")
    if shard_rows < 1:
        raise ConfigError(f"teacher-cache: --shard-rows {shard_rows}: expected a positive number of rows")
    micro = cfg.train.micro_batch_size
    device = engine.device
    ignore = cfg.loss.ignore_index
    ranks_table = rank_table(splits.train, plan.vocab)  # the codec's id map: computed once, from the data alone
    if level_bits is None:
        # auto: measured on the first training rows, which every rank forwards alike (the same choice everywhere)
        sample = collate([splits.train[i] for i in range(min(micro, len(splits.train)))])
        pos = sample.get("position_ids")
        with torch.no_grad():
            logits, _ = engine(
                sample["input_ids"].to(device),
                hidden_states=False,
                head=True,
                position_ids=None if pos is None else pos.to(device),
            )
        keep = sample["labels"][:, 1:] != ignore
        lp = torch.log_softmax(logits[:, :-1, : plan.vocab].float(), dim=-1).cpu()[keep]
        level_bits = choose_level_bits(lp, torch.from_numpy(ranks_table.astype(np.int64)), top_k)
        say(f"teacher-cache: --level-bits auto chose {level_bits} bits")
    temps = [t for t in run_temperatures(cfg, plan.total_steps) if t != 1.0]
    what = {
        "format_version": FORMAT_VERSION,
        "k": top_k,
        "level_bits": level_bits,
        "shard_rows": shard_rows,
        "tail_temperatures": temps,
        "vocab": plan.vocab,
        "teacher": {"path": cfg.teacher.path, "config_hash": config_hash(plan.teacher_config)},
        "tokenizer_hash": tokenizer_hash(tokenizer),
        "data": {
            "train_fingerprint": data_fingerprint(splits, cfg),
            "eval_fingerprint": eval_fingerprint(splits),
            "seq_len": cfg.train.seq_len,
            "packing": splits.packing,
            "train_rows": len(splits.train),
            "eval_rows": len(splits.eval),
        },
    }

    def prepare() -> None:
        if rank != 0:
            return
        out.mkdir(parents=True, exist_ok=True)
        for split in ("train", "eval"):
            (out / split).mkdir(exist_ok=True)
        plan_file = out / "plan.json"
        if plan_file.exists():
            try:
                before = json.loads(plan_file.read_text())
            except ValueError:
                before = None
            if before != what:
                raise CacheError(
                    f"teacher-cache: '{out}' holds (part of) a cache of another run (other data, teacher, k or level bits); "
                    "write to a new directory"
                )
        else:
            _write_atomic(plan_file, json.dumps(what, indent=2, sort_keys=True).encode())
        _write_atomic(out / "ranks.bin", ranks_table.tobytes())
        (out / "teacher").mkdir(exist_ok=True)
        _write_atomic(out / "teacher" / "config.json", plan.teacher_config.to_json_string().encode())
        for stale in list(out.glob("*/.*.tmp*")):  # what an interrupted write left half-done
            stale.unlink(missing_ok=True)

    agree(prepare, what="preparing the cache directory")
    if world > 1:
        dist.barrier()
    ranks_of = torch.from_numpy(np.fromfile(out / "ranks.bin", dtype=np.uint32).astype(np.int64))
    per_shard = math.ceil(shard_rows / micro)
    done_shards = 0
    for split, rows in (("train", splits.train), ("eval", splits.eval)):
        n_shards = math.ceil(len(rows) / shard_rows)
        todo = []
        for j in range(n_shards):
            h = read_header(out / split / f"{j:05d}.bin")
            if h is None or h.get("first_row") != j * shard_rows or h.get("k") != top_k:
                todo.append(j)
        done_shards += n_shards - len(todo)
        rounds = math.ceil(len(todo) / world)
        for r in range(rounds):
            mine = r * world + rank
            j = todo[mine] if mine < len(todo) else None
            first = 0 if j is None else j * shard_rows
            count = 0 if j is None else min(shard_rows, len(rows) - first)
            blobs: list[bytes] = []
            tokens: list[int] = []
            fid: dict[str, float] = {}
            for b in range(per_shard):  # every rank runs the same number of forwards (ZeRO-3 gathers together)
                idx = list(range(first + b * micro, min(first + count, first + (b + 1) * micro)))
                real = bool(idx)
                batch = collate([rows[i] for i in (idx or [0])])
                ids = batch["input_ids"].to(device)
                pos = batch.get("position_ids")
                with torch.no_grad():
                    logits, _ = engine(ids, hidden_states=False, head=True, position_ids=None if pos is None else pos.to(device))
                if not real:
                    continue
                labels = batch["labels"]
                logp = torch.log_softmax(logits[:, :-1, : plan.vocab].float(), dim=-1).cpu()
                mask = labels[:, 1:] != ignore
                for row in range(len(idx)):
                    lp = logp[row][mask[row]]
                    top, ids_k = lp.topk(top_k, dim=-1)
                    tail_lp = lp.scatter(-1, ids_k, float("-inf"))
                    rest = torch.logsumexp(tail_lp, dim=-1)
                    blob = encode(ranks_of[ids_k].numpy(), top.numpy(), rest.numpy(), level_bits=level_bits)
                    stats = [torch.logsumexp(tail_lp / t, dim=-1) for t in temps]
                    tails = torch.stack(stats, dim=-1) if stats else torch.zeros(lp.size(0), 0)
                    blobs.append(tails.numpy().astype(np.float16).tobytes() + blob)
                    tokens.append(int(lp.size(0)))
                    if b == 0 and row == 0 and lp.size(0):  # the shard's fidelity sample: its first row
                        d = decode(blob, lp.size(0), top_k, level_bits=level_bits)  # the codec part alone
                        order = np.argsort(ranks_of[ids_k].numpy(), axis=1, kind="stable")
                        fid = fidelity(lp, torch.from_numpy(np.take_along_axis(ids_k.numpy(), order, 1)), d.logp, rest)
            header = {
                "version": FORMAT_VERSION,
                "split": split,
                "first_row": first,
                "rows": count,
                "k": top_k,
                "level_bits": level_bits,
                "tokens": tokens,
                "fidelity": fid,
            }
            # every rank learns of a rank's failed write (a full disk), so none waits in the next barrier
            target = None if j is None else out / split / f"{j:05d}.bin"
            agree(functools.partial(_write_if, target, header, blobs), what="writing the cache's shards")
            if rank == 0 and r % 10 == 0:
                say(f"teacher-cache: {split} shard round {r + 1}/{rounds}")
    if world > 1:
        dist.barrier()
    manifest = agree(lambda: _manifest(out, what, rank), what="writing the manifest")
    if world > 1:
        dist.barrier()
    if done_shards:
        say(f"teacher-cache: {done_shards} shards were already written and kept")
    return manifest


def _manifest(out: Path, what: dict[str, Any], rank: int) -> dict[str, Any]:
    """Totals from the shard headers (in shard order, so any world size gives the same manifest)."""
    tokens = payload = 0
    fid = {"positions": 0.0, "kl_exact_sum": 0.0, "kl_cache_sum": 0.0}
    shards: dict[str, int] = {}
    sha: dict[str, list[str]] = {}
    for split, n_rows in (("train", what["data"]["train_rows"]), ("eval", what["data"]["eval_rows"])):
        n = math.ceil(n_rows / what["shard_rows"])
        shards[split] = n
        sha[split] = [sha256_file(out / split / f"{j:05d}.bin") for j in range(n)] if rank == 0 else []
        for j in range(n):
            h = read_header(out / split / f"{j:05d}.bin")
            if h is None:
                raise CacheError(f"teacher-cache: shard '{out / split / f'{j:05d}.bin'}' is missing after writing")
            tokens += sum(h["tokens"])
            payload += h["payload_bytes"]
            for key in fid:
                fid[key] += h["fidelity"].get(key, 0.0)
    k = what["k"]
    exact = fid["kl_exact_sum"] / max(fid["positions"], 1)
    cached = fid["kl_cache_sum"] / max(fid["positions"], 1)
    manifest = {
        **what,
        "shards": shards,
        "shard_sha256": sha,
        "tokens": tokens,
        "payload_bytes": payload,
        "bytes_per_token": payload / max(tokens, 1),
        "plain_bytes_per_token": exact_bytes(1, k),
        "fidelity": {
            "positions": int(fid["positions"]),
            "kl_top_k_exact": exact,
            "kl_cache": cached,
            "quantisation_overhead": (cached - exact) / exact if exact > 0 else 0.0,
        },
    }
    if rank == 0:
        _write_atomic(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest
