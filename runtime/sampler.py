"""The sampling loop, shared by every backend (numpy arrays or torch tensors).

The loop knows nothing of the network: it calls ``denoise(x, cond) -> eps`` once per step (``cond`` is
the step's noise variance or its timestep, as the model's config says) and applies the plan's solver:
:func:`runtime.schedule.ddim_step` (DDIM) or :func:`runtime.dpm_solver.dpmpp_2m_step` (DPM-Solver++(2M),
which also carries the previous step's pred_x0). Backends supply the denoiser, the initial noise
and, for eta > 0, fresh noise per step; array creation stays with them, so the loop never
moves buffers between host and device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Generic, Iterator, TypeVar

import numpy as np
from numpy.typing import NDArray

from runtime.choices import Solver
from runtime.config import Conditioning
from runtime.dpm_solver import MultistepCoefficients, dpmpp_2m_step, multistep_coefficients
from runtime.settings import SamplingSettings, SettingsError
from runtime.schedule import (Schedule, Spacing, StepCoefficients, ddim_step, inverse_coefficients, select_steps,
                              step_coefficients)

A = TypeVar("A")


class NonFiniteError(RuntimeError):
    """Sampling produced NaN or Inf ``where`` (a step of the plan); the advice depends on the ``precision`` the
    network ran in (None: not known)."""

    def __init__(self, where: str, precision: str | None = None) -> None:
        self.where, self.precision = where, precision
        super().__init__(f"non-finite values {where}: {nonfinite_advice(precision)}")

    def __reduce__(self) -> tuple[type, tuple[str, str | None]]:  # pickled (serving's replicas) by its fields
        return type(self), (self.where, self.precision)


def nonfinite_advice(precision: str | None) -> str:
    """What NaN or Inf out of the network means: in float32 the model itself (its weights or inputs) is broken; in a
    reduced precision an overflow, which float32 avoids."""
    if precision == "fp32":
        return ("the model produced NaN or infinite values in float32: its weights (or inputs) are broken, not its "
                "precision; export it again from a healthy checkpoint")
    if precision is not None:
        return f"the model overflowed in {precision}: try float32 precision (--precision fp32)"
    return ("the model produced NaN or infinite values: broken weights, or an overflow of a reduced precision "
            "(fp16, int8: try float32 precision)")


@dataclass(frozen=True)
class PlannedStep:
    """One step of a sampling plan: where it starts, what the network sees, the update's scalars."""

    index: int  # 0-based position in the plan
    t: float  # the schedule's step (index or time)
    noise_var: float  # 1 - a_t
    coef: StepCoefficients
    cond: float  # what the network is given: noise_var, or t for timestep-conditioned models
    multistep: MultistepCoefficients | None = None  # DPM-Solver++(2M)'s scalars (None under DDIM)


