import inspect
import math

import pytest

from dsdistill import registry
from dsdistill.config import validate
from dsdistill.curriculum import Constant, Curriculum, CurriculumConfig, Ramp, progress_of
from dsdistill.errors import ConfigError


def every_component():
    return Curriculum(CurriculumConfig(), active=registry.NAMES)


@pytest.mark.parametrize(
    "progress, expected",
    [
        (0.0, dict(kd=0.9, lm=0.1, feature=0, attention=0, layerwise=0, contrastive=0)),
        (0.1, dict(feature=0, attention=0)),
        (0.25, dict(feature=0.05, attention=0.05, layerwise=0)),
        (0.4, dict(feature=0.1, attention=0.1, layerwise=0)),
        (0.55, dict(layerwise=0.025, contrastive=0)),
        (0.7, dict(layerwise=0.05, contrastive=0)),
        (0.85, dict(contrastive=0.025, feature=0.1)),
        (1.0, dict(kd=0.9, lm=0.1, feature=0.1, attention=0.1, layerwise=0.05, contrastive=0.05)),
    ],
)
def test_default_schedule(progress, expected):
    w = every_component().weights_at(step=int(progress * 1000), total_steps=1000)
    for name, value in expected.items():
        assert w[name] == pytest.approx(value, abs=1e-12), name
    for routed, follows in (
        ("routing_feature", "feature"),
        ("routing_attention_alignment", "attention"),
        ("routing_load_balance", "feature"),
    ):
        assert w[routed] == pytest.approx(w[follows])
    assert every_component().temperature_at(step=0, total_steps=10) == 1.0


def test_step_has_no_default_anywhere():
    for fn in (Curriculum.weights_at, Curriculum.temperature_at, progress_of):
        params = inspect.signature(fn).parameters
        assert params["step"].default is inspect.Parameter.empty
        assert params["step"].kind is inspect.Parameter.KEYWORD_ONLY
    cur = every_component()
    with pytest.raises(TypeError):
        cur.weights_at(total_steps=10)
    with pytest.raises(TypeError):
        cur.weights_at(3, 10)
    with pytest.raises(TypeError, match="optimizer step"):
        cur.weights_at(step=None, total_steps=10)
    with pytest.raises(TypeError):
        cur.temperature_at(step=1.5, total_steps=10)


def test_ramps_linear_and_cosine():
    lin = Ramp(kind="linear", start=0.2, end=0.6, start_value=1.0, end_value=0.0)
    cos = Ramp(kind="cosine", start=0.2, end=0.6, start_value=1.0, end_value=0.0)
    assert lin.at(0.0) == 1.0 and lin.at(0.2) == 1.0 and lin.at(0.9) == 0.0
    assert lin.at(0.3) == pytest.approx(0.75)
    assert cos.at(0.4) == pytest.approx(0.5)
    assert cos.at(0.3) == pytest.approx(0.5 + 0.5 * math.cos(math.pi * 0.25))
    assert Constant(value=0.4).at(0.77) == 0.4


def test_progress_is_clipped_and_checked():
    assert progress_of(step=15, total_steps=10) == 1.0
    with pytest.raises(ValueError):
        progress_of(step=-1, total_steps=10)
    with pytest.raises(ValueError):
        progress_of(step=1, total_steps=0)


def test_shorthand_numbers_and_replacing_the_default():
    cfg = CurriculumConfig(
        weights={"kd": 1, "lm": {"kind": "linear", "start": 0, "end": 0.5, "start_value": 0, "end_value": 1}}, temperature=2
    )
    cur = Curriculum(cfg)
    assert cur.weights_at(step=5, total_steps=20) == {"kd": 1.0, "lm": 0.5}
    assert cur.temperature_at(step=5, total_steps=20) == 2.0
    assert cur.inactive == ()


def test_every_registered_component_is_computed_by_default():
    assert Curriculum(CurriculumConfig()).active == registry.NAMES


def test_components_a_build_does_not_compute_are_reported_not_weighted():
    """The mechanism that keeps the objective honest when a scheduled component is not computed."""
    cur = Curriculum(CurriculumConfig(), active=("kd", "lm"))
    assert cur.active == ("kd", "lm")
    assert "feature" in cur.inactive
    assert set(cur.weights_at(step=9, total_steps=10)) == {"kd", "lm"}
    assert cur.definition()["inactive"] == list(cur.inactive)
    with pytest.raises(ValueError, match="every computed component"):
        Curriculum(CurriculumConfig(weights={"feature": 1.0}), active=("kd", "lm"))


@pytest.mark.parametrize(
    "weights, message",
    [
        ({"kd": -0.1}, "curriculum.weights.kd.value: got -0.1; expected greater than or equal to 0"),
        (
            {"kd": {"kind": "linear", "start": 0.6, "end": 0.2, "start_value": 0, "end_value": 1}},
            "ramp end (0.2) must be >= start (0.6)",
        ),
        (
            {"kd": {"kind": "linear", "start": 0.1, "end": 1.5, "start_value": 0, "end_value": 1}},
            "curriculum.weights.kd.end: got 1.5; expected less than or equal to 1",
        ),
        ({"kd_logits": 0.5}, "unknown loss component 'kd_logits'"),
        (
            {"kd": {"kind": "linear", "start": 0.0, "end": 0.5, "start_value": 1, "end_value": 0}},
            "every component weight is 0 at progress 0.5",
        ),
        ({"kd": {"kind": "step", "value": 1}}, "curriculum.weights.kd"),
    ],
)
def test_bad_schedules_are_one_line_errors(make_config, weights, message):
    with pytest.raises(ConfigError) as e:
        validate(make_config(curriculum={"weights": weights}))
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_temperature_must_stay_positive(make_config):
    with pytest.raises(ConfigError, match="temperature must be > 0"):
        validate(
            make_config(curriculum={"temperature": {"kind": "linear", "start": 0, "end": 1, "start_value": 2, "end_value": 0}})
        )
