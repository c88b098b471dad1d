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
    if kind == "skew_rkl":
        return ref_kl(q, [alpha * b + (1 - alpha) * a for a, b in zip(p, q)])
    if kind == "tv":
        return 0.5 * sum(abs(a - b) for a, b in zip(p, q))
    raise AssertionError(kind)


def ref_kd(st, te, lab, T, kind, **kw):
    total = 0.0
    for i in range(st.size(0)):
        for t in range(st.size(1) - 1):
            if lab[i, t + 1] != IGN:
                total += ref_div(ref_probs(te[i, t].tolist(), T), ref_probs(st[i, t].tolist(), T), kind, **kw)
    return total * scale_of(kind, T)


def scale_of(kind, T):
    """T^2 for the KL family (gradients shrink as 1/T^2); total variation is bounded by 1 and unscaled."""
    return 1.0 if kind == "tv" else T * T


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
    assert float(m["kl"]) * scale_of(kind, T) == pytest.approx(float(got), rel=1e-12)  # raw and scaled both reported


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_divergence_properties(kind):
    st, te, lab = logits(0), logits(1, scale=2), labels_for()
    same, _ = kd_loss(st, st.clone(), lab, temperature=1.5, ignore_index=IGN, divergence_kind=kind)
    assert abs(float(same)) < 1e-12  # zero for identical inputs
    full, _ = kd_loss(st, te, lab, temperature=1.5, ignore_index=IGN, divergence_kind=kind)
    k_all, _ = kd_loss(st, te, lab, temperature=1.5, ignore_index=IGN, divergence_kind=kind, top_k=7, top_k_rest=True)
    assert float(k_all) == pytest.approx(float(full), rel=1e-12)  # k = vocab with the rest bucket is full KD
    # T^2 scaling is exact (tv: none)
    for T in (1.0, 3.0):
        v, m = kd_loss(st, te, lab, temperature=T, ignore_index=IGN, divergence_kind=kind)
        assert float(v) == pytest.approx(scale_of(kind, T) * float(m["kl"]), rel=1e-14)
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
    assert kd("skew_rkl", alpha=0.0) == pytest.approx(kd("reverse_kl"), rel=1e-12)
    assert kd("skew_rkl", s=te, t=st, alpha=0.3) == pytest.approx(kd("skew_kl", alpha=0.3), rel=1e-12)  # mirror images


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


# ------------------------------------------------------------------ top-k supports per divergence

SUPPORT = {
    "forward_kl": "teacher",
    "reverse_kl": "student",
    "skew_rkl": "student",
    "jsd": "union",
    "skew_kl": "union",
    "tv": "union",
}


def ref_topk_div(s_row, t_row, T, k, rest, kind, beta=0.5, alpha=0.1):
    """One position's top-k divergence in plain Python: the support picked from the side(s) the divergence
    weights (sorted by probability), renormalised, or with one bucket for the rest of the vocabulary."""
    p_all, q_all = ref_probs(t_row, T), ref_probs(s_row, T)
    top = lambda probs: set(sorted(range(len(probs)), key=lambda j: -probs[j])[:k])  # noqa: E731
    side = SUPPORT[kind]
    keep = sorted((top(p_all) if side != "student" else set()) | (top(q_all) if side != "teacher" else set()))
    p, q = [p_all[j] for j in keep], [q_all[j] for j in keep]
    if rest:
        p.append(1 - sum(p))
        q.append(1 - sum(q))
    else:
        p, q = [x / sum(p) for x in p], [x / sum(q) for x in q]
    return ref_div(p, q, kind, beta=beta, alpha=alpha)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("rest", [False, True])
def test_top_k_uses_each_divergences_support(kind, rest):
    st, te, lab = batch(seed=3)
    T, k = 1.7, 3
    got, m = kd_loss(
        st, te, lab, temperature=T, ignore_index=IGN, top_k=k, top_k_rest=rest, divergence_kind=kind, beta=0.3, alpha=0.2
    )
    ref = sum(
        ref_topk_div(st[i, t].tolist(), te[i, t].tolist(), T, k, rest, kind, beta=0.3, alpha=0.2)
        for i in range(st.size(0))
        for t in range(st.size(1) - 1)
        if lab[i, t + 1] != IGN
    )
    assert float(m["kl"]) == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert float(got) == pytest.approx(ref * scale_of(kind, T), rel=1e-9, abs=1e-12)


def test_reverse_kl_top_k_sees_the_students_own_mass():
    """The audit's case: the student puts 92.5% of its mass on a token outside the teacher's top-2. On the
    teacher's top-2 the reverse KL was exactly 0; on the student's top-2 it is not."""
    te = torch.tensor([[[3.0, 2, 0, 0, 0, 0, 0, 0]] * 2], dtype=D64)
    st = torch.tensor([[[1.0, 0, -2, -2, -2, 4, -2, -2]] * 2], dtype=D64)
    lab = torch.tensor([[0, 1]])
    full, _ = kd_loss(st, te, lab, temperature=1.0, ignore_index=IGN, divergence_kind="reverse_kl")
    assert float(full) == pytest.approx(2.986, abs=5e-4)
    for rest in (False, True):
        got, _ = kd_loss(st, te, lab, temperature=1.0, ignore_index=IGN, divergence_kind="reverse_kl", top_k=2, top_k_rest=rest)
        ref = ref_topk_div(st[0, 0].tolist(), te[0, 0].tolist(), 1.0, 2, rest, "reverse_kl")
        assert float(got) == pytest.approx(ref, rel=1e-12) and float(got) > 1.0


@pytest.mark.parametrize("kind", ["jsd", "skew_kl", "skew_rkl", "tv"])
def test_union_support_gradcheck(kind):
    st, te, labels = batch(b=2, s=4, v=6, masked=((1, 2),))
    st.requires_grad_(True)

    def fn(x):
        return kd_loss(x, te, labels, temperature=1.3, ignore_index=IGN, top_k=2, top_k_rest=True, divergence_kind=kind)[0]

    assert torch.autograd.gradcheck(fn, (st,))


def test_tv_is_not_temperature_scaled():
    """TV <= 1 per token; scaling it by T^2 let it reach 2.46 per token at T = 4."""
    st, te, lab = logits(0, scale=4), logits(1, scale=4), labels_for()
    got, m = kd_loss(st, te, lab, temperature=4.0, ignore_index=IGN, divergence_kind="tv")
    assert float(got) == pytest.approx(float(m["kl"]), rel=1e-15)
    assert float(got) / m["count"] <= 1.0
