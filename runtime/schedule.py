"""Noise schedules, sampling-step selection and the DDIM update (numpy float64, torch-free).

Notation (as in Song et al. 2021, "Denoising Diffusion Implicit Models", and
openai/improved-diffusion's ``gaussian_diffusion.py``):

===============  ===========================================================
``t``            a step: an integer index 0..T-1 for discrete schedules, a
                 float in [0, 1] for the continuous ``cosine-angle`` schedule
``alpha_bar``    cumulative signal variance at step t (``alpha_t`` in DDIM's
                 notation); the noisy image is
                 ``x_t = sqrt(alpha_bar) * x_0 + sqrt(1 - alpha_bar) * eps``
``signal_rate``  ``sqrt(alpha_bar)``
``noise_rate``   ``sqrt(1 - alpha_bar)``
``noise_var``    ``1 - alpha_bar``: what a noise-variance-conditioned denoiser sees
                 (a timestep-conditioned one sees ``t`` itself)
``a_t, a_prev``  alpha_bar at the current step and at the next, less noisy one
``pred_x0``      the denoised image predicted from x_t and the predicted noise
``eta``          0 = deterministic DDIM, 1 = DDPM-like ancestral sampling
``sigma``        standard deviation of the fresh noise added by one step
===============  ===========================================================

Schedule names are append-only: never change what an existing name means.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, TypeVar, get_args

import numpy as np
from numpy.typing import NDArray

from runtime.choices import Spacing
from runtime.config import ScheduleConfig
from runtime.settings import SettingsError, check_eta, check_spacing, check_steps

SPACINGS: tuple[str, ...] = get_args(Spacing)
# Spacings defined only over the integer steps of a discrete schedule (diffusers' DDIMScheduler).
DISCRETE_ONLY_SPACINGS = ("leading", "trailing", "linspace")

F64 = NDArray[np.float64]


class Schedule(Protocol):
    """What every schedule answers: noise variance and signal rate at given steps."""

    name: str
    discrete: bool
    num_timesteps: int | None  # T for discrete schedules, None for continuous time

    def alpha_bar(self, t: NDArray) -> F64: ...


class DiscreteSchedule:
    """A schedule over integer steps 0..T-1 given by its betas (DDPM, Ho et al. 2020)."""

    discrete = True

    def __init__(self, name: str, betas: F64) -> None:
        if betas.ndim != 1 or not np.all((betas > 0) & (betas < 1)):
            raise ValueError(f"schedule {name!r}: betas must be a 1-D array in (0, 1)")
        self.name = name
        self.betas = betas
        self.num_timesteps: int | None = len(betas)
        self.alphas_cumprod = np.cumprod(1.0 - betas)

    def alpha_bar(self, t: NDArray) -> F64:
        idx = np.asarray(t)
        if not np.issubdtype(idx.dtype, np.integer):
            raise ValueError(f"schedule {self.name!r} is discrete: steps must be integers")
        if idx.size and (idx.min() < 0 or idx.max() >= len(self.betas)):
            raise ValueError(f"schedule {self.name!r}: steps must lie in 0..{len(self.betas) - 1}")
        return self.alphas_cumprod[idx]


class CosineAngleSchedule:
    """The Keras DDIM example's continuous schedule: signal_rate = cos(angle), angle linear in t.

    At t = 0 the signal rate is ``max_signal_rate``, at t = 1 it is ``min_signal_rate``.
    """

    name = "cosine-angle"
    discrete = False
    num_timesteps: int | None = None

    def __init__(self, min_signal_rate: float, max_signal_rate: float) -> None:
        if not 0.0 < min_signal_rate < max_signal_rate <= 1.0:
            raise ValueError("cosine-angle needs 0 < min_signal_rate < max_signal_rate <= 1")
        self.start_angle = math.acos(max_signal_rate)
        self.end_angle = math.acos(min_signal_rate)

    def alpha_bar(self, t: NDArray) -> F64:
        tt = np.asarray(t, dtype=np.float64)
        if tt.size and (tt.min() < 0.0 or tt.max() > 1.0):
            raise ValueError("schedule 'cosine-angle': steps must lie in [0, 1]")
        angles = self.start_angle + tt * (self.end_angle - self.start_angle)
        return np.cos(angles) ** 2


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> F64:
    """DDPM's linear betas (Ho et al. 2020, Sec. 4)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> F64:
    """Linear in sqrt(beta) (diffusers' ``scaled_linear``, the latent-diffusion schedule)."""
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, s: float, max_beta: float = 0.999) -> F64:
    """Nichol & Dhariwal 2021, Eq. 17: alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s) pi/2).

    Betas are clipped to ``max_beta`` to avoid a singularity at t = T (their Sec. 3.2).
    """

    def f(t: F64) -> F64:
        return np.cos((t / num_timesteps + s) / (1 + s) * math.pi / 2) ** 2

    steps = np.arange(num_timesteps, dtype=np.float64)
    betas = 1.0 - f(steps + 1) / f(steps)
    return np.minimum(betas, max_beta)


