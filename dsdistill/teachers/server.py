"""A teacher on its own machine: `dsdistill teacher-serve` runs the teacher model and answers, for each
sequence it is sent, the teacher's top-k log-probs at the asked positions with what the rest bucket needs
(its mass at T = 1 and its statistic at each asked temperature), and the label's own log-prob. `ServerPlan`
and `ServerTeacher` are the client (`teacher: {url: http://HOST:PORT}`): a sparse teacher, exact where the
offline cache is exact, that also scores text it has not seen (the student's rollouts).

The endpoints (JSON): `GET /dsdistill/v1/info` -> the model's and tokenizer's hashes, the vocabulary and
the teacher's config; `POST /dsdistill/v1/score` with {"sequences", "positions", "k", "temperatures",
"labels", "tokenizer"} -> {"results": [{"ids", "logp", "log_rest", "tails", "label_logp"}]}, or with
"reply": "binary" the same numbers as exact float32 arrays (wire.py; what the client asks for by default).
A request for another tokenizer is refused, as is one the server cannot answer, in one line (HTTP 400).
"""

from __future__ import annotations

import json
import math
import os
import queue
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, TypeVar

import numpy as np
import torch
from pydantic import Field

from dsdistill.components.base import ComponentOptions
from dsdistill.errors import ConfigError, DistillError, one_line
from dsdistill.losses.fused import SparseTeacher
from dsdistill.teachers import wire
from dsdistill.teachers.base import Capabilities, RunContext, TeacherInput, TeacherSignal, TeacherUnavailable
from dsdistill.teachers.cache_format import MAX_TEMPERATURES, config_hash, run_temperatures, tokenizer_hash

API = "/dsdistill/v1"
IDLE_S = 60.0
"""Seconds without a request after which a sharded server's other ranks are told it is still there."""
R = TypeVar("R")

if TYPE_CHECKING:
    from dsdistill.teachers.sharded import Ranks
MAX_REQUEST_BYTES = 64 << 20
"""A request larger than this is refused before it is read."""


# ---------------------------------------------------------------------------------------------- server


@dataclass
class _Job:
    """One request's sequences, waiting for the forward that scores them."""

    seqs: list[list[int]]
    positions: list[list[int]]
    k: int
    temps: list[float]
    labels: bool
    done: threading.Event = field(default_factory=threading.Event)
    parts: Optional[list[dict[str, torch.Tensor]]] = None
    error: Optional[BaseException] = None


