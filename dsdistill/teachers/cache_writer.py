"""`dsdistill teacher-cache`: run the teacher's engine over the run's packed rows and write its top-k
distributions in the format of cache_format.py (shards go to ranks round-robin; a stopped write resumes).
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
import torch

from dsdistill.codec import decode, encode, exact_bytes
from dsdistill.errors import ConfigError
from dsdistill.rundir import sha256_file
from dsdistill.teachers.cache_format import (
    FORMAT_VERSION,
    MANIFEST,
    SHARD_ROWS,
    CacheError,
    config_hash,
    eval_fingerprint,
    rank_table,
    read_header,
    run_temperatures,
    tokenizer_hash,
    write_atomic_or_fail,
    write_shard,
)

if TYPE_CHECKING:
    from dsdistill.config import RunConfig


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


def _write_if(path: Optional[Path], header: dict[str, Any], blobs: list[bytes]) -> None:
    if path is not None:
        write_shard(path, header, blobs)


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

    from dsdistill.dist import agree

    _check_args(plan, data.splits, top_k=top_k, level_bits=level_bits, shard_rows=shard_rows)
    ranks_table = rank_table(data.splits.train, plan.vocab)  # the codec's id map: computed once, from the data alone
    cross = _cross(plan, tokenizer, top_k)
    if cross is not None:
        top_k = cross.k
    if level_bits is None and cross is not None:
        level_bits = CROSS_LEVEL_BITS
        say(f"teacher-cache: --level-bits auto: {level_bits} bits for a teacher with another tokenizer")
    elif level_bits is None:
        level_bits = _auto_level_bits(plan, data.splits, engine, ranks_table, top_k)
        say(f"teacher-cache: --level-bits auto chose {level_bits} bits")
    what = _header(plan, data.splits, tokenizer, top_k=top_k, level_bits=level_bits, shard_rows=shard_rows, cross=cross)
    agree(lambda: _prepare(out, what, ranks_table, plan) if plan.rank == 0 else None, what="preparing the cache directory")
    if plan.world > 1:
        dist.barrier()
    ranks_of = torch.from_numpy(np.fromfile(out / "ranks.bin", dtype=np.uint32).astype(np.int64))
    done_shards = 0
    for split, rows in (("train", data.splits.train), ("eval", data.splits.eval)):
        done_shards += _write_split(plan, engine, out, split, rows, what, ranks_of, say, cross)
    if plan.world > 1:
        dist.barrier()
    manifest = agree(lambda: _manifest(out, what, plan.rank), what="writing the manifest")
    if plan.world > 1:
        dist.barrier()
    if done_shards:
        say(f"teacher-cache: {done_shards} shards were already written and kept")
    return manifest


CROSS_LEVEL_BITS = 8
"""`--level-bits auto` for a teacher with another tokenizer (the measured choice needs the student's vocabulary)."""


@dataclass(frozen=True)
class CrossCache:
    """What a cache of a teacher with another tokenizer stores per row: its distribution at the paired
    positions, projected onto the student's vocabulary (`crosstok.project_rows`) with k slots that every
    context fills (no absent slot: the codec stores k tokens per position)."""

    maps: Any
    k: int
    teacher_tokenizer_hash: str
    method: str
    vocab: int
    """The teacher tokenizer's size: its logits past it (a padded embedding) are no token's."""


def _cross(plan, tokenizer, top_k: int) -> Optional[CrossCache]:
    spec = plan.cfg.teacher
    if spec is None or spec.cross_tokenizer is None:
        return None
    from dsdistill.crosstok import shared_maps
    from dsdistill.data import teacher_text

    side = teacher_text(plan.cfg, tokenizer)
    assert side is not None  # a cross-tokenizer config always has its teacher's side
    maps = shared_maps(tokenizer, side.tokenizer)
    k = 1 if spec.cross_tokenizer.method == "chunk_likelihood" else min([top_k] + [len(s) for s, _ in maps.maps.values()])
    return CrossCache(maps, k, tokenizer_hash(side.tokenizer), spec.cross_tokenizer.method, len(side.tokenizer))


def _check_args(plan, splits, *, top_k: int, level_bits: Optional[int], shard_rows: int) -> None:
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


def _auto_level_bits(plan, splits, engine, ranks_table: np.ndarray, top_k: int) -> int:
    """`--level-bits auto`: measured on the first training rows, which every rank forwards alike (the same
    choice everywhere)."""
    from dsdistill.data import collate

    micro = plan.cfg.train.micro_batch_size
    sample = collate([splits.train[i] for i in range(min(micro, len(splits.train)))])
    logits = _logits(engine, sample)
    keep = sample["labels"][:, 1:] != plan.cfg.loss.ignore_index
    lp = torch.log_softmax(logits[:, :-1, : plan.vocab].float(), dim=-1).cpu()[keep]
    return choose_level_bits(lp, torch.from_numpy(ranks_table.astype(np.int64)), top_k)


def _logits(engine, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The teacher's logits for one collated batch (every rank calls it alike: ZeRO-3 gathers together)."""
    pos = batch.get("position_ids")
    with torch.no_grad():
        logits, _ = engine(
            batch["input_ids"].to(engine.device),
            hidden_states=False,
            head=True,
            position_ids=None if pos is None else pos.to(engine.device),
        )
    return logits


def _header(plan, splits, tokenizer, *, top_k: int, level_bits: int, shard_rows: int, cross=None) -> dict[str, Any]:
    """What the cache is of (plan.json; the manifest adds the totals): a resumed write must match it."""
    from dsdistill.data import data_fingerprint

    cfg = plan.cfg
    extra = {}
    if cross is not None:  # rows at the paired positions, over the student's vocabulary
        extra = {"cross_tokenizer": {"teacher_tokenizer_hash": cross.teacher_tokenizer_hash, "method": cross.method}}
    return {
        **extra,
        "format_version": FORMAT_VERSION,
        "k": top_k,
        "level_bits": level_bits,
        "shard_rows": shard_rows,
        "tail_temperatures": [t for t in run_temperatures(cfg, plan.total_steps) if t != 1.0],
        "vocab": plan.vocab,
        "teacher": {"path": cfg.one_teacher("teacher-cache").path, "config_hash": config_hash(plan.teacher_config)},
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


def _prepare(out: Path, what: dict[str, Any], ranks_table: np.ndarray, plan) -> None:
    """Rank 0: the directory, plan.json (or the check that it is this cache's), ranks.bin and the teacher's config."""
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
        write_atomic_or_fail(plan_file, json.dumps(what, indent=2, sort_keys=True).encode())
    write_atomic_or_fail(out / "ranks.bin", ranks_table.tobytes())
    (out / "teacher").mkdir(exist_ok=True)
    write_atomic_or_fail(out / "teacher" / "config.json", plan.teacher_config.to_json_string().encode())
    for stale in list(out.glob("*/.*.tmp*")):  # what an interrupted write left half-done
        stale.unlink(missing_ok=True)


def _write_split(plan, engine, out: Path, split: str, rows, what: dict[str, Any], ranks_of: torch.Tensor, say, cross=None) -> int:
    """The split's missing shards, dealt to ranks round-robin; returns how many were already written."""
    from dsdistill.dist import agree

    shard_rows, top_k, rank, world = what["shard_rows"], what["k"], plan.rank, plan.world
    n_shards = math.ceil(len(rows) / shard_rows)
    todo = []
    for shard in range(n_shards):
        h = read_header(out / split / f"{shard:05d}.bin")
        if h is None or h.get("first_row") != shard * shard_rows or h.get("k") != top_k:
            todo.append(shard)
    rounds = math.ceil(len(todo) / world)
    for r in range(rounds):
        mine = r * world + rank
        j = todo[mine] if mine < len(todo) else None
        first = 0 if j is None else j * shard_rows
        count = 0 if j is None else min(shard_rows, len(rows) - first)
        blobs, tokens, fid = _encode_shard(plan, engine, rows, first, count, what, ranks_of, cross)
        header = {
            "version": FORMAT_VERSION,
            "split": split,
            "first_row": first,
            "rows": count,
            "k": top_k,
            "level_bits": what["level_bits"],
            "tokens": tokens,
            "fidelity": fid,
        }
        # every rank learns of a rank's failed write (a full disk), so none waits in the next barrier
        target = None if j is None else out / split / f"{j:05d}.bin"
        agree(functools.partial(_write_if, target, header, blobs), what="writing the cache's shards")
        if rank == 0 and r % 10 == 0:
            say(f"teacher-cache: {split} shard round {r + 1}/{rounds}")
    return n_shards - len(todo)


def _encode_shard(plan, engine, rows, first: int, count: int, what: dict[str, Any], ranks_of: torch.Tensor, cross=None):
    """(row blobs, positions per row, the fidelity of the shard's first row) of rows first..first+count.
    Every rank runs the same number of forwards (ZeRO-3 gathers together), a rank without a shard on dummies."""
    from dsdistill.data import collate

    micro, ignore = plan.cfg.train.micro_batch_size, plan.cfg.loss.ignore_index
    top_k, level_bits = what["k"], what["level_bits"]
    temps = what["tail_temperatures"]
    blobs: list[bytes] = []
    tokens: list[int] = []
    fid: dict[str, float] = {}
    for b in range(math.ceil(what["shard_rows"] / micro)):
        idx = list(range(first + b * micro, min(first + count, first + (b + 1) * micro)))
        batch = collate([rows[i] for i in (idx or [0])])
        if cross is not None:
            teacher_rows = {"input_ids": batch["t_input_ids"], "position_ids": batch["t_position_ids"]}
            logits = _logits(engine, teacher_rows)[..., : cross.vocab]
            if idx:
                for blob, n in _cross_rows(batch, logits, cross, what, ranks_of, ignore):
                    blobs.append(blob)
                    tokens.append(n)
            continue
        logits = _logits(engine, batch)
        if not idx:
            continue
        # top-k, rest and tails on the logits' device: only [n, k] ids and log-probs and [n] statistics cross
        # to the host, never a [positions, vocab] block
        logp = torch.log_softmax(logits[:, :-1, : plan.vocab].float(), dim=-1)
        mask = (batch["labels"][:, 1:] != ignore).to(logp.device)
        for row in range(len(idx)):
            lp = logp[row][mask[row]]
            top_d, ids_d = lp.topk(top_k, dim=-1)
            tail_lp = lp.scatter(-1, ids_d, float("-inf"))
            rest_d = torch.logsumexp(tail_lp, dim=-1)
            stats = [torch.logsumexp(tail_lp / t, dim=-1) for t in temps]
            tails_d = torch.stack(stats, dim=-1) if stats else lp.new_zeros(lp.size(0), 0)
            top, ids_k, rest, tails = (x.cpu() for x in (top_d, ids_d, rest_d, tails_d))
            blob = encode(ranks_of[ids_k].numpy(), top.numpy(), rest.numpy(), level_bits=level_bits)
            blobs.append(tails.numpy().astype(np.float16).tobytes() + blob)
            tokens.append(int(lp.size(0)))
            if b == 0 and row == 0 and lp.size(0):  # the shard's fidelity sample: its first row
                d = decode(blob, lp.size(0), top_k, level_bits=level_bits)  # the codec part alone
                order = np.argsort(ranks_of[ids_k].numpy(), axis=1, kind="stable")
                fid = fidelity(lp.cpu(), torch.from_numpy(np.take_along_axis(ids_k.numpy(), order, 1)), d.logp, rest)
    return blobs, tokens, fid


def _cross_rows(batch, logits, cross: CrossCache, what: dict[str, Any], ranks_of: torch.Tensor, ignore: int):
    """(blob, positions) of each row of a cross-tokenizer batch: the teacher's logits at the positions paired
    with the student's loss-bearing ones, projected onto the student's vocabulary, encoded as any row is."""
    from dsdistill.crosstok import project_rows

    paired = (batch["labels"][:, 1:] != ignore) & (batch["x_pos"][:, :-1] >= 0)
    if cross.method == "chunk_likelihood":
        yield from _chunk_rows(batch, logits, paired, what, ranks_of, ignore)
        return
    from dsdistill.crosstok import chunks_of, merge_spans, student_of

    # every pair of the batch in KD order (row-major), projected, with the teacher's multi-token spans merged
    b_of, p_of = paired.nonzero(as_tuple=True)
    t_width = logits.size(1)
    flat = logits.reshape(-1, logits.size(-1))
    at = (b_of * t_width + batch["x_pos"][b_of, p_of]).to(flat.device)
    contexts = batch["x_ctx"][b_of, p_of].numpy()
    sp = project_rows(flat.index_select(0, at), contexts, cross.maps, top_k=cross.k, temperatures=what["tail_temperatures"])
    ch = chunks_of(batch["labels"].numpy(), batch["x_pos"].numpy(), batch["t_labels"].numpy(), ignore)
    merged, sel = ch.to_merge
    if len(merged):
        rows_t = torch.from_numpy(ch.t_rows[sel])
        t_ids = batch["t_input_ids"].reshape(-1)
        sp = merge_spans(
            sp,
            ch,
            next_ids=batch["input_ids"][:, 1:][paired],
            t_logp=_own_logp(flat, t_ids, rows_t),
            t_next=t_ids.index_select(0, rows_t + 1),
            contexts=contexts,
            table=student_of(cross.maps, cross.vocab).to(flat.device),
        )
    tails = sp.tails if sp.tails is not None else sp.log_rest.new_zeros(len(at), 0)
    yield from _row_blobs(paired, sp.ids, sp.logp, sp.log_rest, tails, what, ranks_of)


def _own_logp(flat: torch.Tensor, t_ids: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The teacher's log-probs of its own next tokens at the flat `rows` of its logits `flat` [positions, V]."""
    lp = torch.log_softmax(flat.index_select(0, rows.to(flat.device)).float(), dim=-1)
    return lp.gather(1, t_ids.index_select(0, rows + 1).to(lp.device)[:, None]).squeeze(1)


def _row_blobs(paired, ids, logp, log_rest, tails, what: dict[str, Any], ranks_of: torch.Tensor):
    """(blob, positions) per row of the batch, from its pairs' rows in KD order (row-major)."""
    ids, logp, log_rest, tails = (x.cpu() for x in (ids, logp, log_rest, tails))
    first = 0
    for b in range(paired.size(0)):
        n = int(paired[b].sum())
        sl = slice(first, first + n)
        first += n
        blob = encode(
            ranks_of[ids[sl]].numpy(), logp[sl].float().numpy(), log_rest[sl].float().numpy(), level_bits=what["level_bits"]
        )
        yield tails[sl].numpy().astype(np.float16).tobytes() + blob, n


def _chunk_rows(batch, logits, paired, what: dict[str, Any], ranks_of: torch.Tensor, ignore: int):
    """`chunk_likelihood`'s rows: at each pair one slot, the student's next token there, whose log-prob is the
    teacher's log-likelihood of the chunk that starts there (fixed point over [-16, 0] in the codec: a chunk
    less likely than e^-16 is stored as that, which moves its binary KL by under 1e-6 nats)."""
    from dsdistill.crosstok import chunks_of
    from dsdistill.losses.chunk_likelihood import teacher_chunk_rows

    ch = chunks_of(batch["labels"].numpy(), batch["x_pos"].numpy(), batch["t_labels"].numpy(), ignore)
    flat = logits.reshape(-1, logits.size(-1))
    logp = _own_logp(flat, batch["t_input_ids"].reshape(-1), torch.from_numpy(ch.t_rows))
    ids = batch["input_ids"][:, 1:][paired]
    rows = teacher_chunk_rows(ids.to(logp.device), logp, torch.from_numpy(ch.t_chunk).to(logp.device), ch.count)
    tails = torch.zeros(ch.count, len(what["tail_temperatures"]))
    yield from _row_blobs(paired, rows.ids, rows.logp.clamp(min=-16.0), rows.log_rest, tails, what, ranks_of)


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
        write_atomic_or_fail(out / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    return manifest


def write_teacher_cache(
    cfg: RunConfig, out: Path, *, top_k: int, level_bits: Optional[int] = None, shard_rows: int = 64
) -> dict[str, Any]:
    """`--teacher-cache`: the teacher's engine alone, over the run's packed rows, into an offline cache."""
    from dsdistill.dist import agree, init_distributed
    from dsdistill.engines import build_teacher_engine
    from dsdistill.models import load_causal_lm
    from dsdistill.preflight import preflight
    from dsdistill.teachers.live import TeacherModel

    rank, world = init_distributed()

    def say(text: str) -> None:
        if rank == 0:
            print(text, flush=True)

    plan, data = agree(lambda: preflight(cfg, world=world, rank=rank, writing_cache=True), what="preflight")
    teacher_lm = agree(
        lambda: load_causal_lm(
            cfg.one_teacher("teacher-cache"), field="teacher", precision=plan.precision, zero3_ds_config=plan.ds_teacher
        ),
        what="loading the teacher",
    )
    engine = build_teacher_engine(TeacherModel(teacher_lm), plan.ds_teacher)
    manifest = write(
        (plan, data, engine, data.tokenizer),
        out,
        top_k=top_k,
        level_bits=level_bits,
        shard_rows=shard_rows,
        say=say,
    )
    f = manifest["fidelity"]
    fidelity = (
        "the teacher's rows at the paired positions, over the student's vocabulary"
        if "cross_tokenizer" in manifest
        else f"KL to the teacher: exact top-k {f['kl_top_k_exact']:.3g}, cache {f['kl_cache']:.3g} "
        f"({f['quantisation_overhead']:+.1%})"
    )
    say(
        f"teacher-cache: {manifest['tokens']:,} positions, top-{manifest['k']}, {manifest['bytes_per_token']:.1f} bytes "
        f"per token (plain: {manifest['plain_bytes_per_token']}); {fidelity}; written to {out}",
    )
    return manifest
