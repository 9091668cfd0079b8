"""Our schedules against diffusers' beta schedules: names, betas, alphas_cumprod and the scheduler defaults
export.from_diffusers fills in (the schedule half of ddim-export of a diffusers folder)."""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm  # noqa: E402
from diffusers import DDIMScheduler, DDPMScheduler  # noqa: E402

from export.from_diffusers import SCHEDULER_DEFAULTS  # noqa: E402
from runtime.config import ScheduleConfig  # noqa: E402
from runtime.schedule import build_schedule, cosine_betas, linear_betas, scaled_linear_betas  # noqa: E402


def test_cosine_is_diffusers_squaredcos_cap_v2_to_1e12(monkeypatch):
    """diffusers' own betas_for_alpha_bar, its float64 values captured before its float32 cast."""
    monkeypatch.setattr(scheduling_ddpm, "torch", SimpleNamespace(
        tensor=lambda data, dtype=None: np.asarray(data, dtype=np.float64), float32=None))
    for T in (50, 1000, 4000):
        theirs_betas = scheduling_ddpm.betas_for_alpha_bar(T)
        np.testing.assert_allclose(cosine_betas(T, 0.008), theirs_betas, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,ours_fn", [("linear", linear_betas), ("scaled_linear", scaled_linear_betas)])
def test_linear_schedules_match_diffusers(name, ours_fn):
    """diffusers computes these with torch.linspace in float32: the formula is checked in float64 to 1e-15, the
    float32 betas diffusers uses to one float32 rounding (relative 2**-23 ~ 1.2e-7, two of them for the square)."""
    start, end, T = 0.00085, 0.012, 1000
    ours_betas = ours_fn(T, start, end)
    if name == "linear":
        f64 = torch.linspace(start, end, T, dtype=torch.float64).numpy()
    else:
        f64 = (torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2).numpy()
    np.testing.assert_allclose(ours_betas, f64, rtol=1e-15, atol=0)
    f32 = DDPMScheduler(num_train_timesteps=T, beta_start=start, beta_end=end, beta_schedule=name).betas.double()
    np.testing.assert_allclose(ours_betas, f32.numpy(), rtol=3 * 2.0**-24 * (1 if name == "linear" else 2), atol=0)


def test_alphas_cumprod_agree_to_float32_accumulation():
    """Our float64 alpha_bar against diffusers' float32 cumprod: what the peer test's residual comes from."""
    for theirs_name, ours_name in (("linear", "linear"), ("squaredcos_cap_v2", "cosine")):
        ref = DDIMScheduler(beta_schedule=theirs_name).alphas_cumprod.double().numpy()
        got = build_schedule(ScheduleConfig(name=ours_name)).alphas_cumprod  # type: ignore[attr-defined]
        rel = float((np.abs(got - ref) / got).max())
        print(f"alphas_cumprod {theirs_name}: max relative difference {rel:.3g}")
        assert rel < 5e-5


def test_scheduler_defaults_are_diffusers_defaults():
    """Fields an older scheduler_config.json may lack take diffusers' own defaults."""
    for cls in (DDPMScheduler, DDIMScheduler):
        params = inspect.signature(cls.__init__).parameters
        for key, value in SCHEDULER_DEFAULTS.items():
            assert params[key].default == value, (cls.__name__, key)