class Scorer:
    """The teacher model and the scoring it answers with. One thread runs the forwards: requests that arrive
    while one runs (from other ranks or runs) are scored together in the next, up to `max_batch_tokens`
    padded tokens, so a busy server runs fewer, larger forwards."""

    def __init__(
        self,
        model_config: Any,
        tokenizer: Any,
        *,
        device: torch.device,
        forward: Callable[[torch.Tensor], torch.Tensor],
        max_batch_tokens: int = 65536,
        ranks: Optional["Ranks"] = None,
    ):
        """`forward`: token ids [B, S] on `device` -> logits; `ranks`: the other ranks of a sharded teacher,
        which run every forward with this one (told of each by `ranks.lead`, kept alive by `ranks.idle`)."""
        self.forward, self.ranks = forward, ranks
        self.device = device
        self.vocab = len(tokenizer)
        self.info = {
            "model": config_hash(model_config),
            "tokenizer": tokenizer_hash(tokenizer),
            "vocab": self.vocab,
            "config": model_config.to_dict(),
            "max_positions": getattr(model_config, "max_position_embeddings", None),
            "ranks": 1 if ranks is None else ranks.world,
        }
        self.max_batch_tokens = max_batch_tokens
        self.positions_scored = 0
        self.requests = 0
        self.forwards = 0
        self.most_merged = 0
        """The most requests one forward has scored."""
        self._broken: Optional[BaseException] = None
        """Why a sharded server can no longer run forwards (a rank went away), or None."""
        self._jobs: queue.Queue[Optional[_Job]] = queue.Queue()
        self._worker = threading.Thread(target=self._work, name="dsdistill-scorer", daemon=True)
        self._worker.start()

    def close(self) -> None:
        """Stop the forward thread (a sharded teacher's other ranks are told to stop too)."""
        self._jobs.put(None)
        self._worker.join()

    def stats(self) -> dict[str, int]:
        return {
            "positions_scored": self.positions_scored,
            "requests": self.requests,
            "forwards": self.forwards,
            "most_merged": self.most_merged,
        }

    def score(self, req: dict[str, Any]) -> tuple[bytes, str]:
        """The reply's body and content type: JSON, or the binary form when the request asks for it."""
        scored = self._scored(req)
        if req.get("reply") == "binary":
            return wire.encode(scored, model=self.info["model"], tokenizer=self.info["tokenizer"]), wire.CONTENT_TYPE
        if req.get("reply") == "codec":
            bits = req.get("level_bits", 8)
            if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 12:
                raise ValueError("level_bits: expected 2..12")
            data = wire.encode_codec(scored, model=self.info["model"], tokenizer=self.info["tokenizer"], level_bits=bits)
            return data, wire.CONTENT_TYPE
        results = []
        at = 0
        for n in scored.counts:
            one = {
                "ids": scored.ids[at : at + n].tolist(),
                "logp": scored.logp[at : at + n].tolist(),
                "log_rest": scored.log_rest[at : at + n].tolist(),
                "tails": scored.tails[at : at + n].tolist(),
            }
            if scored.label_logp is not None:
                one["label_logp"] = scored.label_logp[at : at + n].tolist()
            results.append(one)
            at += n
        body = {"model": self.info["model"], "tokenizer": self.info["tokenizer"], "results": results}
        return json.dumps(body).encode(), "application/json"

    def _scored(self, req: dict[str, Any]) -> wire.Scored:
        seqs, positions = _checked(req, self)
        temps = [float(t) for t in req.get("temperatures", [])]
        job = _Job(seqs, positions, int(req["k"]), temps, bool(req.get("labels")))
        self._jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        parts, labels = job.parts or [], job.labels
        cat = lambda key: torch.cat([p[key] for p in parts]).cpu().numpy()  # noqa: E731
        return wire.Scored(
            [len(p) for p in positions],
            cat("ids"),
            cat("logp"),
            cat("log_rest"),
            cat("tails"),
            cat("label_logp") if labels else None,
        )

    def _work(self) -> None:
        """The forward thread (the only one that runs the model, or talks to the other ranks): the oldest
        waiting request with every other one waiting, within the budget."""
        while True:
            try:
                first = self._jobs.get(timeout=IDLE_S)
            except queue.Empty:
                if self.ranks is not None and self._broken is None:
                    try:
                        self.ranks.idle()  # the other ranks wait in a collective: keep it from timing out
                    except Exception as e:  # noqa: BLE001 - another rank is gone: every request says so
                        self._broken = e
                continue
            if first is None:
                if self.ranks is not None:
                    self.ranks.stop()
                return
            jobs = [first]
            tokens = len(first.seqs) * max(len(s) for s in first.seqs)
            while True:
                try:
                    nxt = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:  # closing: this batch first
                    self._jobs.put(None)
                    break
                jobs.append(nxt)
                tokens += len(nxt.seqs) * max(len(s) for s in nxt.seqs)
                if tokens >= self.max_batch_tokens:
                    break
            try:
                if self._broken is not None:
                    raise RuntimeError(f"the teacher's other ranks are gone ({self._broken})")
                self._forward(jobs)
            except BaseException as e:  # noqa: BLE001 - each waiting request answers with it
                for job in jobs:
                    job.error = e
            finally:
                for job in jobs:
                    job.done.set()

    @torch.no_grad()
    def _forward(self, jobs: list[_Job]) -> None:
        seqs = [s for job in jobs for s in job.seqs]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):  # right-padded: a causal model's positions before the pad are unaffected
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        ids = ids.to(self.device)
        if self.ranks is not None:
            self.ranks.lead(ids)
        logits = self.forward(ids)
        row = 0
        for job in jobs:
            job.parts = [
                _positions(logits[row + i], s, p, job.k, job.temps, job.labels, self.vocab)
                for i, (s, p) in enumerate(zip(job.seqs, job.positions))
            ]
            row += len(job.seqs)
            self.positions_scored += sum(len(p) for p in job.positions)
        self.requests += len(jobs)
        self.forwards += 1
        self.most_merged = max(self.most_merged, len(jobs))


