"""SamplingSettings: the one place the sampling rules are checked, each error naming its field; ddim-run's flags are
generated from it; the API, serving and the plan take it whole."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from runtime.choices import values, Spacing
from runtime.config import ScheduleConfig
from runtime.sampler import SamplingPlan
from runtime.schedule import build_schedule
from runtime.settings import SamplingSettings, SettingsError


@pytest.mark.parametrize(("changes", "field", "text"), [
    ({"steps": 0}, "steps", "steps must be an integer >= 1, got 0"),
    ({"steps": 2.0}, "steps", "steps must be an integer >= 1"),
    ({"steps": True}, "steps", "steps must be an integer >= 1"),
    ({"eta": -0.1}, "eta", "eta must be a finite number >= 0"),
    ({"eta": float("nan")}, "eta", "eta must be a finite number >= 0"),
    ({"eta": "0.5"}, "eta", "eta must be a finite number >= 0"),
    ({"solver": "euler"}, "solver", "unknown solver 'euler'; allowed: ddim, dpmpp-2m"),
    ({"spacing": "even"}, "spacing", "unknown spacing 'even'; allowed: uniform"),
    ({"clip_x0": "yes"}, "clip_x0", "clip_x0 must be true, false or unset"),
    ({"solver": "dpmpp-2m", "eta": 0.5}, "eta", "solver dpmpp-2m is deterministic: eta must be 0"),
])
def test_each_rule_is_one_error_naming_its_field(changes, field, text):
    with pytest.raises(SettingsError, match=text) as caught:
        SamplingSettings(**changes)
    assert caught.value.field == field and isinstance(caught.value, ValueError)


def test_values_are_normalised_frozen_and_hashable():
    s = SamplingSettings(steps=np.int64(7), eta=1)
    assert (type(s.steps), type(s.eta)) == (int, float) and s == SamplingSettings(7, 1.0)
    assert hash(s) == hash(SamplingSettings(7, 1.0))
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = 3  # type: ignore[misc]
    assert SamplingSettings.of(s, solver="dpmpp-2m", eta=0) == SamplingSettings(7, 0.0, "dpmpp-2m")
    assert SamplingSettings.of() == SamplingSettings() and SamplingSettings.of(s) is s
    with pytest.raises(TypeError, match="unknown sampling setting.*stepz"):
        SamplingSettings.of(stepz=3)
    with pytest.raises(SettingsError, match="eta"):
        SamplingSettings.of(SamplingSettings(solver="dpmpp-2m"), eta=0.3)


def test_model_rules_are_checked_where_the_plan_is_built_and_name_the_field():
    linear = build_schedule(ScheduleConfig(name="linear", num_timesteps=100))
    with pytest.raises(SettingsError, match="steps 101 is more than .*T=100") as caught:
        SamplingPlan.build(linear, SamplingSettings(101))
    assert caught.value.field == "steps"
    continuous = build_schedule(ScheduleConfig())
    with pytest.raises(SettingsError, match="needs a discrete schedule") as caught:
        SamplingPlan.build(continuous, SamplingSettings(10, spacing="trailing"))
    assert caught.value.field == "spacing"
    assert len(SamplingPlan.build(linear, SamplingSettings(100))) == 100


def test_ddim_run_flags_are_the_fields(tmp_path):
    from click.testing import CliRunner

    from runtime.cli import main

    flags = {o for p in main.params for o in p.opts}
    for f in dataclasses.fields(SamplingSettings):
        assert "--" + f.name.replace("_", "-") in flags
    help_text = CliRunner().invoke(main, ["--help"]).output
    assert "Sampling steps: network evaluations per image." in help_text and "[default: 50]" in help_text
    assert "|".join(values(Spacing)) in help_text
    result = CliRunner().invoke(main, [str(tmp_path), "--steps", "3", "--solver", "dpmpp-2m", "--eta", "0.5"])
    assert result.exit_code == 2
    assert "Invalid value for '--eta': --solver dpmpp-2m is deterministic: --eta must be 0, got 0.5" in result.output


def test_sampler_takes_settings_or_keywords_and_plans_once(tiny_sampler):
    s = SamplingSettings(steps=3, eta=0.5)
    a = tiny_sampler.sample(3, s, seed=4, batch_size=2)
    b = tiny_sampler.sample(3, steps=3, eta=0.5, seed=4, batch_size=3)
    np.testing.assert_array_equal(a.samples, b.samples)
    assert a.settings == tiny_sampler.resolve(s) and a.settings.spacing == "uniform" and a.settings.clip_x0 is False
    assert tiny_sampler.plan(s) is tiny_sampler.plan(a.settings)  # built once, reused
    with pytest.raises(SettingsError, match="eta"):
        tiny_sampler.sample(1, s, solver="dpmpp-2m")


@pytest.fixture(scope="module")
def tiny_sampler():
    from runtime.api import Sampler
    from runtime.config import KerasUNetConfig, ModelSpec, NormalizationConfig

    spec = ModelSpec(KerasUNetConfig(image_size=8, channels=1, widths=(8, 8), block_depth=1), ScheduleConfig(),
                     NormalizationConfig(mean=(0.5,), std=(0.5,)))

    class Fake:
        name, device, precision = "fake", "cpu", "fp32"

        def __init__(self) -> None:
            self.spec = spec

        def denoise(self, x, cond):
            return (0.1 * x * cond).astype(np.float32)

        from_host = to_host = staticmethod(lambda a: a)
        is_finite = staticmethod(lambda a: bool(np.isfinite(a).all()))
        clip_bounds = staticmethod(lambda lo, hi: (lo, hi))

    return Sampler(Fake())  # type: ignore[arg-type]
