import math

import pytest
import torch
import torch.nn.functional as F

from dsdistill.config import LossConfig
from dsdistill.losses import kd_loss, lm_loss
from dsdistill.components.base import Inputs, StudentOutputs
from dsdistill.curriculum import Curriculum, CurriculumConfig
from dsdistill.layers import LayerMap
from dsdistill.objective import Objective, count_units
from dsdistill.teacher import TeacherSignal

IGN = -100


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
def test_kd_matches_independent_reference(T, k, rest):
    st, te, labels = batch()
    got, m = kd_loss(st, te, labels, temperature=T, ignore_index=IGN, top_k=k, top_k_rest=rest)
    ref, count = reference_kd(st, te, labels, T, k, rest)
    assert m["count"] == count == 3 * 6 - 2
    assert float(got) == pytest.approx(ref, rel=1e-9, abs=1e-9)
    assert float(m["kl"]) * T * T == pytest.approx(float(got), rel=1e-12)


def test_kd_properties():
    st, te, labels = batch()
    zero, _ = kd_loss(st, st.clone(), labels, temperature=2.0, ignore_index=IGN)
    assert abs(float(zero)) < 1e-12
    full, _ = kd_loss(st, te, labels, temperature=2.0, ignore_index=IGN)
    vocab_k, _ = kd_loss(st, te, labels, temperature=2.0, ignore_index=IGN, top_k=st.size(-1), top_k_rest=True)
    assert float(vocab_k) == pytest.approx(float(full), rel=1e-12)
    # masked positions contribute nothing, whatever their logits
    st2 = st.clone()
    st2[0, 2] += 100.0  # position 2 predicts label[0, 3], which is masked
    moved, _ = kd_loss(st2, te, labels, temperature=2.0, ignore_index=IGN)
    assert float(moved) == pytest.approx(float(full), rel=1e-12)


def test_kd_gradcheck():
    st, te, labels = batch(b=2, s=4, v=5, masked=((1, 2),))
    st.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, te, labels, temperature=1.7, ignore_index=IGN)[0], (st,))
    assert torch.autograd.gradcheck(lambda x: kd_loss(x, te, labels, temperature=1.7, ignore_index=IGN, top_k=3, top_k_rest=True)[0], (st,))


def test_lm_is_summed_cross_entropy_over_valid_tokens():
    st, _, labels = batch()
    got, m = lm_loss(st, labels, ignore_index=IGN)
    ref = F.cross_entropy(st[:, :-1].reshape(-1, st.size(-1)), labels[:, 1:].reshape(-1), ignore_index=IGN, reduction="mean")
    assert m["count"] == 16
    assert float(got) / m["count"] == pytest.approx(float(ref), rel=1e-12)


def test_token_weighted_reduction_over_uneven_micro_batches_equals_one_batch():
    """Two micro-batches with very different valid-token counts: the window objective built from
    per-batch sums / window count equals the objective of the concatenated batch."""
    st, te, labels = batch(b=4, s=9, v=6, masked=())
    labels[:3, 2:] = IGN  # first micro-batch almost fully masked
    cfg = LossConfig(ignore_index=IGN)
    weights = {"kd": 0.7, "lm": 0.3}
    layers = LayerMap.build(cfg, 1, 1)
    objective = Objective(Curriculum(CurriculumConfig(weights=weights, temperature=2.0)), total_steps=10, layers=layers)
    ctx = objective.context(step=0)

    def sums(sl):
        student = StudentOutputs(logits=st[sl], fused=None, hidden=None, side={}, qk={})
        x = Inputs(labels=labels[sl], student=student, teacher=TeacherSignal(logits=te[sl]), temperature=2.0, loss=cfg,
                   layers=layers)
        return objective.sums(x)

    def units(sl):
        return {u: float(c) for u, c in count_units(labels[sl], IGN).items()}

    parts = [sums(slice(0, 3)), sums(slice(3, 4))]
    window_units = {u: units(slice(0, 3))[u] + units(slice(3, 4))[u] for u in units(slice(0, 4))}
    coefficients = objective.coefficients(ctx, objective.normalizers(window_units))
    window = sum(float(objective.loss(p, coefficients)) for p in parts)
    whole = sums(slice(0, 4))
    n = objective.normalizers(units(slice(0, 4)))
    means = {k: float(v) / n[k] for k, v in whole.sums.items()}
    assert window == pytest.approx(objective.value(means, weights), rel=1e-12)
    per_part = [objective.normalizers(units(slice(0, 3))), objective.normalizers(units(slice(3, 4)))]
    mean_of_means = sum(objective.value({k: float(v) / pn[k] for k, v in p.sums.items()}, weights)
                        for p, pn in zip(parts, per_part)) / 2
    assert abs(mean_of_means - window) > 1e-3  # the naive reduction really is different here
