"""KD on logits, every divergence: float64 references written here as plain Python loops (no code
shared with the implementation), properties, top-k with and without the rest bucket, and gradcheck.
The chunked (fused) path is checked against the same `kd_loss` in tests/test_fused.py."""

import math

import pytest
import torch

from dsdistill.losses import kd_loss
from dsdistill.losses.kd import DIVERGENCES

IGN = -100
D64 = torch.float64


def logits(seed, b=2, s=5, v=7, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, v, generator=g, dtype=D64) * scale


def labels_for(b=2, s=5, v=7, masked=((0, 2),)):
    g = torch.Generator().manual_seed(99)
    lab = torch.randint(0, v, (b, s), generator=g)
    for i, j in masked:
        lab[i, j] = IGN
    return lab


# ------------------------------------------------------------------ references (plain Python math)


def ref_probs(row, T):
    z = [x / T for x in row]
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def ref_kl(p, q):
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def ref_div(p, q, kind, beta=0.5, alpha=0.1):
    if kind == "forward_kl":
        return ref_kl(p, q)
    if kind == "reverse_kl":
        return ref_kl(q, p)
    if kind == "jsd":
        if beta == 0:
            return ref_kl(p, q)
        if beta == 1:
            return ref_kl(q, p)
        m = [beta * a + (1 - beta) * b for a, b in zip(p, q)]
        return beta * ref_kl(p, m) + (1 - beta) * ref_kl(q, m)
    if kind == "skew_kl":
        return ref_kl(p, [alpha * a + (1 - alpha) * b for a, b in zip(p, q)])
    if kind == "tv":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    raise AssertionError(kind)


def ref_kd(st, te, lab, T, kind, **kw):
    total = 0.0
    for i in range(st.size(0)):
        for t in range(st.size(1) - 1):
            if lab[i, t + 1] != IGN:
                total += ref_div(ref_probs(te[i, t].tolist(), T), ref_probs(st[i, t].tolist(), T), kind, **kw)
    return total * T * T


def batch(seed=0, b=3, s=7, v=11, masked=((0, 3), (2, 6))):
    g = torch.Generator().manual_seed(seed)
    st = torch.randn(b, s, v, generator=g, dtype=torch.float64)
    te = torch.randn(b, s, v, generator=g, dtype=torch.float64) * 2
    labels = torch.randint(0, v, (b, s), generator=g)
    for i, j in masked:
        labels[i, j] = IGN
    return st, te, labels


def reference_kd(st, te, labels, T, k=None, rest=False):
    """Plain-Python float64 KD: loops over positions, no shared code with the implementation."""
    total, count = 0.0, 0
    for i in range(st.size(0)):
        for t in range(st.size(1) - 1):
            if labels[i, t + 1] == IGN:
                continue
            count += 1
            zs = [x / T for x in st[i, t].tolist()]
            zt = [x / T for x in te[i, t].tolist()]
            ls = [x - math.log(sum(math.exp(y) for y in zs)) for x in zs]
            lt = [x - math.log(sum(math.exp(y) for y in zt)) for x in zt]
            if k is not None:
                top = sorted(range(len(lt)), key=lambda j: -lt[j])[:k]
                ps = [math.exp(ls[j]) for j in top]
                pt = [math.exp(lt[j]) for j in top]
                if rest:
                    ps.append(1 - sum(ps))
                    pt.append(1 - sum(pt))
                else:
                    ps = [p / sum(ps) for p in ps]
                    pt = [p / sum(pt) for p in pt]
                total += sum(b * (math.log(b) - math.log(a)) for a, b in zip(ps, pt))
            else:
                total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt))
    return total * T * T, count


@pytest.mark.parametrize("T", [1.0, 2.5])
@pytest.mark.parametrize("k, rest", [(None, False), (4, False), (4, True)])
def test_forward_kd_with_top_k_matches_independent_reference(T, k, rest):
    st, te, labels = batch()
    got, m = kd_loss(st, te, labels, temperature=T, ignore_index=IGN, top_k=k, top_k_rest=rest)
    ref, count = reference_kd(st, te, labels, T, k, rest)
    assert m["count"] == count == 3 * 6 - 2
    assert float(got) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert float(m["kl"]) * T * T == pytest.approx(float(got), rel=1e-12)


