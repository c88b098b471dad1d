"""Counting what forces the host to wait for the device: the reads of a tensor's value on the host.

On a GPU each of these blocks the Python thread until the queued kernels finish (and rules out CUDA graphs).
On the CPU nothing waits, but the same calls happen, so they can be counted there: `SyncCounter` sees
`aten::_local_scalar_dense` (`.item()`, `int()`, `float()`, `bool()` of a tensor), `aten::nonzero`,
`aten::masked_select` and indexing with a boolean mask (data-dependent output shapes) at the dispatcher,
and `.tolist()` at the Python level, with the dsdistill line that asked for each and whether dsdistill's
own code asked or a library it called (transformers, DeepSpeed). Reads of the loader's host tensors are
written with numpy (`.numpy()` exists for host tensors only), so they are not counted: on a GPU they wait
for nothing. `bench/syncs.py` prints the counts per step and per extra micro-batch.
"""

from __future__ import annotations

import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_ROOT = str(Path(__file__).resolve().parent)
_DISPATCH = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select"}


def _where() -> tuple[str, bool]:
    """(site, ours): the innermost dsdistill frame of the stack (file:line function) and the innermost frame
    outside torch, and whether that frame is dsdistill's own (else a library asked: transformers, DeepSpeed)."""
    stack = traceback.extract_stack()[:-3]
    ours = next((f for f in reversed(stack) if f.filename.startswith(_ROOT) and not f.filename.endswith("syncs.py")), None)
    asker = next((f for f in reversed(stack) if "/torch/" not in f.filename and not f.filename.endswith("syncs.py")), None)
    site = f"{Path(ours.filename).name}:{ours.lineno} {ours.name}" if ours else "elsewhere"
    own = asker is not None and asker.filename.startswith(_ROOT)
    if asker is not None and not own:
        site += f" <- {asker.filename.split('site-packages/')[-1]}:{asker.lineno}"
    return site, own


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in _DISPATCH:
            self.counter.add(name)
        elif name == "aten::index" and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) if i is not None
        ):
            self.counter.add("boolean index")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counter: "SyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name == "tolist":  # `.numpy()` exists for host tensors only: never a device sync
            self.counter.add(f".{name}()")
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """`with SyncCounter() as c:` ... then `c.total`, `c.ours`, `c.by_op`, `c.by_site`."""

    def __init__(self) -> None:
        self.by_op: Counter[str] = Counter()
        self.by_site: Counter[str] = Counter()
        self.ours = 0
        """Those dsdistill's own code asked for (the rest come from inside a library)."""

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def add(self, op: str) -> None:
        site, own = _where()
        self.by_op[op] += 1
        self.by_site[f"{op} @ {site}"] += 1
        self.ours += own

    def __enter__(self) -> "SyncCounter":
        self._modes: list[Any] = [_Function(self), _Dispatch(self)]
        for m in self._modes:
            m.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for m in reversed(self._modes):
            m.__exit__(*exc)
