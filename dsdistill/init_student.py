"""`dsdistill init-student`: a student made from the teacher's own blocks.

The student keeps the teacher's architecture, width, tokenizer, embeddings, final norm and head, and a
chosen subset of its decoder blocks, copied in order (DistilBERT's and Minitron's depth pruning: a
student that starts near the teacher distils faster than one from scratch). Keeping every block gives a
copy whose logits equal the teacher's.

Which blocks (1-based, as everywhere in dsdistill):
- `every-K`: blocks 1, 1+K, 1+2K, ... and always the last one (`every-2` halves the depth);
- `first-N` / `last-N`: the first or the last N blocks;
- a list such as `1,2,5,8`: those blocks, in that order.

Per-layer settings in the config (any list with one entry per block, such as Gemma's and Qwen's
`layer_types`) are cut to the kept blocks, so a sliding-window block stays a sliding-window block. Width
pruning is not done here: the student is as wide as the teacher.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

from dsdistill.errors import ModelError


def parse_layers(spec: str, n: int) -> list[int]:
    """1-based block numbers to keep, from `every-K`, `first-N`, `last-N` or a comma list; one-line errors."""
    s = spec.strip()
    m = re.fullmatch(r"(every|first|last)-(\d+)", s)
    if m:
        k = int(m.group(2))
        if k < 1 or (m.group(1) != "every" and k > n):
            raise ModelError(f"init-student --layers {spec!r}: expected a count 1..{n} (the teacher has {n} blocks)")
        if m.group(1) == "every":
            keep = list(range(1, n + 1, k))
            return keep if keep[-1] == n else keep + [n]
        return list(range(1, k + 1)) if m.group(1) == "first" else list(range(n - k + 1, n + 1))
    try:
        keep = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise ModelError(
            f"init-student --layers {spec!r}: expected every-K, first-N, last-N or a comma list of block numbers 1..{n}"
        ) from None
    bad = [x for x in keep if not 1 <= x <= n]
    if not keep or bad or len(set(keep)) != len(keep):
        raise ModelError(
            f"init-student --layers {spec!r}: expected distinct block numbers 1..{n} (the teacher has {n} blocks)"
            + (f"; {bad[0]} is not one" if bad else "")
        )
    return keep


def _blocks_prefix(state: dict[str, Any], n: int) -> str:
    """The state-dict prefix of the decoder blocks ('model.layers.' for Llama, Qwen, Gemma, Mistral, Phi;
    'transformer.h.' for GPT-2): the prefix under which keys 0..n-1 exist."""
    found: dict[str, set[int]] = {}
    for key in state:
        m = re.match(r"^(.*?\.)(\d+)\.", key)
        if m:
            found.setdefault(m.group(1), set()).add(int(m.group(2)))
    for prefix, ids in found.items():
        if ids == set(range(n)):
            return prefix
    raise ModelError(f"init-student: cannot find the teacher's {n} decoder blocks in its weights")


def init_student(teacher: str | Path, layers: str, out: str | Path, *, trust_remote_code: bool = False) -> Path:
    """Write a student made of the teacher's blocks `layers` to `out` (a Hugging Face model directory)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    teacher, out = Path(teacher), Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ModelError(f"init-student: '{out}' exists and is not an empty directory; choose another --out")
    try:
        cfg = AutoConfig.from_pretrained(teacher, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - the user needs the path and the reason
        raise ModelError(
            f"init-student --teacher: cannot load a causal LM from '{teacher}' ({type(e).__name__}: {e})"[:400]
        ) from None
    n = int(cfg.num_hidden_layers)
    keep = parse_layers(layers, n)
    student_cfg = cfg.to_dict()
    for key, value in list(student_cfg.items()):  # per-block settings follow their blocks
        if isinstance(value, list) and len(value) == n and key not in ("architectures",):
            student_cfg[key] = [value[i - 1] for i in keep]
    student_cfg["num_hidden_layers"] = len(keep)
    config = type(cfg).from_dict(student_cfg)
    student = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)
    src = model.state_dict()
    prefix = _blocks_prefix(src, n)
    moved = {}
    for key, value in src.items():
        if key.startswith(prefix):
            block, rest = key[len(prefix) :].split(".", 1)
            if int(block) + 1 in keep:
                moved[f"{prefix}{keep.index(int(block) + 1)}.{rest}"] = value
        else:
            moved[key] = value
    result = student.load_state_dict(moved, strict=False)
    tied = set(getattr(student, "_tied_weights_keys", None) or [])
    missing = [k for k in result.missing_keys if k not in tied and not k.endswith("rotary_emb.inv_freq")]
    if missing or result.unexpected_keys:
        raise ModelError(f"init-student: the copy does not fit (missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    tmp = out.parent / f".{out.name}.partial"
    if tmp.is_symlink():
        tmp.unlink()
    shutil.rmtree(tmp, ignore_errors=True)
    student.save_pretrained(tmp, safe_serialization=True)
    try:
        AutoTokenizer.from_pretrained(teacher).save_pretrained(tmp)
    except Exception as e:  # noqa: BLE001 - a model without a tokenizer still works; say so
        print(f"init-student: warning: no tokenizer copied ({type(e).__name__}: {e})")
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
