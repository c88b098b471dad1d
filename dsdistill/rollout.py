"""On-policy distillation: completions sampled from the current student, scored by the teacher in the same step.

At each optimizer step the curriculum gives `on_policy`, the fraction of the window's sequences (on each
rank, rounded) whose completions are replaced by the student's own samples; the rest keep the dataset's
completions. A sequence's prompt is everything before its last run of loss-bearing tokens (a chat
conversation up to its last assistant turn: every earlier turn and the generation prompt; a
prompt/completion pair's prompt; a conversation that ends with a user turn is all prompt). The sampled
tokens carry loss, the prompt does not; the teacher then scores the new sequence like any other, with every
divergence and the fused path.

`RolloutBackend` is the seam for an external generator (a vLLM server): it gets prompts and per-sequence
seeds and returns completions. `StudentSampler` is the built-in one: it samples inside the DeepSpeed job
with the student's weights of this step (under ZeRO-3 gathered once per generation phase, not per token),
batched, with a KV cache. Each sequence's randomness comes from (seed, step, its row number), so a
sample does not depend on which rank draws it or what else is in its batch's random stream.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from dsdistill.config import GenerationConfig


class RolloutBackend(Protocol):
    pad: int
    """The token that fills a sequence after its completion."""

    def generate(self, prompts: list[list[int]], *, seeds: list[int], max_new: list[int]) -> list[list[int]]:
        """One completion per prompt (token ids, EOS included when it ended there), at most max_new[i] tokens."""


@dataclass(frozen=True)
class RolloutStats:
    """One step's on-policy sequences on this rank (summed over ranks by the trainer)."""

    sequences: int
    tokens: int
    """Sampled tokens."""
    seconds: float
    """Wall time of generation."""
    ended: int = 0
    """Completions that ended on a stop token (the rest ran to their length limit)."""
    places: tuple[tuple[int, int], ...] = ()
    """(micro-batch, row) of each sequence whose completion was sampled."""


def _filter(logits: torch.Tensor, g: GenerationConfig) -> torch.Tensor:
    logits = logits / g.temperature
    if g.top_k is not None and g.top_k < logits.size(-1):
        kth = logits.topk(g.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if g.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > g.top_p  # tokens after the nucleus is already full
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


def draw(logits: torch.Tensor, uniforms: torch.Tensor, g: GenerationConfig) -> torch.Tensor:
    """One token per row from `logits` [n, V] after temperature, top-k and top-p, by inverse CDF at the
    row's own uniform draw [n] (on the logits' device: nothing of size V leaves it). A row's token depends
    on its draw alone, so a sample does not depend on the batch or rank it lands in."""
    probs = _filter(logits.float(), g).softmax(-1)
    cdf = probs.cumsum(-1)
    # the first token whose cumulative mass exceeds u x total: always one with mass (right=True skips the
    # zero-mass tokens a filter left)
    target = uniforms.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]
    return torch.searchsorted(cdf, target, right=True).squeeze(-1).clamp_max(logits.size(-1) - 1)


class StudentSampler:
    """Samples from the student engine's model (its weights of this step)."""

    def __init__(
        self, engine, generation: GenerationConfig, *, eos: Optional[int], pad: int, vocab: int, stops: tuple[int, ...] = ()
    ):
        self.engine = engine
        self.g = generation
        self.stops = frozenset(((eos,) if eos is not None else ()) + tuple(stops)) if generation.stop_on_eos else frozenset()
        """Token ids that end a completion (the EOS and `generation.stop_tokens`)."""
        self.pad = pad
        self.vocab = vocab

    @contextlib.contextmanager
    def _full_weights(self):
        """The whole student on this rank for the generation phase (ZeRO-3 gathers once, then releases)."""
        model = self.engine.module.model
        params = [p for p in model.parameters() if hasattr(p, "ds_id")]
        if params:
            import deepspeed

            with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
                yield model
        else:
            yield model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], *, seeds: list[int], max_new: list[int]) -> list[list[int]]:
        device = self.engine.device
        # every rank gathers together (a collective under ZeRO-3), also one with nothing to sample
        with self._full_weights() as model:
            if not prompts:
                return []
            was_training = model.training
            model.eval()
            try:
                return self._sample(model, prompts, seeds, max_new, device)
            finally:
                model.train(was_training)

    def _sample(self, model, prompts, seeds, max_new, device) -> list[list[int]]:
        n, longest = len(prompts), max(len(p) for p in prompts)
        # left padding: every prompt ends at the same column, so one step extends them all
        ids = torch.full((n, longest), self.pad, dtype=torch.long)
        mask = torch.zeros((n, longest), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, longest - len(p) :] = torch.tensor(p)
            mask[i, longest - len(p) :] = 1
        ids, mask = ids.to(device), mask.to(device)
        pos = (mask.cumsum(-1) - 1).clamp_min(0)
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        # the prefill keeps the logits of the last position only (not [n, prompt, V])
        keep = {"logits_to_keep": 1} if _accepts(model, "logits_to_keep") else {}
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **keep)
        past, logits = out.past_key_values, out.logits[:, -1, : self.vocab]
        done = torch.zeros(n, dtype=torch.bool)
        limit = torch.tensor(max_new)
        completions: list[list[int]] = [[] for _ in range(n)]
        last_pos = pos[:, -1]
        for _ in range(int(limit.max())):
            # one uniform per row from the row's own generator; the draw runs on the device, and only the n
            # chosen ids come back
            u = torch.cat([torch.rand(1, generator=gen) for gen in gens])
            nxt = draw(logits, u, self.g).cpu()
            nxt[done] = self.pad
            for i in range(n):
                if not done[i]:
                    completions[i].append(int(nxt[i]))
                    if int(nxt[i]) in self.stops or len(completions[i]) >= limit[i]:
                        done[i] = True
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype, device=device)], dim=1)
            last_pos = last_pos + 1
            out = model(
                input_ids=nxt[:, None].to(device),
                attention_mask=mask,
                position_ids=last_pos[:, None],
                past_key_values=past,
                use_cache=True,
            )
            past, logits = out.past_key_values, out.logits[:, -1, : self.vocab]
        return completions


