"""A teacher served by vLLM's OpenAI-compatible server (`vllm serve MODEL --max-logprobs K`): the same
sparse teacher as dsdistill's own server, read from the completions endpoint's `prompt_logprobs`.

For each prompt (a packed row's token ids) vLLM answers one entry per prompt token: None for the first,
then a mapping token id -> {logprob, rank, decoded_token} holding the K most likely tokens at that place
and the prompt's own token (with its rank, which may lie beyond K). The row's position p predicts token
p + 1, so its distribution is entry p + 1: the ranks 1..K are the top-k, the rest's mass at T = 1 is what
they leave, and the prompt token's log-prob is the label's. vLLM gives log-probs at T = 1 only, so a run
whose curriculum uses another temperature is refused by `check` (use `dsdistill teacher-serve`, which
sends the rest's statistic at every temperature). The tokenizer is checked through vLLM's `/tokenize`: a
probe text must come back as the student's tokenizer reads it.
"""

from __future__ import annotations

import math
from typing import Any

from dsdistill.errors import ConfigError
from dsdistill.teachers import wire
from dsdistill.teachers.base import Capabilities, RunContext
from dsdistill.teachers.server import ServerOptions, ServerTeacher, ask_at_open, request_json

PROBE = "The teacher's tokenizer, probed: 12 apples, 3.5 km; naïve café — ok?\n"
"""Text whose token ids must agree between the run's tokenizer and vLLM's."""


class VllmTeacher(ServerTeacher):
    def _fetch(self, sequences: list[list[int]], positions: list[list[int]], labels: bool) -> wire.Scored:
        body = {
            "model": self.model,
            "prompt": sequences,
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.options.top_k,
        }
        reply = self._retrying(lambda: request_json(f"{self.url}/v1/completions", body, self.options.timeout_s))
        if reply.get("model") != self.model:
            raise ConfigError(
                f"teacher.url: {self.url} answered for model {reply.get('model')!r}; this run distils {self.model!r}"
            )
        by_index = {c.get("index"): c for c in reply.get("choices") or []}
        results = [
            _parse(by_index.get(i), seq, pos, self.options.top_k, self.url)
            for i, (seq, pos) in enumerate(zip(sequences, positions))
        ]
        return wire.Scored.from_results(results, self.options.top_k, len(self.temperatures))


def _parse(choice: Any, seq: list[int], positions: list[int], k: int, url: str) -> dict[str, Any]:
    """One prompt's top-k, rest and label log-probs at `positions`, from its `prompt_logprobs`."""
    entries = (choice or {}).get("prompt_logprobs")
    if not isinstance(entries, list) or len(entries) != len(seq):
        raise ConfigError(f"teacher.url: {url} sent no prompt_logprobs for every prompt token; expected vLLM's completions reply")
    ids, logp, rest, label = [], [], [], []
    for p in positions:
        entry = entries[p + 1]
        try:
            ranked = sorted((int(v["rank"]), int(t), float(v["logprob"])) for t, v in entry.items())
            top = [(t, lp) for r, t, lp in ranked if r <= k]
            own = float(entry[str(seq[p + 1])]["logprob"])
        except (AttributeError, KeyError, TypeError, ValueError):
            raise ConfigError(
                f"teacher.url: {url} sent a prompt_logprobs entry this client cannot read at position {p + 1}"
            ) from None
        if len(top) != k:
            raise ConfigError(
                f"teacher.url: {url} sent {len(top)} log-probs at a position, not {k}; start vLLM with --max-logprobs {k} or more"
            )
        ids.append([t for t, _ in top])
        logp.append([lp for _, lp in top])
        kept = sum(math.exp(lp) for _, lp in top)
        rest.append(math.log(max(1.0 - kept, 1e-30)))  # the mass the top-k leave, at T = 1
        label.append(own)
    return {"ids": ids, "logp": logp, "log_rest": rest, "tails": [[] for _ in positions], "label_logp": label}


def vllm_capabilities(options: ServerOptions) -> Capabilities:
    return Capabilities(distribution="sparse", top_k=options.top_k, scores_new_text=True, remote=True, temperatures=(1.0,))


class VllmPlan:
    """`teacher: {url: ..., options: {api: vllm}}`: a vLLM server, asked for its model and tokenizer first."""

    field = "teacher.url"
    noun = "a vLLM server"
    Options = ServerOptions

    def __init__(self, cfg: Any, options: ServerOptions, student_tokenizer: Any):
        from dsdistill.models import load_config

        self.source, self.options = cfg.teacher.url.rstrip("/"), options
        models = ask_at_open(self.source, "/v1/models", options, hint="start vllm serve there")
        served = [m.get("id") for m in models.get("data") or [] if isinstance(m, dict)]
        self.model = options.model or (served[0] if served else None)
        if self.model not in served:
            raise ConfigError(
                f"teacher.url: {self.source} serves {', '.join(map(str, served)) or 'no model'}, not {self.model!r}"
            )
        body = {"model": self.model, "prompt": PROBE, "add_special_tokens": False}
        theirs = request_json(f"{self.source}/tokenize", body, min(options.timeout_s, 30.0)).get("tokens")
        ours = student_tokenizer(PROBE, add_special_tokens=False)["input_ids"]
        if theirs != ours:
            raise ConfigError(
                f"teacher.url: {self.source}'s tokenizer reads a probe text as other ids than this run's ({len(theirs or [])} vs {len(ours)} tokens)"
            )
        # vLLM does not send the model's config: the plan's shapes are the student's (a sparse teacher's
        # internals are never read), with the server's context length
        self.model_config = load_config(cfg.student, field="student")
        max_len = next((m.get("max_model_len") for m in models["data"] if m.get("id") == self.model), None)
        if isinstance(max_len, int):
            self.model_config.max_position_embeddings = max_len
        self.tokenizer = student_tokenizer

    def capabilities(self) -> Capabilities:
        return vllm_capabilities(self.options)

    def verify(self, ctx: RunContext) -> None:
        from dsdistill.teachers.cache_format import run_temperatures

        other = [t for t in run_temperatures(ctx.cfg, ctx.total_steps) if t != 1.0]
        if other and "kd" in ctx.components:
            raise ConfigError(
                f"curriculum.temperature: this run uses T = {other[0]:g}, but a vLLM server sends log-probs at T = 1 only; "
                "use dsdistill teacher-serve (it sends the rest's statistic at every temperature)"
            )

    def describe(self) -> str:
        return f"vLLM server {self.source} (model {self.model}, top-{self.options.top_k} + rest per position, T = 1)"

    def plan_json(self) -> dict[str, Any]:
        return {"url": self.source, "api": "vllm", "model": self.model, "k": self.options.top_k}

    def kd_semantics(self) -> dict[str, Any]:
        return {"top_k_support": "teacher"}

    def build(self, plan: Any, *, needs) -> VllmTeacher:
        teacher = VllmTeacher(
            self.source, self.options, tokenizer="", vocab=plan.vocab, temperatures=(), ignore_index=plan.cfg.loss.ignore_index
        )
        teacher.model = self.model
        return teacher
