"""Loading teacher and student with `from_pretrained`, through the transformers DeepSpeed integration.

With a ZeRO-3 DeepSpeed config the model is built inside `deepspeed.zero.Init`, so each rank only ever
allocates its own shard of the parameters (the checkpoint is streamed in and partitioned as it loads).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from dsdistill.config import ModelSpec
from dsdistill.errors import ModelError, one_line

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _is_hub_name(path: str) -> bool:
    return not path.startswith((".", "/", "~")) and path.count("/") <= 1 and not Path(path).suffix


def _check_location(path: str, field: str) -> None:
    p = Path(path).expanduser()
    if p.exists():
        if not p.is_dir():
            raise ModelError(f"{field}: '{path}' is a file; expected a model directory written by save_pretrained")
        if not (p / "config.json").exists():
            raise ModelError(f"{field}: '{path}' has no config.json; expected a model directory written by save_pretrained")
    elif not _is_hub_name(path):
        raise ModelError(f"{field}: '{path}' does not exist; expected a local model directory or a Hub name")


def load_tokenizer(spec: ModelSpec, *, field: str):
    """The tokenizer of `spec` (its `tokenizer` location if set, else its model path)."""
    from transformers import AutoTokenizer

    where = spec.tokenizer or spec.path
    if not Path(where).expanduser().is_dir() and not _is_hub_name(where):
        key = "tokenizer" if spec.tokenizer else "path"
        raise ModelError(f"{field}.{key}: '{where}' does not exist; expected a local tokenizer directory or a Hub name")
    try:
        tok = AutoTokenizer.from_pretrained(where, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as e:
        raise ModelError(one_line(f"{field}: cannot load a tokenizer from '{where}': {type(e).__name__}: {e}")[:400]) from None
    if tok.eos_token_id is None:
        raise ModelError(f"{field}: the tokenizer at '{where}' has no eos token; packing needs one to separate documents")
    return tok


def load_config(spec: ModelSpec, *, field: str):
    """The model's transformers config (cheap; used for checks before any weights load)."""
    from transformers import AutoConfig

    _check_location(spec.path, f"{field}.path")
    try:
        return AutoConfig.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    except Exception as e:
        raise ModelError(
            one_line(f"{field}.path: cannot load a model config from '{spec.path}': {type(e).__name__}: {e}")[:400]
        ) from None


def _first_shape_mismatch(spec: ModelSpec) -> Optional[str]:
    """'weight NAME has shape A in the files, B in the config' for the first weight whose stored shape is not
    the one the model's config.json builds (read from the safetensors headers; no weight is loaded)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=spec.trust_remote_code)
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for file in sorted(Path(spec.path).glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    stored = tuple(f.get_slice(name).get_shape())
                    if name in expected and expected[name] != stored:
                        return f"weight {name} has shape {list(stored)} in {file.name}, {list(expected[name])} in the config"
    except Exception:  # noqa: BLE001 - only a better message was sought
        return None
    return None


def load_causal_lm(spec: ModelSpec, *, field: str, precision: str, zero3_ds_config: Optional[dict[str, Any]]):
    """Load a causal LM; with `zero3_ds_config` it is partitioned at load time (never whole on a rank)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    _check_location(spec.path, f"{field}.path")
    keep_alive = HfDeepSpeedConfig(zero3_ds_config) if zero3_ds_config is not None else None
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            spec.path,
            revision=spec.revision,
            dtype=DTYPES[precision],
            attn_implementation=spec.attn_implementation,
            trust_remote_code=spec.trust_remote_code,
            use_safetensors=True,
            output_loading_info=True,
        )
        model, info = loaded  # (model, loading info) with output_loading_info
    except Exception as e:
        mismatch = _first_shape_mismatch(spec) if "mismatched" in str(e) or "size mismatch" in str(e) else None
        if mismatch is not None:
            raise ModelError(f"{field}.path: '{spec.path}' does not match its config.json: {mismatch}") from None
        raise ModelError(
            one_line(f"{field}.path: cannot load a causal LM from '{spec.path}': {type(e).__name__}: {e}")[:400]
        ) from None
    finally:
        # the integration keeps a global weak reference; clear it so the next model's load is not affected
        del keep_alive
        unset_hf_deepspeed_config()
    # transformers fills weights missing from the checkpoint with random values and only logs it: a
    # teacher or student saved from another architecture would train (or teach) as noise
    missing = sorted(info.get("missing_keys") or [])
    mismatched = info.get("mismatched_keys") or []
    if missing or mismatched:
        what = (
            f"lacks {len(missing)} weight(s) the {type(model).__name__} architecture needs (e.g. {', '.join(missing[:3])})"
            if missing
            else f"has {len(mismatched)} weight(s) of another shape (e.g. {mismatched[0][0] if mismatched[0] else '?'})"
        )
        raise ModelError(
            one_line(
                f"{field}.path: the checkpoint in '{spec.path}' {what}; expected weights saved from this architecture and config"
            )[:400]
        )
    return model


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(total parameters, parameters held on this rank); equal unless ZeRO-3 partitioned the model."""
    total = local = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", None)
        if n is not None:
            total += n
            shard = getattr(p, "ds_tensor", None)  # ZeRO-3: this rank's part
            local += shard.numel() if shard is not None else 0
        else:
            total += p.numel()
            local += p.numel()
    return total, local


_META: dict[int, tuple[Any, Any]] = {}


def meta_model(model_config):
    """The causal LM of a config, built on the meta device (no memory, no weights read); built once per
    config object, since the memory plan, the capture check and the fused check all inspect it."""
    import torch
    from transformers import AutoModelForCausalLM

    hit = _META.get(id(model_config))
    if hit is not None and hit[0] is model_config:
        return hit[1]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    _META[id(model_config)] = (model_config, model)  # the config is kept alive, so its id is not reused
    return model


def count_params(model_config) -> int:
    """Parameters of a model built from its config on the meta device (no memory, no weights read)."""
    return sum(p.numel() for p in meta_model(model_config).parameters())