def _accepts(model, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def row_seed(seed: int, step: int, row: int, sample: int) -> int:
    """The sampling seed of one sequence: a function of the run's seed, the step and the row alone."""
    return (seed * 1_000_003 + step * 7_919 + row * 104_729 + sample * 15_485_863) % (2**63 - 1)


def _prompt_end(labels: torch.Tensor, ignore: int, length: int) -> int:
    """Where the sampled completion starts: at the last run of loss-bearing tokens (a chat's last assistant
    turn, so the prompt is the whole history up to the last user turn with the generation prompt), or after
    the whole example when nothing carries loss (a conversation that ends with a user turn)."""
    carried = (labels[:length] != ignore).tolist()
    if not any(carried):
        return length
    end = length - carried[::-1].index(True)  # one past the last loss-bearing token
    start = end
    while start > 0 and carried[start - 1]:
        start -= 1
    return start


def _length(row: dict[str, torch.Tensor]) -> int:
    """Tokens of the row's example (one per row: padding restarts its positions at 0)."""
    pos = row.get("position_ids")
    if pos is None:
        return int(row["input_ids"].numel())
    restarts = torch.nonzero(pos[1:] == 0).flatten()
    return int(restarts[0]) + 1 if len(restarts) else int(pos.numel())


def apply_rollouts(
    window: list[dict[str, torch.Tensor]],
    *,
    fraction: float,
    backend: RolloutBackend,
    generation: GenerationConfig,
    step: int,
    seed: int,
    pad: int,
    ignore_index: int,
) -> tuple[list[dict[str, torch.Tensor]], RolloutStats]:
    """The window with its first round(fraction x sequences) sequences' completions sampled from the student."""
    rows = [(b, i) for b, mb in enumerate(window) for i in range(mb["input_ids"].size(0))]
    n_on = round(fraction * len(rows))
    if n_on == 0:
        return window, RolloutStats(0, 0, 0.0)
    per = generation.samples_per_prompt
    chosen = rows[:n_on]
    prompts, seeds, max_new, places = [], [], [], []
    for j, (b, i) in enumerate(chosen):
        # samples_per_prompt: consecutive on-policy sequences share the prompt of the first of them
        src_b, src_i = chosen[j - j % per]
        mb = window[src_b]
        row = {k: v[src_i] for k, v in mb.items() if torch.is_tensor(v) and v.dim() >= 1}
        length = _length(row)
        end = _prompt_end(row["labels"], ignore_index, length)
        seq_len = mb["input_ids"].size(1)
        room = seq_len - end
        if end == 0 or room < 1:
            continue  # no prompt, or no room for a completion: the row stays off-policy
        prompts.append(row["input_ids"][:end].tolist())
        number = int(mb["row"][src_i]) if "row" in mb else src_b * 100_000 + src_i
        seeds.append(row_seed(seed, step, number, j % per))
        max_new.append(min(generation.max_new_tokens, room))
        places.append((b, i))
    start = time.perf_counter()
    completions = backend.generate(prompts, seeds=seeds, max_new=max_new)
    seconds = time.perf_counter() - start
    stops: frozenset[int] = getattr(backend, "stops", frozenset())
    ended = sum(1 for c in completions if c and c[-1] in stops)
    out = [{k: v.clone() if torch.is_tensor(v) else v for k, v in mb.items()} for mb in window]
    tokens = 0
    for (b, i), prompt, completion in zip(places, prompts, completions):
        mb = out[b]
        seq_len = mb["input_ids"].size(1)
        ids = prompt + completion
        n = len(ids)
        mb["input_ids"][i] = torch.tensor(ids + [pad] * (seq_len - n))
        labels = [ignore_index] * len(prompt) + completion + [ignore_index] * (seq_len - n)
        mb["labels"][i] = torch.tensor(labels)
        if "position_ids" in mb:
            mb["position_ids"][i] = torch.tensor(list(range(n)) + list(range(seq_len - n)))
        tokens += len(completion)
    return out, RolloutStats(len(places), tokens, seconds, ended, tuple(places))