def _checked(req: Any, scorer: Scorer) -> tuple[list[list[int]], list[list[int]]]:
    """The request's sequences and positions, or a ValueError saying in one line what is wrong."""
    if not isinstance(req, dict):
        raise ValueError("expected a JSON object")
    if req.get("tokenizer") != scorer.info["tokenizer"]:
        raise ValueError(f"request for tokenizer {req.get('tokenizer')!r}; this server's is {scorer.info['tokenizer']}")
    seqs, positions, k = req.get("sequences"), req.get("positions"), req.get("k")
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k < scorer.vocab:
        raise ValueError(f"k: expected 1..{scorer.vocab - 1}")
    if not isinstance(seqs, list) or not isinstance(positions, list) or len(seqs) != len(positions) or not seqs:
        raise ValueError("sequences and positions: expected two lists of the same non-zero length")
    limit = scorer.info["max_positions"] or 1 << 20
    for s, p in zip(seqs, positions):
        if not isinstance(s, list) or not 0 < len(s) <= limit or not all(isinstance(t, int) and 0 <= t < scorer.vocab for t in s):
            raise ValueError(f"sequences: expected lists of 1..{limit} token ids in 0..{scorer.vocab - 1}")
        if not isinstance(p, list) or not all(isinstance(j, int) and 0 <= j < len(s) - 1 for j in p):
            raise ValueError("positions: expected indices of tokens that have a next token")
    temps = req.get("temperatures", [])
    if (
        not isinstance(temps, list)
        or len(temps) > MAX_TEMPERATURES
        or not all(isinstance(t, (int, float)) and math.isfinite(t) and t > 0 for t in temps)
    ):
        raise ValueError(f"temperatures: expected at most {MAX_TEMPERATURES} finite numbers above 0")
    return seqs, positions


def _positions(logits: torch.Tensor, seq: list[int], positions: list[int], k: int, temps, labels: bool, vocab: int):
    lp = torch.log_softmax(logits[positions, :vocab].float(), dim=-1)
    top, ids = lp.topk(k, dim=-1)
    tail = lp.scatter(-1, ids, float("-inf"))
    empty = lp.new_zeros(len(positions), 0)
    out = {
        "ids": ids,
        "logp": top,
        "log_rest": torch.logsumexp(tail, dim=-1),
        "tails": torch.stack([torch.logsumexp(tail / t, dim=-1) for t in temps], dim=-1) if temps else empty,
    }
    if labels:
        nxt = torch.tensor([seq[j + 1] for j in positions], dtype=torch.long, device=lp.device)
        out["label_logp"] = lp.gather(-1, nxt[:, None])[:, 0]
    return out


def make_server(scorer: Scorer, host: str, port: int) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # one line per request is noise at training rates
            pass

        def _reply(self, code: int, body: dict[str, Any] | bytes, content_type: str = "application/json") -> None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path == f"{API}/info":
                self._reply(200, {**scorer.info, **scorer.stats()})
            else:
                self._reply(404, {"error": f"no such endpoint {self.path!r}; expected {API}/info or {API}/score"})

        def do_POST(self) -> None:
            if self.path != f"{API}/score":
                self._reply(404, {"error": f"no such endpoint {self.path!r}; expected {API}/score"})
                return
            n = int(self.headers.get("Content-Length") or 0)
            if not 0 < n <= MAX_REQUEST_BYTES:
                self._reply(400, {"error": f"request body: expected 1..{MAX_REQUEST_BYTES} bytes"})
                return
            try:
                self._reply(200, *scorer.score(json.loads(self.rfile.read(n))))
            except ValueError as e:  # the request's fault (JSON included): said in one line
                self._reply(400, {"error": str(e).splitlines()[0][:300]})
            except Exception as e:  # noqa: BLE001 - the server's own failure: one line each side, the client retries
                why = one_line(f"{type(e).__name__}: {e}")[:300]
                print(f"teacher-serve: error: {why}", file=sys.stderr, flush=True)
                self._reply(500, {"error": why})

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    return server


