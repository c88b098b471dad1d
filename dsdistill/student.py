"""The module the student engine trains: the HF causal LM plus what distillation adds to it.

`.model` is the causal LM (what export writes); `.aux` holds the modules the active components own
(projections, contrastive heads, the router), trained, sharded and checkpointed with the student but
never exported; `.head` is the fused KD+LM head on the fused path. Under ZeRO-3 every parameter is
gathered only inside its module's forward, so all of them are applied in `DistillStudent.forward`; the
loss functions stay pure functions of the returned tensors.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from dsdistill.components.base import Build, Component, StudentSide
from dsdistill.heads import FusedCall, FusedKDLMHead
from dsdistill.layers import LayerMap


class DistillStudent(nn.Module):
    def __init__(
        self,
        model: Any,
        *,
        components: dict[str, Component],
        build: Build,
        vocab: int,
        seed: int = 0,
        fused: bool = False,
        touch_unused: bool = True,
    ):
        """`touch_unused`: give the modules of components a step skips a zero gradient (ZeRO-3 and no ZeRO;
        ZeRO-1/2 zero-fill a missing gradient themselves, so there the modules are skipped too)."""
        super().__init__()
        self.touch_unused = touch_unused
        self.teacher_width = build.teacher_width
        self.model = model
        self.components = components
        self.layers: LayerMap = build.layers
        self.vocab = vocab
        self.aux = nn.ModuleDict()
        # the same initial aux weights on every rank, whatever the global RNG did before
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed + 1)
        for component in components.values():
            for key, make in component.aux_modules(build).items():
                if key not in self.aux:  # a module two components share (the router) is built once
                    self.aux[key] = make()
        torch.random.set_rng_state(gen_state)
        self.head = (
            FusedKDLMHead(model.get_output_embeddings(), vocab=vocab, ignore_index=build.loss.ignore_index) if fused else None
        )
        self.needs_hidden = any(c.needs(self.layers).student_hidden for c in components.values())

    @property
    def config(self):
        return self.model.config

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        valid: torch.Tensor,
        teacher_pooled: Optional[torch.Tensor] = None,
        fused: Optional[FusedCall] = None,
        position_ids: Optional[torch.Tensor] = None,
        live: Optional[frozenset[str]] = None,
    ) -> dict[str, Any]:
        """{"logits" | "fused", "hidden", "side"} for one micro-batch (a dict, so ZeRO-3's hooks see every
        tensor in it).

        valid: [B, S] loss-bearing positions (for pooling); teacher_pooled: the teacher's pooled final
        hidden state (for the contrastive teacher head); fused: the fused head's inputs (fused path; without
        them the model's own logits are returned, as for a plain forward); position_ids: restarting per
        packed example (None: the model's own positions); live: the components computed this step (None:
        all). With `touch_unused` the others' modules still run, and their outputs enter `touch` at weight 0,
        so their parameters get a zero gradient rather than none: ZeRO-3 applies a parameter's previous
        gradient again when it gets none (a component whose weight fell to 0 kept moving), and a plain
        optimizer would freeze it, while ZeRO-1/2 zero-fill it."""
        # no KV cache (nothing is generated here); without one, restarting positions also separate packed examples
        pos: dict[str, Any] = {"use_cache": False, **({} if position_ids is None else {"position_ids": position_ids})}
        out: dict[str, Any] = {"logits": None, "fused": None, "hidden": None, "side": {}, "touch": None}
        unused: list[torch.Tensor] = []
        if self.head is not None and fused is not None:
            # the decoder alone, then the fused head on its output: no [tokens, vocab] logits
            dec = self.model.base_model(input_ids=input_ids, output_hidden_states=self.needs_hidden, **pos)
            out["fused"] = self.head(dec.last_hidden_state, fused)
            hidden = dec.hidden_states
        else:
            lm = self.model(input_ids=input_ids, output_hidden_states=self.needs_hidden, **pos)
            logits = lm.logits
            out["logits"] = logits[..., : self.vocab] if logits.size(-1) != self.vocab else logits
            hidden = lm.hidden_states
            if (
                self.touch_unused
                and live is not None
                and not any(self.components[n].reads_logits for n in live if n in self.components)
            ):
                unused.append(out["logits"])
        if self.needs_hidden:
            out["hidden"] = hidden
            side = StudentSide(hidden=hidden, valid=valid, teacher_pooled=teacher_pooled, layers=self.layers)
            one: Optional[StudentSide] = None
            for name, component in self.components.items():
                if live is None or name in live:
                    out["side"].update(component.student_side(self.aux, side))
                elif self.touch_unused:
                    # a skipped component's modules run on one position only: enough for a zero gradient
                    one = one or StudentSide(
                        hidden=tuple(h[:1, :1] for h in hidden),
                        valid=torch.ones_like(valid[:1, :1]),
                        # a step that skips every reader of the teacher's pooled state did not compute it
                        teacher_pooled=(
                            teacher_pooled[:1] if teacher_pooled is not None else hidden[-1].new_zeros((1, self.teacher_width))
                        ),
                        layers=self.layers,
                    )
                    unused.extend(_tensors(component.student_side(self.aux, one)))
        if unused:
            # nan_to_num: a non-finite unused output must not make the step's loss non-finite
            zero = torch.zeros((), device=input_ids.device)
            out["touch"] = sum((torch.nan_to_num(t.float().sum() * 0.0, nan=0.0, posinf=0.0, neginf=0.0) for t in unused), zero)
        return out


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside a component's `student_side` result (tensors, lists and dicts of them)."""
    if torch.is_tensor(value):
        return [value] if value.requires_grad else []
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []
