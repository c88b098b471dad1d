"""Capturing post-RoPE queries and keys of chosen decoder layers while the model runs normally (SDPA).

Forward hooks on each chosen layer's query/key modules (`q_norm`/`k_norm` where the architecture has
them, as Qwen3 does, else `q_proj`/`k_proj`) keep their outputs, and a pre-hook on the attention module
keeps the rotary `position_embeddings`; `collect()` applies the rotation. Works for Llama/Qwen/Mistral-
style decoders (rotate-half RoPE).
"""
from __future__ import annotations

import torch
from torch import nn


def decoder_layers(model: nn.Module):
    """The list of decoder blocks of a causal LM (Llama/Qwen/Mistral layout)."""
    inner = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: cannot find decoder layers for attention capture")
    return layers


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.size(-1) // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class QKCapture:
    """Keeps (q, k) of the chosen 1-based layers from the most recent forward."""

    def __init__(self, model: nn.Module, layers: list[int]):
        self.layers = sorted(set(layers))
        self._store: dict = {}
        self._handles = []
        blocks = decoder_layers(model)
        for layer in self.layers:
            attn = blocks[layer - 1].self_attn
            head_dim = attn.head_dim
            q_mod = getattr(attn, "q_norm", None) or attn.q_proj
            k_mod = getattr(attn, "k_norm", None) or attn.k_proj
            self._handles.append(q_mod.register_forward_hook(self._keep(layer, "q", head_dim)))
            self._handles.append(k_mod.register_forward_hook(self._keep(layer, "k", head_dim)))
            self._handles.append(attn.register_forward_pre_hook(self._keep_pos(layer), with_kwargs=True))

    def _keep(self, layer: int, which: str, head_dim: int):
        def hook(_module, _inputs, output):
            b, s = output.shape[0], output.shape[1]
            self._store[(layer, which)] = output.reshape(b, s, -1, head_dim).transpose(1, 2)  # [B, H, S, d]
        return hook

    def _keep_pos(self, layer: int):
        def hook(_module, args, kwargs):
            pos = kwargs.get("position_embeddings")
            if pos is None and len(args) > 1:
                pos = args[1]
            self._store[(layer, "pos")] = pos
        return hook

    def collect(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """{layer: (q, k)} with RoPE applied, then forget them."""
        out = {}
        for layer in self.layers:
            q, k = self._store.get((layer, "q")), self._store.get((layer, "k"))
            if q is None or k is None:
                continue
            pos = self._store.get((layer, "pos"))
            if pos is not None:
                cos, sin = pos[0].unsqueeze(1).to(q.dtype), pos[1].unsqueeze(1).to(q.dtype)
                q = q * cos + _rotate_half(q) * sin
                k = k * cos + _rotate_half(k) * sin
            out[layer] = (q, k)
        self._store.clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