def serve(
    cfg: Any,
    *,
    host: str,
    port: int,
    model_dir: Optional[str] = None,
    precision: Optional[str] = None,
    max_batch_tokens: int = 65536,
    ready: Optional[threading.Event] = None,
) -> None:
    """`dsdistill teacher-serve`: load the teacher (`model_dir`, else `cfg.teacher.path`) on this machine's device
    and answer until stopped. The precision: `precision`, else the config's `train.precision`, else bf16 on a
    GPU that has it and fp32 elsewhere."""
    from dsdistill.config import TeacherSpec
    from dsdistill.ds_config import precision_of
    from dsdistill.models import load_causal_lm, load_tokenizer

    if (
        model_dir is not None
        and not Path(model_dir).is_dir()
        and (model_dir.startswith((".", "/", "~")) or Path(model_dir).exists())
    ):
        raise ConfigError(
            f"teacher-serve --model: '{model_dir}' is not a directory; expected one written by save_pretrained, or a Hub name"
        )
    spec = TeacherSpec(path=model_dir) if model_dir is not None else cfg.one_teacher("teacher-serve")
    if spec.path is None:
        raise ConfigError("teacher-serve: the config's teacher has no path; give the model in teacher.path or --model DIR")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if precision in (None, "auto"):
        auto = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
        precision = precision_of(cfg) if cfg is not None and precision is None else auto
    field = "teacher-serve --model" if model_dir is not None else "teacher"
    tokenizer = load_tokenizer(spec, field=field)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by a launcher: the model sharded by ZeRO-3 over its ranks
        from dsdistill.teachers.sharded import Ranks, load_sharded

        forward, model_config, device = load_sharded(spec, field=field, precision=precision)
        ranks = Ranks(device)
        if ranks.rank != 0:
            ranks.follow(forward)  # every forward rank 0 leads, until it stops
            return
        scorer = Scorer(model_config, tokenizer, device=device, forward=forward, max_batch_tokens=max_batch_tokens, ranks=ranks)
    else:
        model = load_causal_lm(spec, field=field, precision=precision, zero3_ds_config=None).to(device).eval()
        scorer = Scorer(
            model.config,
            tokenizer,
            device=device,
            forward=lambda ids: model(input_ids=ids, use_cache=False).logits,
            max_batch_tokens=max_batch_tokens,
        )
    try:
        server = make_server(scorer, host, port)
    except OSError as e:
        scorer.close()
        raise ConfigError(f"teacher-serve: cannot listen on {host}:{port} ({e.strerror or e})") from None
    shards = f", sharded over {scorer.info['ranks']} ranks" if scorer.ranks is not None else ""
    print(
        f"teacher-serve: {spec.path} on http://{host}:{server.server_address[1]} (model {scorer.info['model']}{shards})",
        flush=True,
    )
    if ready is not None:
        ready.set()
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        scorer.close()


# ---------------------------------------------------------------------------------------------- client


class ServerOptions(ComponentOptions):
    """`teacher.options` of a teacher server."""

    api: Literal["dsdistill", "vllm"] = "dsdistill"
    """What the server speaks: `dsdistill teacher-serve`'s API, or vLLM's OpenAI-compatible one."""
    model: Optional[str] = None
    """vLLM: the served model's name (default: the first of its `/v1/models`)."""
    top_k: int = Field(64, ge=1)
    """Tokens per position the server sends (with a bucket for the rest of the vocabulary)."""
    reply: Literal["binary", "codec", "json"] = "binary"
    """dsdistill's server: its replies as exact float32 arrays (about a third of the JSON's bytes, and no text to
    parse), in the offline cache's codec (about a byte per kept token, log-probs quantised to `level_bits`:
    for links where bytes count; exact where the cache is), or as JSON (readable, e.g. with curl)."""
    level_bits: int = Field(8, ge=2, le=12)
    """With `reply: codec`: bits per kept probability (the cache's `--level-bits`)."""
    timeout_s: float = Field(120.0, gt=0)
    """Seconds one request may take before it is retried."""
    retries: int = Field(5, ge=0, le=100)
    """Retries of a failed request (with doubling waits from 1 s) before the run saves and stops."""


