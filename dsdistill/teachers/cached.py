"""A teacher read from an offline cache (`teacher.cache`): `TeacherCache` opens a directory written by
`dsdistill teacher-cache` (format: cache_format.py), `CachedTeacher` serves its top-k per packed row, and
`CachePlan` checks it against the run before training starts. No teacher model is loaded.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from dsdistill.codec import decode
from dsdistill.errors import ConfigError, DistillError
from dsdistill.losses.fused import SparseTeacher
from dsdistill.rundir import sha256_file, sha256_files
from dsdistill.teachers.base import Capabilities, RunContext, TeacherInput, TeacherSignal
from dsdistill.teachers.cache_format import (
    MANIFEST,
    READABLE_VERSIONS,
    CacheError,
    Shard,
    check_manifest,
    eval_fingerprint,
    read_header,
    run_temperatures,
    tokenizer_hash,
)

if TYPE_CHECKING:
    from dsdistill.needs import Needs


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
        check_manifest(m, path, field)
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
        self._shards: dict[tuple[str, int], Shard] = {}

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

    def _shard(self, split: str, j: int) -> Shard:
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
            hit = self._shards[(split, j)] = Shard(header, payload)
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

    def __init__(self, cache: TeacherCache, *, vocab: int, ignore_index: int, model_config: Any = None):
        self.cache = cache
        self.model_config = model_config
        self.vocab = vocab
        self.ignore_index = ignore_index
        self.covered = 0
        """Teacher-perplexity tokens whose label was among the cached top-k (exact); the others are estimated."""
        self.estimated = 0
        self.taken_ahead = 0
        """Micro-batches whose rows were decoded ahead, on the read-ahead thread, before a step asked."""
        self._ahead: list[tuple[set, threading.Thread, dict]] = []
        """Windows being decoded on a thread: (their micro-batches' row keys, the thread, results by key)."""

    def capabilities(self) -> Capabilities:
        return cache_capabilities(self.cache)

    def prepare(self, window: list[TeacherInput], needs) -> Optional[str]:
        return None  # it computes (or reads) each micro-batch's signal when asked

    def prefetch(self, window: list[TeacherInput], needs) -> None:
        """Decode `window`'s rows on a thread while the step before it computes (numpy releases the GIL for
        most of it); `signal` takes each micro-batch's from there, or decodes it then if it was not asked for."""
        self._ahead = self._ahead[-1:]  # the window being trained on stays; anything older is stale
        if not needs.teacher_logits:
            return
        jobs = [(tuple(b.rows.tolist()), b.valid) for b in window if b.rows is not None]
        box: dict[tuple, Any] = {}

        def work() -> None:
            for key, valid in jobs:
                try:
                    box[key] = self._sparse(valid, torch.tensor(key), torch.device("cpu"), pin=True)
                except DistillError as e:  # raised again where the micro-batch asks for it
                    box[key] = e

        thread = threading.Thread(target=work, name="dsdistill-cache-read-ahead", daemon=True)
        thread.start()
        self._ahead.append(({key for key, _ in jobs}, thread, box))

    def _take(self, rows: Optional[torch.Tensor], device) -> Optional[SparseTeacher]:
        if rows is None or not self._ahead:
            return None
        key = tuple(rows.tolist())
        for keys, thread, box in self._ahead:
            if key in keys:
                thread.join()
                got = box.pop(key, None)
                if isinstance(got, DistillError):
                    raise got
                if got is None:
                    return None
                self.taken_ahead += 1
                return got.to(device)
        return None

    def begin_step(self, needs: "Needs") -> None:
        pass

    def end_step(self) -> None:
        pass

    def _sparse(self, valid: torch.Tensor, rows: Optional[torch.Tensor], device, *, pin: bool = False) -> SparseTeacher:
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
        sp = SparseTeacher(
            cat(ids, (0, k), torch.int64),
            cat(lps, (0, k), torch.float32),
            cat(rests, (0,), torch.float32),
            cat(tails, (0, m), torch.float32),
            self.cache.temperatures,
        )
        if pin and torch.cuda.is_available():  # page-locked: the copy to the device overlaps the step
            sp = sp.pinned()
        return sp.to(device)

    def signal(self, batch: TeacherInput, needs: "Needs") -> TeacherSignal:
        sig = TeacherSignal()
        if needs.teacher_logits:
            device = batch.input_ids.device
            sig.distribution = self._take(batch.rows, device) or self._sparse(batch.valid, batch.rows, device)
        return sig

    def lm_sums(self, batch: TeacherInput, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The teacher's cross-entropy from the cache: exact where the label is among the top-k, else the
        rest's mass spread evenly over the other tokens (an estimate; `covered` counts the exact ones)."""
        from dsdistill.objective import shifted_valid

        valid = shifted_valid(labels, self.ignore_index)
        sp = self._sparse(valid, batch.rows, labels.device)
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

    def params(self) -> int:
        from dsdistill.models import count_params

        return count_params(self.model_config)

    def where(self) -> str:
        return "offline cache"

    def exact_share(self) -> Optional[float]:
        return self.covered / max(self.covered + self.estimated, 1)

    def separation_forward(self) -> None:
        return None


def cache_capabilities(cache: TeacherCache) -> Capabilities:
    """A cache holds the top-k and the tail statistics of the rows it was written for, nothing else."""
    return Capabilities(distribution="sparse", top_k=cache.k, temperatures=(1.0, *cache.temperatures), reads_ahead=True)


# ---------------------------------------------------------------------------------------------- checking


class CachePlan:
    """`teacher.cache`: a directory written by `dsdistill teacher-cache`, opened and checked (its shards by rank 0)."""

    field = "teacher.cache"
    noun = "a cache"

    @classmethod
    def open(cls, cfg: Any, student_tokenizer: Any, *, rank: int) -> "CachePlan":
        return cls(cfg.teacher.cache, student_tokenizer, rank=rank)

    def __init__(self, directory: str, student_tokenizer: Any, *, rank: int):
        from dsdistill.config import ModelSpec
        from dsdistill.models import load_config

        self.dir = self.source = directory
        spec = ModelSpec(path=str(Path(directory) / "teacher"))  # the teacher's config: the plan's shapes, no weights
        if not (Path(spec.path) / "config.json").is_file():
            raise ConfigError(
                f"teacher.cache: '{directory}' has no teacher/config.json; expected a directory written by dsdistill teacher-cache"
            )
        self.model_config = load_config(spec, field="teacher.cache")
        self.tokenizer = student_tokenizer  # checked first, by hash: anything else would be read through the wrong ids
        self.cache = cache = TeacherCache(directory)
        theirs, ours = cache.manifest["tokenizer_hash"], tokenizer_hash(student_tokenizer)
        if theirs != ours:
            raise CacheError(f"teacher.cache: '{cache.dir}' was written with another tokenizer ({theirs}; this run's is {ours})")
        if rank == 0:
            cache.verify_shards()  # each shard once, not once per rank

    def capabilities(self) -> Capabilities:
        return cache_capabilities(self.cache)

    def verify(self, ctx: RunContext) -> None:
        verify_for_run(self.cache, ctx)

    def describe(self) -> str:
        m = self.cache.manifest
        return (
            f"offline cache {self.dir} (top-{self.cache.k} + rest, {m['bytes_per_token']:.0f} bytes per token, "
            f"{m['tokens']:,} positions; of {m['teacher']['path']}); no teacher model is loaded"
        )

    def plan_json(self) -> dict[str, Any]:
        return {"cache": self.dir, "k": self.cache.k, "bytes_per_token": self.cache.manifest["bytes_per_token"]}

    def kd_semantics(self) -> dict[str, Any]:
        return {"top_k_support": "teacher"}  # the cache holds the teacher's top-k only

    def build(self, plan: Any, *, needs: "Needs") -> CachedTeacher:
        return CachedTeacher(
            self.cache, vocab=plan.vocab, ignore_index=plan.cfg.loss.ignore_index, model_config=self.model_config
        )


def verify_for_run(cache: TeacherCache, ctx: RunContext) -> None:
    """The cache against the run's data and components: one line naming the first thing that differs."""
    from dsdistill.data import data_fingerprint

    cfg, splits, components, total_steps = ctx.cfg, ctx.splits, ctx.components, ctx.total_steps
    seq_len = cfg.train.seq_len
    m = cache.manifest
    if splits.streamed:
        raise ConfigError(
            "teacher.cache: needs data read whole (a streamed source has no fixed row numbers); set data.streaming: false"
        )
    crossed, asked = m.get("cross_tokenizer"), cfg.teacher is not None and cfg.teacher.cross_tokenizer is not None
    if crossed is not None and not asked:
        raise ConfigError(
            f"teacher.cache: '{cache.dir}' holds the rows of a teacher with another tokenizer (at the positions paired "
            "with the student's); set teacher.cross_tokenizer and teacher.tokenizer (that teacher's tokenizer) to read it"
        )
    if crossed is None and asked:
        raise ConfigError(
            f"teacher.cross_tokenizer: '{cache.dir}' holds a teacher that reads the student's own tokens; write the cache "
            "with this config (dsdistill teacher-cache) or leave cross_tokenizer unset"
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
    if "kd" in components:
        missing = [t for t in run_temperatures(cfg, total_steps) if t != 1.0 and t not in cache.temperatures]
        if missing:
            served = ", ".join(f"{t:g}" for t in (1.0, *cache.temperatures))
            raise ConfigError(
                f"curriculum.temperature: this run uses T = {missing[0]:g}, but the teacher cache '{cache.dir}' holds exact "
                f"tails for T in {{{served}}} only; write the cache with this run's config (dsdistill teacher-cache)"
            )