@dataclass(frozen=True)
class SamplingPlan:
    """The steps of one DDIM run, noisiest first; the last step lands on a_prev = 1 (pred_x0)."""

    steps: tuple[PlannedStep, ...]
    eta: float
    solver: Solver = "ddim"

    @classmethod
    def build(cls, schedule: Schedule, settings: SamplingSettings,
              conditioning: Conditioning = "noise_variance") -> "SamplingPlan":
        """The plan of ``settings`` on ``schedule``; :class:`runtime.settings.SettingsError` before anything is
        allocated when the schedule cannot take them (more steps than T on a discrete schedule, see
        ``runtime.schedule.check_num_steps``; a spacing a continuous schedule has no use for)."""
        if conditioning == "timestep" and not schedule.discrete:
            raise ValueError(f"a timestep-conditioned model needs a discrete schedule, not {schedule.name!r}")
        solver, eta = settings.solver, settings.eta
        ts = select_steps(schedule, settings.steps, settings.spacing or default_spacing(schedule, solver))
        a = schedule.alpha_bar(ts)  # float64, decreasing in noise -> increasing along the plan
        a_prev = np.append(a[1:], 1.0)  # after the final step: the clean image, alpha_bar = 1
        cond = ts if conditioning == "timestep" else 1.0 - a
        multistep = [multistep_coefficients(float(a[i]), float(a_prev[i]), float(a[i - 1]) if i else None)
                     if solver == "dpmpp-2m" else None for i in range(len(ts))]
        planned = tuple(
            PlannedStep(i, float(ts[i]), float(1.0 - a[i]), step_coefficients(float(a[i]), float(a_prev[i]), eta),
                        float(cond[i]), multistep[i])
            for i in range(len(ts))
        )
        return cls(planned, float(eta), solver)

    def inverse(self) -> "SamplingPlan":
        """DDIM inversion (the encoder): this plan's noise levels walked backwards, from alpha_bar = 1 (the clean
        image) up to the plan's first (noisiest) level. Inverse step j leaves the level sampling step S-1-j lands on
        and reaches the level it starts from; the network is evaluated on the current sample at that target level
        (its ``cond``), as diffusers' DDIMInverseScheduler does; eta 0, no clipping. Running it with
        :func:`ddim_sample` (the same loop and the same update, :func:`runtime.schedule.ddim_step`) gives x_T."""
        if self.solver != "ddim" or self.eta != 0:
            raise SettingsError("solver" if self.solver != "ddim" else "eta",
                                f"inversion is deterministic DDIM: solver ddim and eta 0 (got solver {self.solver}, "
                                f"eta {self.eta:g})")
        inverted = tuple(
            PlannedStep(j, s.t, s.noise_var, inverse_coefficients(s.coef.a_prev, s.coef.a_t), s.cond)
            for j, s in enumerate(reversed(self.steps))
        )
        return SamplingPlan(inverted, 0.0, "ddim")

    def tail(self, strength: float) -> "SamplingPlan":
        """Image-to-image (SDEdit): the last ``int(S * strength)`` steps (diffusers' img2img rule), renumbered from 0;
        the images are noised to the first of them's level (:attr:`PlannedStep.coef` ``.a_t``)."""
        if isinstance(strength, bool) or not isinstance(strength, (int, float, np.floating)) \
                or not (0 < strength <= 1):
            raise SettingsError("strength", f"strength must be in (0, 1], got {strength!r}")
        k = int(len(self.steps) * float(strength))
        if k < 1:
            raise SettingsError("strength", f"strength {strength:g} of {len(self.steps)} steps runs no step: give at "
                                            f"least {1 / len(self.steps):.3g}, or more steps")
        kept = self.steps[len(self.steps) - k:]
        return SamplingPlan(tuple(dataclasses.replace(s, index=i) for i, s in enumerate(kept)), self.eta,
                            self.solver)

    def __len__(self) -> int:
        return len(self.steps)

    def __iter__(self) -> Iterator[PlannedStep]:
        return iter(self.steps)

    @property
    def stochastic(self) -> bool:
        return any(s.coef.sigma > 0 for s in self.steps)


def default_spacing(schedule: Schedule, solver: Solver = "ddim") -> Spacing:
    """``uniform``, except DPM-Solver++ on a discrete schedule: ``trailing``. Uniform (= leading) ends at t = 0,
    where lambda jumps and the second-order extrapolation overshoots; trailing ends at T/S and lets the first-order
    final step land on the clean image (tests/test_dpm_solver.py measures both)."""
    return "trailing" if solver == "dpmpp-2m" and schedule.discrete else "uniform"


@dataclass
class SamplerHooks(Generic[A]):
    """Backend-specific pieces of the loop (array creation and checks stay with the backend)."""

    denoise: Callable[[A, float], A]  # (x_t (N, C, H, W), the step's cond) -> predicted noise
    noise_like: Callable[[A, int], A] | None = None  # (x, step index) -> N(0, I) noise, for eta > 0
    is_finite: Callable[[A], bool] | None = None  # checked on every step's output when given
    on_step: Callable[[PlannedStep], None] | None = None  # progress reporting
    precision: str | None = None  # what the network runs in (fp32, fp16, int8): the advice of a NonFiniteError


def ddim_sample(
    x_T: A,
    plan: SamplingPlan,
    hooks: SamplerHooks[A],
    clip_x0: tuple[object, object] | None = None,
) -> A:
    """Run the plan (its solver) from x_T; returns pred_x0 of the final step (model space, un-normalised)."""
    if plan.stochastic and hooks.noise_like is None:
        raise ValueError("eta > 0 needs a noise source (hooks.noise_like)")
    x, x0 = x_T, None
    for step in plan:
        eps = hooks.denoise(x, step.cond)
        if step.multistep is not None:
            x, x0 = dpmpp_2m_step(x, eps, step.coef.a_t, step.multistep, prev_x0=x0, clip_x0=clip_x0)
        else:
            noise = hooks.noise_like(x, step.index) if step.coef.sigma > 0 and hooks.noise_like else None
            x, _ = ddim_step(x, eps, step.coef, noise=noise, clip_x0=clip_x0)
        if hooks.is_finite is not None and not hooks.is_finite(x):
            raise NonFiniteError(f"at sampling step {step.index + 1}/{len(plan)} (noise variance {step.noise_var:.4g})",
                                 hooks.precision)
        if hooks.on_step is not None:
            hooks.on_step(step)
    return x


def numpy_is_finite(x: NDArray) -> bool:
    """Finite check for host arrays."""
    return bool(np.isfinite(x).all())
