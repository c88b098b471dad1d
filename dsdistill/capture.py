"""Capturing post-RoPE queries and keys of chosen layers while the model runs its normal attention kernel.

transformers routes every modern architecture's attention (Llama, Qwen2/3, Mistral, Gemma, Phi, GPT-2,
OPT, GPT-NeoX, ...) through its attention-function registry, calling `fn(module, query, key, value, mask,
scaling=..., ...)` with queries and keys already rotated and normed, shaped [B, H, S, d]. `QKCapture`
wraps the registered functions once (the wrapper is a pass-through for every module nobody captures) and
keeps (q, k) of the attention modules of the chosen layers, found by their `layer_idx`; nothing depends
on module names or on how an architecture applies its positions.

Each captured query is rescaled so that `q k^T / sqrt(d)` (what the attention losses compute) equals the
model's own `q k^T * scaling` (OPT folds the scale into its projection, Gemma uses its own scalar).
`unsupported_reason` tells, from a model built on the meta device, whether capture can work before any
weight loads.
"""

from __future__ import annotations

import math
import weakref
from typing import Optional

import torch
from torch import nn

_OWNERS: "weakref.WeakKeyDictionary[nn.Module, tuple[QKCapture, int]]" = weakref.WeakKeyDictionary()
"""Attention module -> (capture, 1-based layer) for every module whose q/k someone keeps."""
_WRAPPED: set[str] = set()


def _wrap(fn):
    def capturing(module, query, key, value, attention_mask, *args, **kwargs):
        owner = _OWNERS.get(module)
        if owner is not None:
            capture, layer = owner
            scaling = kwargs.get("scaling")
            capture._keep(layer, query, key, scaling)
        return fn(module, query, key, value, attention_mask, *args, **kwargs)

    capturing.__wrapped_by_dsdistill__ = fn
    return capturing


def _install_wrappers() -> None:
    """Wrap every registered attention function once (idempotent; the wrapper changes nothing for modules
    that are not captured)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in list(ALL_ATTENTION_FUNCTIONS.valid_keys()):
        fn = ALL_ATTENTION_FUNCTIONS[name]
        if getattr(fn, "__wrapped_by_dsdistill__", None) is None:
            ALL_ATTENTION_FUNCTIONS[name] = _wrap(fn)
        _WRAPPED.add(name)


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """{0-based layer index: self-attention module} of a causal LM, found by the `layer_idx` attribute."""
    found: dict[int, nn.Module] = {}
    for _, mod in model.named_modules():
        idx = getattr(mod, "layer_idx", None)
        if isinstance(idx, int) and "attention" in type(mod).__name__.lower() and not getattr(mod, "is_cross_attention", False):
            found.setdefault(idx, mod)
    return found


def unsupported_reason(
    model: nn.Module, layers: list[int], attn_implementation: Optional[str], *, seq_len: Optional[int] = None
) -> Optional[str]:
    """Why q/k of `layers` (1-based) cannot be captured for `model` (built on any device), or why the
    attention rebuilt from them would not be the model's own (a sliding window shorter than the rows, logit
    soft-capping, attention sinks), or None."""
    name = type(model).__name__
    if attn_implementation == "eager":
        return "attn_implementation 'eager' bypasses transformers' attention registry; use sdpa"
    can = getattr(type(model), "_can_set_attn_implementation", None)
    if can is not None:
        try:
            if not can():
                return f"{name} computes attention in its own code, not through transformers' attention registry"
        except Exception:  # noqa: BLE001 - a heuristic; fall through to the module check
            pass
    mods = attention_modules(model)
    missing = [layer for layer in layers if layer - 1 not in mods]
    if missing:
        return f"{name} has no attention module with layer_idx for layer(s) {', '.join(map(str, missing))}"
    return _rebuild_differs(model, mods, layers, seq_len)


def _rebuild_differs(model: nn.Module, mods: dict, layers: list[int], seq_len: Optional[int]) -> Optional[str]:
    """Why softmax(q k^T * scale) with the causal mask is not what `layers` of this model attend with."""
    cfg = model.config
    cap = getattr(cfg, "attn_logit_softcapping", None)
    if cap:
        return f"{type(model).__name__} soft-caps its attention logits (attn_logit_softcapping {cap:g}), which the rebuilt attention does not"
    types = getattr(cfg, "layer_types", None)
    for layer in layers:
        mod = mods[layer - 1]
        if any(n.endswith("sinks") for n, _ in mod.named_parameters(recurse=False)):
            return f"layer {layer} has attention sinks, which the rebuilt attention does not model"
        if hasattr(mod, "sliding_window"):
            window = mod.sliding_window
        elif isinstance(types, list) and len(types) >= layer:
            window = getattr(cfg, "sliding_window", None) if types[layer - 1] == "sliding_attention" else None
        else:
            window = getattr(cfg, "sliding_window", None)
        if window is not None and (seq_len is None or window < seq_len):
            return (
                f"layer {layer} attends within a sliding window of {window} tokens, shorter than the rows "
                f"({seq_len}), which the rebuilt attention does not model; map attention_layers to full-attention layers"
            )
    return None


class QKCapture:
    """Keeps (q, k) of the chosen 1-based layers from the most recent forward."""

    def __init__(self, model: nn.Module, layers: list[int]):
        self.layers = sorted(set(layers))
        self._store: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._wanted: frozenset[int] = frozenset(self.layers)
        mods = attention_modules(model)
        missing = [layer for layer in self.layers if layer - 1 not in mods]
        if missing:
            raise ValueError(f"{type(model).__name__}: no attention module for layer(s) {missing}")
        _install_wrappers()
        self._modules = [mods[layer - 1] for layer in self.layers]
        for layer, mod in zip(self.layers, self._modules):
            _OWNERS[mod] = (self, layer)

    def want(self, layers: frozenset[int]) -> None:
        """Keep only these of its layers from the next forwards on (the layers the step's live components read)."""
        self._wanted = frozenset(layers)

    def _keep(self, layer: int, q: torch.Tensor, k: torch.Tensor, scaling: Optional[float]) -> None:
        if layer not in self._wanted:
            return
        d = q.size(-1)
        if scaling is not None:
            factor = float(scaling) * math.sqrt(d)
            if abs(factor - 1.0) > 1e-12:
                q = q * factor
        self._store[layer] = (q, k)

    def collect(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (q, k)} of the last forward, then forget them."""
        out = dict(self._store)
        self._store.clear()
        return out

    def remove(self) -> None:
        for mod in self._modules:
            _OWNERS.pop(mod, None)
        self._modules = []