def build_schedule(cfg: ScheduleConfig) -> Schedule:
    """The schedule a config names (registry below; names are append-only)."""
    if cfg.name == "cosine-angle":
        return CosineAngleSchedule(cfg.min_signal_rate, cfg.max_signal_rate)
    if cfg.name == "linear":
        return DiscreteSchedule("linear", linear_betas(cfg.num_timesteps, cfg.beta_start, cfg.beta_end))
    if cfg.name == "cosine":
        return DiscreteSchedule("cosine", cosine_betas(cfg.num_timesteps, cfg.cosine_s))
    if cfg.name == "scaled-linear":
        return DiscreteSchedule("scaled-linear", scaled_linear_betas(cfg.num_timesteps, cfg.beta_start, cfg.beta_end))
    raise ValueError(f"unknown schedule {cfg.name!r}")  # ScheduleConfig already validated the name


def noise_variance(schedule: Schedule, t: NDArray) -> F64:
    """``1 - alpha_bar``: the denoiser's conditioning input."""
    return 1.0 - schedule.alpha_bar(t)


def signal_rate(schedule: Schedule, t: NDArray) -> F64:
    """``sqrt(alpha_bar)``."""
    return np.sqrt(schedule.alpha_bar(t))


# --------------------------------------------------------------------------- step selection

# A plan is built up front (a few hundred bytes per step), and DDIM samples stop improving long before
# 1,000 steps (the DDPM chain itself has T = 1000): 10x that bounds the plan at a few MB instead of
# letting a typo such as --steps 100000000 allocate gigabytes.
MAX_CONTINUOUS_STEPS = 10_000


def select_steps(schedule: Schedule, num_steps: int, spacing: Spacing = "uniform") -> NDArray:
    """The steps a sampler visits, noisiest first, strictly decreasing.

    Discrete schedules return integer indices in 0..T-1 and accept 1 <= num_steps <= T:

    - ``uniform``: every (T // S)-th step from 0 (the official DDIM code's ``skip_type='uniform'``,
      truncated to exactly S steps; equal to diffusers' ``leading``).
    - ``quadratic``: ``floor((i / (S-1))^2 * 0.8 T)`` as in the DDIM code; where flooring would
      repeat a step, the next free step is taken, so the count is always S.
    - ``leading`` / ``trailing`` / ``linspace``: diffusers' DDIMScheduler ``timestep_spacing``
      (``steps_offset = 0``).

    The continuous schedule returns times in (0, 1] for 1 <= num_steps <= MAX_CONTINUOUS_STEPS:
    ``uniform`` gives 1, 1 - 1/S, ..., 1/S (the Keras example's reverse diffusion), ``quadratic``
    ((S - i)/S)^2.
    """
    spacing = check_spacing(spacing)
    num_steps = check_steps(num_steps)
    check_num_steps(schedule, num_steps)
    if not schedule.discrete:
        return _continuous_steps(num_steps, spacing)
    assert schedule.num_timesteps is not None  # discrete schedules always have T  # noqa: S101 (invariant)
    return _discrete_steps(schedule.num_timesteps, int(num_steps), spacing)


def check_num_steps(schedule: Schedule, num_steps: int) -> None:
    """Refuse a step count the schedule cannot take, before anything is allocated for it.

    Discrete schedules have T distinct steps: more would repeat steps, so they are refused. The
    continuous schedule takes at most :data:`MAX_CONTINUOUS_STEPS`.
    """
    total = schedule.num_timesteps if schedule.discrete else None
    if total is not None and num_steps > total:
        raise SettingsError("steps", f"steps {num_steps} is more than the {schedule.name!r} schedule's "
                                     f"T={total} timesteps; use at most {total}")
    if total is None and num_steps > MAX_CONTINUOUS_STEPS:
        raise SettingsError("steps", f"steps {num_steps} is more than {MAX_CONTINUOUS_STEPS:,}, the most the "
                                     f"continuous {schedule.name!r} schedule takes")


def _continuous_steps(num_steps: int, spacing: Spacing) -> F64:
    if spacing in DISCRETE_ONLY_SPACINGS:
        raise SettingsError(
            "spacing", f"spacing {spacing!r} needs a discrete schedule; continuous schedules allow: uniform, quadratic"
        )
    frac = (num_steps - np.arange(num_steps, dtype=np.float64)) / num_steps  # 1, ..., 1/S
    return frac**2 if spacing == "quadratic" else frac


