"""Bytes moved per logit outside the GEMMs: the naive full-logit KD + LM against dsdistill's paths.

    python bench/traffic.py                 # V = 32,000, 2,048 positions, fp32 and bf16, T = 2 and T = 1
    python bench/traffic.py --vocab 151936 --rows 1024

Every aten op of one forward + backward of the loss is seen by a `TorchDispatchMode`. An op is charged the
bytes of the tensors it reads and the tensors it writes (an in-place op reads and writes its target);
views move nothing; a gather or an index reads only what it picks; a scatter-add reads and writes only
the slots it adds to. The matrix products (`mm`, `addmm`) are left out: they are the GEMMs, the same in
every method. The result is divided by positions x vocabulary.

Methods (the same inputs, forward KL at T and the LM cross-entropy, weights 0.7 / 0.3):
- naive: both models' full logits, the KD and LM terms on them, autograd backward (the bench's baseline);
- dsdistill full-logit: `kd_loss` + `lm_loss` on full logits (the unfused path: closed-form KD gradient);
- dsdistill fused: `fused_kd_lm`, chunked from hidden states, closed-form value and logit gradient.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from dsdistill.losses import kd_loss, lm_loss  # noqa: E402
from dsdistill.losses.fused import KDOptions, fused_kd_lm  # noqa: E402

GEMMS = {"aten.mm.default", "aten.addmm.default", "aten.addmm_.default", "aten.mm.out", "aten.addmm.out"}
VIEWS = {
    "aten.view.default", "aten._unsafe_view.default", "aten.t.default", "aten.transpose.int", "aten.expand.default",
    "aten.detach.default", "aten.alias.default", "aten.slice.Tensor", "aten.select.int", "aten.unsqueeze.default",
    "aten.squeeze.dim", "aten.squeeze.default", "aten.as_strided.default", "aten.permute.default",
    "aten.split.Tensor", "aten.lift_fresh.default", "aten.empty.memory_format", "aten.empty_like.default",
    "aten.new_empty.default", "aten.empty_strided.default", "aten.reshape.default",
}  # fmt: skip
PICKS = {"aten.gather.default", "aten.index_select.default", "aten.index.Tensor", "aten.take_along_dim.default"}
MAKES = {
    "aten.new_zeros.default",
    "aten.new_full.default",
    "aten.new_ones.default",
    "aten.zeros_like.default",
    "aten.full_like.default",
    "aten.ones_like.default",
}
"""Factories: they write their output and read nothing (a `new_*` takes its dtype and device from a tensor)."""
ADDS_AT = {
    "aten.scatter_add_.default",
    "aten.index_add_.default",
    "aten.index_put_.default",
    "aten.scatter_.src",
    "aten.scatter_.value",
}


def footprint(t: torch.Tensor) -> int:
    """Bytes of the distinct elements a strided tensor addresses (a broadcast dimension counts once)."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensors(x):
    if torch.is_tensor(x):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


class Traffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.bytes = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func)
        if name in GEMMS or name in VIEWS:
            return out
        ins = list(_tensors(args)) + list(_tensors(list(kwargs.values())))
        outs = list(_tensors(out))
        if name in MAKES:
            moved = sum(footprint(o) for o in outs)
        elif name in PICKS:  # reads what it picks (the output's size) and the index, writes the output
            moved = sum(2 * footprint(o) for o in outs) + sum(footprint(t) for t in ins[1:])
        elif name in ADDS_AT:  # touches only the addressed slots: the index, the source, and those slots twice
            small = [t for t in ins[1:]]
            moved = sum(footprint(t) for t in small) + 2 * max((footprint(t) for t in small), default=0)
        else:
            moved = sum(footprint(t) for t in ins) + sum(footprint(o) for o in outs)
        self.bytes[name] += moved
        return out


def problem(rows: int, vocab: int, dtype, seed=0, ds=128, dt=256, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    b, s = 2, rows // 2 + 1
    sh = (torch.randn(b, s, ds, generator=g) / math.sqrt(ds)).to(dtype)
    sw = (torch.randn(vocab, ds, generator=g) * 2).to(dtype)
    th = (torch.randn(b, s, dt, generator=g) / math.sqrt(dt)).to(dtype)
    tw = (torch.randn(vocab, dt, generator=g) * 2).to(dtype)
    lab = torch.randint(0, vocab, (b, s), generator=g)
    return [x.to(device) for x in (sh, sw, th, tw, lab)]


def naive(sh, sw, th, tw, lab, T):
    v = sw.size(0)
    s_logits = (sh @ sw.T)[:, :-1].float() / T
    t_logits = (th @ tw.T)[:, :-1].float() / T
    s_lp = torch.log_softmax(s_logits.reshape(-1, v), -1)
    t_lp = torch.log_softmax(t_logits.reshape(-1, v), -1)
    kd = (t_lp.exp() * (t_lp - s_lp)).sum(-1).mean() * T**2
    lm = F.cross_entropy(s_logits.reshape(-1, v) * T, lab[:, 1:].reshape(-1))
    return 0.7 * kd + 0.3 * lm


def full_logits(sh, sw, th, tw, lab, T):
    s_logits, t_logits = sh @ sw.T, th @ tw.T
    kd, _ = kd_loss(s_logits, t_logits, lab, temperature=T)
    lm, _ = lm_loss(s_logits, lab)
    return 0.7 * kd + 0.3 * lm


def fused(sh, sw, th, tw, lab, T, chunk):
    combined, _ = fused_kd_lm(sh, sw, th, tw, lab, coef_kd=0.7, coef_lm=0.3, options=KDOptions(temperature=T, chunk=chunk))
    return combined


def measure(method, rows, vocab, dtype, T, chunk, device="cpu"):
    sh, sw, th, tw, lab = problem(rows, vocab, dtype, device=device)
    sh.requires_grad_(True)
    sw.requires_grad_(True)
    mode = Traffic()
    with mode:
        if method == "fused":
            loss = fused(sh, sw, th, tw, lab, T, chunk)
        else:
            loss = (naive if method == "naive" else full_logits)(sh, sw, th, tw, lab, T)
        loss.backward()
    positions = sh.size(0) * (sh.size(1) - 1)
    return sum(mode.bytes.values()) / (positions * vocab), mode.bytes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--rows", type=int, default=2048, help="loss-bearing positions")
    ap.add_argument("--chunk", type=int, default=1024, help="fused rows per chunk")
    ap.add_argument("--top", type=int, default=0, help="also list each method's N costliest ops")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(
        f"bytes moved per logit outside the GEMMs (forward + backward), V = {args.vocab}, {args.rows} positions, on {args.device}"
    )
    print(f"{'dtype':<6} {'T':>4} {'naive':>8} {'full-logit':>11} {'fused':>8} {'fused/naive':>12} {'full/naive':>11}")
    for dtype in (torch.float32, torch.bfloat16):
        for T in (2.0, 1.0):
            got = {m: measure(m, args.rows, args.vocab, dtype, T, args.chunk, args.device) for m in ("naive", "full", "fused")}
            n, f, u = got["naive"][0], got["full"][0], got["fused"][0]
            name = "fp32" if dtype == torch.float32 else "bf16"
            print(f"{name:<6} {T:>4g} {n:>8.1f} {f:>11.1f} {u:>8.1f} {u / n:>11.2f}x {f / n:>10.2f}x")
            if args.top:
                for m, (_, ops) in got.items():
                    total = args.rows * args.vocab
                    top = ", ".join(f"{k.replace('aten.', '')} {b / total:.1f}" for k, b in ops.most_common(args.top))
                    print(f"    {m}: {top}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
