"""The shared DDIM loop: oracle denoisers, numpy/torch agreement, seeding, non-finite checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from runtime.config import ScheduleConfig
from runtime.noise import ImageNoise
from runtime.settings import SamplingSettings
from runtime.sampler import NonFiniteError, SamplerHooks, SamplingPlan, ddim_sample, numpy_is_finite
from runtime.schedule import build_schedule


def oracle(x0: np.ndarray):
    """A denoiser that knows the clean image: returns the exact noise of x_t."""

    def denoise(x, noise_var):
        a = 1.0 - noise_var
        return (x - math.sqrt(a) * x0) / math.sqrt(1.0 - a)

    return denoise


@pytest.mark.parametrize("name,spacing", [("cosine-angle", "uniform"), ("linear", "trailing"), ("cosine", "quadratic")])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_oracle_denoiser_lands_on_x0_for_any_plan(name, spacing, steps):
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((2, 1, 4, 4))
    plan = SamplingPlan.build(build_schedule(ScheduleConfig(name=name)), SamplingSettings(steps, eta=0.0, spacing=spacing))
    out = ddim_sample(rng.standard_normal(x0.shape), plan, SamplerHooks(denoise=oracle(x0)))
    np.testing.assert_allclose(out, x0, atol=1e-8)


def test_plan_ends_on_clean_image_and_conditions_on_noise_variance():
    schedule = build_schedule(ScheduleConfig(name="linear"))
    plan = SamplingPlan.build(schedule, SamplingSettings(10, spacing="trailing"))
    assert plan.steps[-1].coef.a_prev == 1.0
    assert plan.steps[0].noise_var == pytest.approx(1 - schedule.alpha_bar(np.array([999]))[0])
    assert [s.coef.a_prev for s in plan.steps[:-1]] == [s.coef.a_t for s in plan.steps[1:]]


def test_timestep_conditioned_plans_give_the_network_the_integer_step():
    schedule = build_schedule(ScheduleConfig(name="linear"))
    plan = SamplingPlan.build(schedule, SamplingSettings(10, spacing="trailing"), conditioning="timestep")
    assert [s.cond for s in plan] == [s.t for s in plan] == list(range(999, -1, -100))
    assert all(s.noise_var == pytest.approx(1 - schedule.alpha_bar(np.array([int(s.t)]))[0]) for s in plan)
    assert [s.cond for s in SamplingPlan.build(schedule, SamplingSettings(10, spacing="trailing"))] == [s.noise_var for s in plan]
    with pytest.raises(ValueError, match="needs a discrete schedule"):
        SamplingPlan.build(build_schedule(ScheduleConfig()), SamplingSettings(10), conditioning="timestep")


def test_numpy_and_torch_run_the_same_update():
    """The eager PyTorch sampler uses this very loop: same inputs, same numbers."""
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    w = 0.3

    plan = SamplingPlan.build(build_schedule(ScheduleConfig()), SamplingSettings(20, eta=0.5))
    noise_np, noise_t = ImageNoise(7, [0, 1]), ImageNoise(7, [0, 1])
    out_np = ddim_sample(x_T, plan, SamplerHooks(denoise=lambda x, v: w * x * v,
                                                 noise_like=lambda x, i: noise_np.draw((1, 4, 4))))
    out_t = ddim_sample(torch.from_numpy(x_T), plan, SamplerHooks(
        denoise=lambda x, v: w * x * v, noise_like=lambda x, i: torch.from_numpy(noise_t.draw((1, 4, 4)))))
    np.testing.assert_allclose(out_np, out_t.numpy(), rtol=1e-5, atol=1e-6)


def test_image_noise_is_per_image_and_batch_independent():
    whole = ImageNoise(5, range(4))
    first, second = whole.draw((1, 2, 2)), whole.draw((1, 2, 2))
    halves = [ImageNoise(5, [0, 1]), ImageNoise(5, [2, 3])]
    np.testing.assert_array_equal(first, np.concatenate([h.draw((1, 2, 2)) for h in halves]))
    np.testing.assert_array_equal(second, np.concatenate([h.draw((1, 2, 2)) for h in halves]))
    assert not np.array_equal(ImageNoise(6, [0]).draw((1, 2, 2)), first[:1])


def test_stochastic_plan_needs_a_noise_source():
    plan = SamplingPlan.build(build_schedule(ScheduleConfig()), SamplingSettings(5, eta=1.0))
    assert plan.stochastic
    with pytest.raises(ValueError, match="noise"):
        ddim_sample(np.zeros((1, 1, 2, 2)), plan, SamplerHooks(denoise=lambda x, v: x))


def test_non_finite_output_names_the_step():
    plan = SamplingPlan.build(build_schedule(ScheduleConfig()), SamplingSettings(10))
    calls = []

    def denoise(x, v):
        calls.append(v)
        return x * (np.inf if len(calls) == 4 else 0.1)

    with pytest.raises(NonFiniteError, match="step 4/10.*float32"):
        ddim_sample(np.ones((1, 1, 2, 2)), plan, SamplerHooks(denoise=denoise, is_finite=numpy_is_finite))