UNREACHABLE = (urllib.error.URLError, OSError, ValueError)
"""What a server that is down, resets the connection, times out or cuts a reply short raises."""


def request_json(url: str, body: Optional[dict[str, Any]], timeout: float) -> dict[str, Any]:
    """GET (no body) or POST JSON; an HTTP error status is a one-line ConfigError with the server's reason."""
    return json.loads(_request(url, body, timeout))


def ask_at_open(source: str, path: str, options: "ServerOptions", *, hint: str) -> dict[str, Any]:
    """A server's answer to a GET when a run opens it; one that cannot be reached is a one-line error."""
    try:
        return request_json(f"{source}{path}", None, min(options.timeout_s, 30.0))
    except UNREACHABLE as e:
        raise ConfigError(f"teacher.url: cannot reach {source} ({getattr(e, 'reason', e)}); {hint}") from None


def _request_binary(url: str, body: dict[str, Any], timeout: float) -> tuple[dict[str, Any], wire.Scored]:
    """POST a score request for a binary reply; (its header, its arrays)."""
    return wire.decode_any(_request(url, body, timeout))


def _request(url: str, body: Optional[dict[str, Any]], timeout: float) -> bytes:
    """The reply's body to a GET (no body) or a JSON POST; an HTTP error status is a one-line ConfigError."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        url, data=data, headers={"Content-Type": "application/json"}, method="GET" if data is None else "POST"
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        try:
            why = json.loads(e.read()).get("error", "")
        except ValueError:
            why = ""
        if isinstance(why, dict):  # OpenAI-style {"error": {"message": ...}}
            why = why.get("message", "")
        said = f"answered {e.code}: {str(why or e.reason).splitlines()[0][:300]}"
        if e.code >= 500:  # the server's own trouble: retried, then the run saves and stops
            raise urllib.error.URLError(said) from None
        raise ConfigError(f"teacher.url: {url} {said}") from None


def _window_key(window: list[TeacherInput]) -> int:
    """Which window this is (its token ids and loss-bearing positions), to match a prefetch to its window."""
    return hash(tuple((b.input_ids.cpu().numpy().tobytes(), b.valid.cpu().numpy().tobytes()) for b in window))


class ServerTeacher:
    def __init__(self, url: str, options: ServerOptions, *, tokenizer: str, vocab: int, temperatures, ignore_index: int):
        self.url, self.options = url.rstrip("/"), options
        self.tokenizer, self.vocab, self.temperatures = tokenizer, vocab, tuple(temperatures)
        self.ignore_index = ignore_index
        self.model: Optional[str] = None
        """The model hash of the first reply: a server that comes back with another model is refused."""
        self._ready: deque[TeacherSignal] = deque()
        self._ahead: Optional[tuple[int, threading.Thread, dict[str, Any]]] = None
        """A window's signals being fetched ahead: (its key, the thread, {"signals" | "error"})."""

    def capabilities(self) -> Capabilities:
        return server_capabilities(self.options)

    def prefetch(self, window: list[TeacherInput], needs) -> None:
        """Ask for `window`'s signals now, on a thread, while the step before it computes; `prepare` takes them
        when it is given the same window (else they are dropped)."""
        self._drop_ahead()
        if not needs.teacher_logits:
            return
        box: dict[str, Any] = {}

        def fetch() -> None:
            try:
                box["signals"] = [self._asked(batch) for batch in window]
            except (TeacherUnavailable, DistillError) as e:
                box["error"] = e

        thread = threading.Thread(target=fetch, name="dsdistill-teacher-prefetch", daemon=True)
        thread.start()
        self._ahead = (_window_key(window), thread, box)

    def _drop_ahead(self) -> None:
        if self._ahead is not None:
            self._ahead[1].join()  # a request in flight is let finish (its connection closes cleanly)
            self._ahead = None

    def prepare(self, window: list[TeacherInput], needs) -> Optional[str]:
        """The whole window's signals before its first micro-batch runs (fetched ahead by `prefetch`, or asked
        for now); every rank then agrees whether to go on."""
        self._ready.clear()
        ahead, self._ahead = self._ahead, None
        if ahead is not None and needs.teacher_logits and ahead[0] == _window_key(window):
            ahead[1].join()
            error = ahead[2].get("error")
            if isinstance(error, TeacherUnavailable):
                return str(error)
            if error is not None:
                raise error
            self._ready.extend(ahead[2]["signals"])
            return None
        if ahead is not None:
            ahead[1].join()
        if not needs.teacher_logits:
            return None
        try:
            self._ready.extend(self._asked(batch) for batch in window)
        except TeacherUnavailable as e:
            self._ready.clear()
            return str(e)
        return None

    def begin_step(self, needs) -> None:
        pass

    def end_step(self) -> None:
        self._ready.clear()

    def _score(self, batch: TeacherInput, valid: torch.Tensor, *, labels: bool) -> wire.Scored:
        """The valid positions' scores, in the batch's flat order. Each packed example goes as a sequence of its
        own (split where its positions restart), so the server's teacher reads it as the live one does: alone."""
        ids = batch.input_ids.cpu()
        pos = batch.position_ids.cpu() if batch.position_ids is not None else None
        sequences, positions = [], []
        for b in range(ids.size(0)):
            if not bool(valid[b].any()):
                continue
            starts = [0] if pos is None else (pos[b] == 0).nonzero().flatten().tolist() or [0]
            for lo, hi in zip(starts, starts[1:] + [ids.size(1)]):
                at = valid[b, lo:hi].nonzero().flatten()
                if len(at):
                    sequences.append(ids[b, lo:hi].tolist())
                    positions.append(at.tolist())
        if not sequences:
            return wire.Scored.from_results([], self.options.top_k, len(self.temperatures))
        return self._fetch(sequences, positions, labels)

    def _fetch(self, sequences: list[list[int]], positions: list[list[int]], labels: bool) -> wire.Scored:
        """The sequences' top-k, rest and (with `labels`) label log-probs at their positions."""
        body = {
            "sequences": sequences,
            "positions": positions,
            "k": self.options.top_k,
            "temperatures": list(self.temperatures),
            "labels": labels,
            "tokenizer": self.tokenizer,
            "reply": self.options.reply,
            "level_bits": self.options.level_bits,
        }
        if self.options.reply in ("binary", "codec"):
            header, scored = self._retrying(lambda: _request_binary(f"{self.url}{API}/score", body, self.options.timeout_s))
            self._same_teacher(header)
            return scored
        reply = self._retrying(lambda: request_json(f"{self.url}{API}/score", body, self.options.timeout_s))
        self._same_teacher(reply)
        return wire.Scored.from_results(reply["results"], self.options.top_k, len(self.temperatures))

    def _retrying(self, call: Callable[[], R]) -> R:
        last = ""
        for attempt in range(self.options.retries + 1):
            try:
                return call()
            except UNREACHABLE as e:
                last = str(getattr(e, "reason", e))
                if attempt < self.options.retries:
                    time.sleep(min(60.0, 2.0**attempt))
        raise TeacherUnavailable(
            f"teacher.url: {self.url} stopped answering ({last}; {self.options.retries + 1} tries); "
            "the run saved a checkpoint and stopped; relaunch to resume once the server is back"
        )

    def _same_teacher(self, reply: dict[str, Any]) -> None:
        self.model = self.model or reply.get("model")
        if reply.get("model") != self.model or reply.get("tokenizer") != self.tokenizer:
            raise ConfigError(
                f"teacher.url: {self.url} now serves model {reply.get('model')} (tokenizer {reply.get('tokenizer')}); "
                f"this run distils {self.model} (tokenizer {self.tokenizer})"
            )

    def signal(self, batch: TeacherInput, needs) -> TeacherSignal:
        if not needs.teacher_logits:
            return TeacherSignal()
        if self._ready:  # asked for by `prepare`, in window order
            return self._ready.popleft()
        return self._asked(batch)

    def _asked(self, batch: TeacherInput) -> TeacherSignal:
        """One micro-batch's signal, asked of the server now."""
        scored = self._score(batch, batch.valid.cpu(), labels=False)
        dev = batch.input_ids.device
        on = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev)  # noqa: E731
        return TeacherSignal(
            SparseTeacher(on(scored.ids), on(scored.logp), on(scored.log_rest), on(scored.tails), self.temperatures)
        )

    def lm_sums(self, batch: TeacherInput, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
        from dsdistill.objective import shifted_valid

        scored = self._score(batch, shifted_valid(labels, self.ignore_index).cpu(), labels=True)
        logps = scored.label_logp if scored.label_logp is not None else np.zeros(0, np.float32)
        return -torch.from_numpy(logps.astype(np.float64)).sum(), int(logps.size)

    def params(self) -> int:
        return 0  # on the server, not in this job

    def where(self) -> str:
        return f"server {self.url}"

    def exact_share(self) -> Optional[float]:
        return None  # the server sends the label's own log-prob

    def separation_forward(self) -> None:
        return None


def server_capabilities(options: ServerOptions) -> Capabilities:
    return Capabilities(distribution="sparse", top_k=options.top_k, scores_new_text=True, remote=True)


class ServerPlan:
    """`teacher.url`: a teacher server, asked for its model, tokenizer and shapes before anything loads."""

    field = "teacher.url"
    noun = "a teacher server"
    Options = ServerOptions

    def __init__(self, url: str, options: ServerOptions, student_tokenizer: Any):
        from transformers import AutoConfig

        self.source, self.options = url.rstrip("/"), options
        info = ask_at_open(self.source, f"{API}/info", options, hint="start it with dsdistill teacher-serve")
        ours = tokenizer_hash(student_tokenizer)
        if info.get("tokenizer") != ours:
            raise ConfigError(f"teacher.url: {self.source} serves tokenizer {info.get('tokenizer')}; this run's is {ours}")
        if not isinstance(info.get("vocab"), int) or info["vocab"] <= options.top_k:
            raise ConfigError(f"teacher.url: {self.source} has a vocabulary of {info.get('vocab')}; top_k must be below it")
        config = dict(info.get("config") or {})
        kind = config.pop("model_type", None)
        try:
            self.model_config = AutoConfig.for_model(kind, **config)
        except (ValueError, KeyError, TypeError) as e:
            raise ConfigError(f"teacher.url: {self.source} reports a model config transformers cannot read ({e})") from None
        self.tokenizer = student_tokenizer
        self.info = info

    def capabilities(self) -> Capabilities:
        return server_capabilities(self.options)

    def verify(self, ctx: RunContext) -> None:
        self.temperatures = [t for t in run_temperatures(ctx.cfg, ctx.total_steps) if t != 1.0]

    def describe(self) -> str:
        return f"server {self.source} (model {self.info['model']}, top-{self.options.top_k} + rest per position)"

    def plan_json(self) -> dict[str, Any]:
        return {"url": self.source, "model": self.info["model"], "k": self.options.top_k}

    def kd_semantics(self) -> dict[str, Any]:
        return {"top_k_support": "teacher"}

    def build(self, plan: Any, *, needs) -> ServerTeacher:
        teacher = ServerTeacher(
            self.source,
            self.options,
            tokenizer=self.info["tokenizer"],
            vocab=plan.vocab,
            temperatures=getattr(self, "temperatures", ()),
            ignore_index=plan.cfg.loss.ignore_index,
        )
        teacher.model = self.info["model"]
        return teacher