def _discrete_steps(total: int, num_steps: int, spacing: Spacing) -> NDArray[np.int64]:
    idx = np.arange(num_steps)
    if spacing in ("uniform", "leading"):
        ascending = idx * (total // num_steps)
    elif spacing == "quadratic":
        raw = np.floor(np.linspace(0.0, math.sqrt(total * 0.8), num_steps) ** 2).astype(np.int64)
        # Smallest strictly increasing sequence >= raw; stays <= T-1 because raw ends at 0.8 T.
        ascending = np.maximum.accumulate(raw - idx) + idx
    elif spacing == "trailing":
        ascending = (np.round(total - idx * (total / num_steps)) - 1)[::-1]
    else:  # linspace
        ascending = np.linspace(0, total - 1, num_steps).round()
    return np.asarray(ascending, dtype=np.int64)[::-1].copy()


# --------------------------------------------------------------------------- the DDIM update


@dataclass(frozen=True)
class StepCoefficients:
    """Scalars of one DDIM step from a_t to a_prev (float64, computed once per step)."""

    a_t: float
    a_prev: float
    sigma: float
    eps_scale: float  # sqrt(1 - a_prev - sigma^2): the "direction pointing to x_t" (Eq. 12)


def step_coefficients(a_t: float, a_prev: float, eta: float) -> StepCoefficients:
    """sigma of Eq. 16 and the direction scale of Eq. 12 for one step."""
    eta = check_eta(eta)
    if not (0.0 < a_t < 1.0 and a_t <= a_prev <= 1.0):
        raise ValueError(f"need 0 < a_t < 1 and a_t <= a_prev <= 1, got a_t={a_t}, a_prev={a_prev}")
    # Eq. 16: sigma_t(eta) = eta * sqrt((1 - a_prev) / (1 - a_t)) * sqrt(1 - a_t / a_prev)
    sigma = eta * math.sqrt((1.0 - a_prev) / (1.0 - a_t)) * math.sqrt(1.0 - a_t / a_prev)
    # eta > 1 can make sigma^2 exceed 1 - a_prev; clamp so the square root stays real.
    eps_scale = math.sqrt(max(1.0 - a_prev - sigma**2, 0.0))
    return StepCoefficients(float(a_t), float(a_prev), float(sigma), eps_scale)


def inverse_coefficients(a_now: float, a_next: float) -> StepCoefficients:
    """Scalars of one DDIM inversion step, from a_now up to the noisier a_next (0 < a_next <= a_now <= 1): the
    deterministic update of Eq. 12 run the other way, so :func:`ddim_step` applies it unchanged
    (pred_x0 from a_now, then sqrt(a_next) * pred_x0 + sqrt(1 - a_next) * eps)."""
    if not (0.0 < a_next <= a_now <= 1.0):
        raise ValueError(f"need 0 < a_next <= a_now <= 1, got a_now={a_now}, a_next={a_next}")
    return StepCoefficients(float(a_now), float(a_next), 0.0, math.sqrt(1.0 - a_next))


A = TypeVar("A")  # numpy arrays or torch tensors: the update uses only arithmetic and .clip


def predict_x0(x_t: A, eps: A, a_t: float) -> A:
    """pred_x0 = (x_t - sqrt(1 - a_t) * eps) / sqrt(a_t)   (Eq. 12, first term)."""
    return (x_t - math.sqrt(1.0 - a_t) * eps) / math.sqrt(a_t)  # type: ignore[operator]


def ddim_step(
    x_t: A,
    eps: A,
    coef: StepCoefficients,
    noise: A | None = None,
    clip_x0: tuple[object, object] | None = None,
) -> tuple[A, A]:
    """One DDIM update (Eq. 12): returns (x_prev, pred_x0).

    Works on numpy arrays and torch tensors alike (only arithmetic and ``.clip``), so the
    eager PyTorch sampler and the torch-free runtime share this one implementation.
    ``noise`` is required when ``coef.sigma > 0``. With ``clip_x0 = (lo, hi)`` pred_x0 is
    clipped and eps recomputed from the clipped pred_x0, as diffusers' DDIMScheduler does.
    """
    pred_x0 = predict_x0(x_t, eps, coef.a_t)
    if clip_x0 is not None:
        pred_x0 = pred_x0.clip(*clip_x0)  # type: ignore[attr-defined]
        eps = (x_t - math.sqrt(coef.a_t) * pred_x0) / math.sqrt(1.0 - coef.a_t)  # type: ignore[operator]
    x_prev = math.sqrt(coef.a_prev) * pred_x0 + coef.eps_scale * eps  # type: ignore[operator]
    if coef.sigma > 0.0:
        if noise is None:
            raise ValueError("eta > 0: this step needs fresh noise")
        x_prev = x_prev + coef.sigma * noise  # type: ignore[operator]
    return x_prev, pred_x0
