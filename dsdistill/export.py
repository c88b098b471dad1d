"""`dsdistill export RUN_DIR --out DIR`: the trained student as a standard Hugging Face model.

Consolidates the fp32 weights from a checkpoint of any ZeRO stage (all shards, all ranks), keeps only the
student model (drops the projections, contrastive heads and router that live beside it in the engine),
and writes config, safetensors weights and tokenizer. The output directory is written under a temporary
name and renamed when complete; an existing non-empty directory is never overwritten.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

from dsdistill import checkpoint
from dsdistill.config import read_mapping, validate
from dsdistill.errors import DistillError, one_line
from dsdistill.models import DTYPES

MODEL_PREFIX = "model."


class ExportError(DistillError):
    """The run cannot be exported."""


def export(
    run_dir: str | Path, out: str | Path, *, tag: Optional[str] = None, dtype: str = "fp32", trust_remote_code: bool = False
) -> Path:
    """Write the student of `run_dir`'s checkpoint `tag` (default: latest) to `out`.

    `trust_remote_code` comes from the caller (the command line) only, never from the run directory:
    a run directory is data, and nothing read from it may run code."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    run_dir, out = Path(run_dir), Path(out)
    if out.is_symlink():
        raise ExportError(f"export: '{out}' is a symbolic link; give a real directory (or a new path) as --out")
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"export: '{run_dir}' has no config.yaml; expected a dsdistill run directory")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"export: '{out}' exists and is not an empty directory; choose another --out")
    cfg = validate(read_mapping(run_dir / "config.yaml"))
    tag = checkpoint.resolve_tag(run_dir, tag, field="export --tag")
    if tag is None:
        raise ExportError(f"export: no checkpoint in '{checkpoint.checkpoint_dir(run_dir)}'")
    where = checkpoint.checkpoint_dir(run_dir) / tag
    if not any(where.glob("*model_states.pt")):
        raise ExportError(f"export: '{where}' holds no model states (an empty or incomplete checkpoint); pick another with --tag")
    checkpoint.verify(run_dir, tag, field="--tag")
    try:
        with checkpoint.safe_unpickling():
            state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint.checkpoint_dir(run_dir)), tag=tag)
    except Exception as e:
        if checkpoint.refused_pickle(e):
            raise ExportError("export: " + checkpoint.describe_load_error(where, e)) from None
        raise ExportError(one_line(f"export: cannot consolidate '{where}': {type(e).__name__}: {e}")[:400]) from None
    weights = {k[len(MODEL_PREFIX) :]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    config = AutoConfig.from_pretrained(cfg.student.path, revision=cfg.student.revision, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    result = model.load_state_dict(weights, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied]
    if missing or result.unexpected_keys:
        raise ExportError(
            one_line(
                f"export: checkpoint '{tag}' does not match the student architecture "
                f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})"
            )
        )
    model.to(DTYPES[dtype])
    tmp = out.parent / f".{out.name}.partial"
    if tmp.is_symlink():
        tmp.unlink()  # the link itself, never its target
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    try:
        AutoTokenizer.from_pretrained(cfg.student.tokenizer or cfg.student.path, revision=cfg.student.revision).save_pretrained(
            tmp
        )
    except Exception as e:  # a model without a tokenizer still exports; say so
        print(f"export: warning: no tokenizer saved ({type(e).__name__}: {e})")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
