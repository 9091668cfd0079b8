"""Properties of the schedules, the step selection and the DDIM update (hypothesis)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.config import ConfigError, ScheduleConfig
from runtime.schedule import (
    DISCRETE_ONLY_SPACINGS,
    SPACINGS,
    build_schedule,
    ddim_step,
    noise_variance,
    predict_x0,
    select_steps,
    signal_rate,
    step_coefficients,
)

SCHEDULES = {name: build_schedule(ScheduleConfig(name=name)) for name in ("cosine-angle", "linear", "cosine")}
DISCRETE = [n for n, s in SCHEDULES.items() if s.discrete]


def all_steps(schedule):
    if schedule.discrete:
        return np.arange(schedule.num_timesteps)
    return np.linspace(0.0, 1.0, 2001)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_alpha_bar_strictly_decreasing_in_unit_interval(name):
    a = SCHEDULES[name].alpha_bar(all_steps(SCHEDULES[name]))
    assert np.all(a > 0) and np.all(a <= 1)
    assert np.all(np.diff(a) < 0)


def test_schedule_endpoints_match_their_papers():
    keras = SCHEDULES["cosine-angle"]
    assert signal_rate(keras, np.array([0.0, 1.0])) == pytest.approx([0.95, 0.02])
    linear = SCHEDULES["linear"]
    assert linear.betas[0] == pytest.approx(1e-4) and linear.betas[-1] == pytest.approx(0.02)
    assert noise_variance(linear, np.array([0]))[0] == pytest.approx(1e-4)
    # Nichol & Dhariwal: alpha_bar(0) = f(1/T)/f(0) is just below 1, and the last is ~0.
    cosine = SCHEDULES["cosine"]
    assert 0.999 < cosine.alpha_bar(np.array([0]))[0] < 1
    assert cosine.alpha_bar(np.array([999]))[0] < 1e-4


def test_steps_out_of_range_are_refused():
    with pytest.raises(ValueError, match="0..999"):
        SCHEDULES["linear"].alpha_bar(np.array([1000]))
    with pytest.raises(ValueError, match="integers"):
        SCHEDULES["linear"].alpha_bar(np.array([0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        SCHEDULES["cosine-angle"].alpha_bar(np.array([1.5]))


@settings(max_examples=300, deadline=None)
@given(name=st.sampled_from(DISCRETE), spacing=st.sampled_from(SPACINGS), data=st.data())
def test_discrete_selected_steps_strictly_decreasing_in_range(name, spacing, data):
    schedule = SCHEDULES[name]
    total = schedule.num_timesteps
    n = data.draw(st.one_of(st.integers(1, total), st.sampled_from([1, 2, total - 1, total])))
    steps = select_steps(schedule, n, spacing)
    assert len(steps) == n
    assert steps.dtype.kind == "i"
    assert np.all(np.diff(steps) < 0)
    assert steps.min() >= 0 and steps.max() <= total - 1


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 5000), spacing=st.sampled_from(["uniform", "quadratic"]))
def test_continuous_selected_steps_strictly_decreasing_in_range(n, spacing):
    steps = select_steps(SCHEDULES["cosine-angle"], n, spacing)
    assert len(steps) == n
    assert np.all(np.diff(steps) < 0)
    assert steps[0] == 1.0 and steps[-1] > 0.0


def test_spacings_match_reference_implementations():
    linear = SCHEDULES["linear"]
    # Official DDIM code, skip_type='uniform', 10 steps of T=1000: range(0, 1000, 100).
    assert list(select_steps(linear, 10, "uniform")) == list(range(900, -1, -100))
    # skip_type='quadratic': (linspace(0, sqrt(800), 10) ** 2).astype(int).
    expected = (np.linspace(0, np.sqrt(800), 10) ** 2).astype(int)[::-1]
    assert list(select_steps(linear, 10, "quadratic")) == list(expected)
    # diffusers DDIMScheduler, 10 steps: trailing [999, 899, ..., 99], linspace rounds [999, 888, ..., 0].
    assert list(select_steps(linear, 10, "trailing")) == list(range(999, 0, -100))
    assert list(select_steps(linear, 10, "linspace")) == list(np.linspace(0, 999, 10).round().astype(int)[::-1])
    # The Keras example's reverse diffusion: t = 1, 1 - 1/S, ..., 1/S.
    assert select_steps(SCHEDULES["cosine-angle"], 4) == pytest.approx([1.0, 0.75, 0.5, 0.25])


def test_bad_step_requests_are_refused_with_what_is_allowed():
    with pytest.raises(ValueError, match="T=1000"):
        select_steps(SCHEDULES["linear"], 1001)
    with pytest.raises(ValueError, match=">= 1"):
        select_steps(SCHEDULES["linear"], 0)
    with pytest.raises(ValueError, match="allowed: uniform"):
        select_steps(SCHEDULES["linear"], 10, "bogus")  # type: ignore[arg-type]
    for spacing in DISCRETE_ONLY_SPACINGS:
        with pytest.raises(ValueError, match="discrete"):
            select_steps(SCHEDULES["cosine-angle"], 10, spacing)


alpha_pairs = st.tuples(st.floats(1e-4, 0.9999), st.floats(0.0, 1.0)).map(
    lambda p: (p[0], p[0] + (1 - p[0]) * p[1])
)


@settings(max_examples=300, deadline=None)
@given(pair=alpha_pairs, seed=st.integers(0, 2**16))
def test_true_noise_recovers_x0(pair, seed):
    a_t, _ = pair
    rng = np.random.default_rng(seed)
    x0, eps = rng.standard_normal((2, 3, 4, 4))
    x_t = math.sqrt(a_t) * x0 + math.sqrt(1 - a_t) * eps
    np.testing.assert_allclose(predict_x0(x_t, eps, a_t), x0, rtol=0, atol=1e-9)


@settings(max_examples=300, deadline=None)
@given(pair=alpha_pairs, seed=st.integers(0, 2**16))
def test_eta_zero_is_deterministic_and_has_no_noise(pair, seed):
    a_t, a_prev = pair
    coef = step_coefficients(a_t, a_prev, eta=0.0)
    assert coef.sigma == 0.0
    rng = np.random.default_rng(seed)
    x_t, eps = rng.standard_normal((2, 2, 3, 3))
    first, _ = ddim_step(x_t, eps, coef)
    again, _ = ddim_step(x_t.copy(), eps.copy(), coef)
    np.testing.assert_array_equal(first, again)
    # With the true noise, the deterministic step lands exactly on the forward process at a_prev.
    x0 = predict_x0(x_t, eps, a_t)
    np.testing.assert_allclose(first, math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, atol=1e-9)


@settings(max_examples=300, deadline=None)
@given(a_prev=st.floats(1e-3, 1.0), beta=st.floats(1e-5, 0.5))
def test_eta_one_sigma_is_ddpm_posterior_std(a_prev, beta):
    a_t = a_prev * (1 - beta)  # one DDPM step: alpha_bar_t = alpha_bar_{t-1} * (1 - beta_t)
    posterior_var = (1 - a_prev) / (1 - a_t) * beta  # DDPM Eq. 7, beta-tilde
    assert step_coefficients(a_t, a_prev, eta=1.0).sigma == pytest.approx(math.sqrt(posterior_var), rel=1e-9, abs=1e-15)


def test_final_step_to_alpha_one_returns_pred_x0():
    rng = np.random.default_rng(0)
    x_t, eps = rng.standard_normal((2, 1, 2, 2))
    for eta in (0.0, 1.0):
        coef = step_coefficients(0.3, 1.0, eta)
        x_prev, pred_x0 = ddim_step(x_t, eps, coef, noise=rng.standard_normal(x_t.shape))
        np.testing.assert_allclose(x_prev, pred_x0, atol=1e-12)


def test_stochastic_step_needs_noise_and_bad_eta_is_refused():
    coef = step_coefficients(0.5, 0.6, eta=1.0)
    with pytest.raises(ValueError, match="noise"):
        ddim_step(np.zeros(3), np.zeros(3), coef)
    with pytest.raises(ValueError, match="eta"):
        step_coefficients(0.5, 0.6, eta=-0.1)


def test_clipping_bounds_pred_x0_and_keeps_update_consistent():
    rng = np.random.default_rng(0)
    x_t, eps = 3 * rng.standard_normal((2, 1, 4, 4))
    coef = step_coefficients(0.2, 0.5, eta=0.0)
    x_prev, x0 = ddim_step(x_t, eps, coef, clip_x0=(-1.0, 1.0))
    assert x0.min() >= -1 and x0.max() <= 1
    # eps is re-derived from the clipped x0, so x_t = sqrt(a) x0 + sqrt(1 - a) eps still holds.
    eps_used = (x_t - math.sqrt(0.2) * x0) / math.sqrt(0.8)
    np.testing.assert_allclose(x_prev, math.sqrt(0.5) * x0 + math.sqrt(0.5) * eps_used, atol=1e-12)


def test_schedule_config_refuses_unknown_names():
    with pytest.raises(ConfigError, match="allowed: cosine-angle, linear, cosine"):
        ScheduleConfig(name="sigmoid")  # type: ignore[arg-type]


def test_scaled_linear_is_linear_in_sqrt_beta():
    sched = build_schedule(ScheduleConfig(name="scaled-linear", beta_start=0.00085, beta_end=0.012))
    root = np.sqrt(sched.betas)
    assert root[0] == pytest.approx(math.sqrt(0.00085)) and root[-1] == pytest.approx(math.sqrt(0.012))
    np.testing.assert_allclose(np.diff(root), (root[-1] - root[0]) / 999, rtol=1e-9)
