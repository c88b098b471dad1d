"""The LM loss and the objective's reduction: component sums over a window divided by the window's unit
counts equal the objective of the whole batch at once (never a mean of per-micro-batch means)."""

import pytest
import torch.nn.functional as F

from dsdistill.components.base import Inputs, StudentOutputs
from dsdistill.config import LossConfig
from dsdistill.curriculum import Curriculum, CurriculumConfig
from dsdistill.layers import LayerMap
from dsdistill.losses import lm_loss
from dsdistill.objective import Objective, count_units
from dsdistill.teachers.base import DenseLogits, TeacherSignal
from tests.test_kd import IGN, batch


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
        x = Inputs(
            labels=labels[sl],
            student=student,
            teacher=TeacherSignal(DenseLogits(te[sl])),
            temperature=2.0,
            loss=cfg,
            layers=layers,
        )
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
    mean_of_means = (
        sum(objective.value({k: float(v) / pn[k] for k, v in p.sums.items()}, weights) for p, pn in zip(parts, per_part)) / 2
    )
    assert abs(mean_of_means - window) > 1e-3  # the naive reduction really is different here