# ------------------------------------------------------------------ divergences


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("T", [1.0, 2.0])
def test_every_divergence_matches_reference(kind, T):
    st, te, lab = logits(0), logits(1, scale=2), labels_for()
    got, m = kd_loss(st, te, lab, temperature=T, ignore_index=IGN, divergence_kind=kind, beta=0.3, alpha=0.2)
    ref = ref_kd(st, te, lab, T, kind, beta=0.3, alpha=0.2)
    assert float(got) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert float(m["kl"]) * T * T == pytest.approx(float(got), rel=1e-12)  # raw and T^2-scaled both reported


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_properties(kind):
    st, te, lab = logits(0), logits(1, scale=2), labels_for()
    same, _ = kd_loss(st, st.clone(), lab, temperature=1.5, ignore_index=IGN, divergence_kind=kind)
    assert abs(float(same)) < 1e-12  # zero for identical inputs
    full, _ = kd_loss(st, te, lab, temperature=1.5, ignore_index=IGN, divergence_kind=kind)
    k_all, _ = kd_loss(st, te, lab, temperature=1.5, ignore_index=IGN, divergence_kind=kind, top_k=7, top_k_rest=True)
    assert float(k_all) == pytest.approx(float(full), rel=1e-12)  # k = vocab with the rest bucket is full KD
    # T^2 scaling is exact
    for T in (1.0, 3.0):
        v, m = kd_loss(st, te, lab, temperature=T, ignore_index=IGN, divergence_kind=kind)
        assert float(v) == pytest.approx(T * T * float(m["kl"]), rel=1e-14)
    # masked positions contribute nothing
    st2 = st.clone()
    st2[0, 1] += 50.0  # position 1 predicts label[0, 2], which is masked
    moved, _ = kd_loss(st2, te, lab, temperature=1.5, ignore_index=IGN, divergence_kind=kind)
    assert float(moved) == pytest.approx(float(full), rel=1e-12)


def test_jsd_endpoints_and_symmetry():
    st, te, lab = logits(0), logits(1, scale=2), labels_for()

    def kd(kind, s=st, t=te, **kw):
        return float(kd_loss(s, t, lab, temperature=1.0, ignore_index=IGN, divergence_kind=kind, **kw)[0])

    assert kd("jsd", beta=0.0) == pytest.approx(kd("forward_kl"), rel=1e-12)
    assert kd("jsd", beta=1.0) == pytest.approx(kd("reverse_kl"), rel=1e-12)
    # the endpoints are the limits of jsd/beta and jsd/(1 - beta)
    assert kd("jsd", beta=1e-5) / 1e-5 == pytest.approx(kd("forward_kl"), rel=1e-3)
    assert kd("jsd", beta=1 - 1e-5) / 1e-5 == pytest.approx(kd("reverse_kl"), rel=1e-3)
    assert kd("jsd", beta=0.5) == pytest.approx(kd("jsd", s=te, t=st, beta=0.5), rel=1e-12)  # symmetric at 0.5
    assert kd("skew_kl", alpha=0.0) == pytest.approx(kd("forward_kl"), rel=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_gradcheck(kind):
    st, te, lab = logits(0, s=4, v=5), logits(1, s=4, v=5), labels_for(s=4, v=5)
    st.requires_grad_(True)

    def fn(x):
        return kd_loss(x, te, lab, temperature=1.3, ignore_index=IGN, divergence_kind=kind, beta=0.4, alpha=0.3)[0]

    assert torch.autograd.gradcheck(fn, (st,))


def test_top_k_with_rest_gradcheck():
    st, te, labels = batch(b=2, s=4, v=5, masked=((1, 2),))
    st.requires_grad_(True)

    def fn(x):
        return kd_loss(x, te, labels, temperature=1.7, ignore_index=IGN, top_k=3, top_k_rest=True)[0]

    assert torch.autograd.gradcheck(fn, (st,))
