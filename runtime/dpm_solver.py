"""DPM-Solver++(2M): the multistep, second-order, data-prediction solver (Lu et al. 2022), torch-free.

Notation (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Sec. 4 and Algorithm 2; diffusers' ``DPMSolverMultistepScheduler`` with
``algorithm_type="dpmsolver++"``, ``solver_order=2``, ``solver_type="midpoint"``):

===============  ===========================================================
``alpha``        ``sqrt(alpha_bar)``: the signal rate at a step
``sigma``        ``sqrt(1 - alpha_bar)``: the noise rate
``lambda``       ``log(alpha / sigma)``: half the log signal-to-noise ratio
``h``            ``lambda_next - lambda_now``: the step in lambda
``r0``           ``h_prev / h``: the previous step's share of this one
``m0, m1``       the data predictions (pred_x0) at this step and the one before
===============  ===========================================================

One step from x at ``now`` to ``next`` is linear in x, m0 and m1 with scalars computed once per step
in float64 (:class:`MultistepCoefficients`), so numpy, CuPy and torch arrays run the same update
(arithmetic only, like :func:`runtime.schedule.ddim_step`). The first step has no history and the
last lands on alpha_bar = 1 (sigma = 0, where the update returns m0): both are first order, which is
DDIM's update (Lu et al. 2022, Sec. 4.1; diffusers' ``lower_order_final`` with
``final_sigmas_type="zero"``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypeVar

from runtime.schedule import predict_x0

A = TypeVar("A")


@dataclass(frozen=True)
class MultistepCoefficients:
    """``x_next = x_scale * x + m0_scale * m0 + m1_scale * m1`` for one step (float64 scalars)."""

    x_scale: float
    m0_scale: float
    m1_scale: float
    order: int  # 1 or 2


def half_log_snr(a: float) -> float:
    """lambda = log(alpha / sigma) = log(alpha_bar / (1 - alpha_bar)) / 2."""
    return 0.5 * (math.log(a) - math.log1p(-a))


def multistep_coefficients(a_now: float, a_next: float, a_before: float | None) -> MultistepCoefficients:
    """The scalars of one DPM-Solver++(2M) step from alpha_bar ``a_now`` to ``a_next``; ``a_before`` is
    the previous step's alpha_bar (None on the first step: first order)."""
    if not (0.0 < a_now < 1.0 and a_now < a_next <= 1.0):
        raise ValueError(f"need 0 < a_now < a_next <= 1 and a_now < 1, got a_now={a_now}, a_next={a_next}")
    if a_next == 1.0:  # sigma_next = 0: exp(-h) = 0 and the step returns m0 (first order)
        return MultistepCoefficients(0.0, 1.0, 0.0, 1)
    lam_now, lam_next = half_log_snr(a_now), half_log_snr(a_next)
    h = lam_next - lam_now
    phi = math.expm1(-h)  # exp(-h) - 1, accurate for small h
    alpha_next, x_scale = math.sqrt(a_next), math.sqrt((1.0 - a_next) / (1.0 - a_now))  # sigma_next / sigma_now
    if a_before is None:  # Algorithm 2, first step: x_next = (sigma_next / sigma_now) x - alpha_next phi m0
        return MultistepCoefficients(x_scale, -alpha_next * phi, 0.0, 1)
    r0 = (lam_now - half_log_snr(a_before)) / h
    # D0 = m0, D1 = (m0 - m1) / r0; x_next = x_scale x - alpha_next phi D0 - 0.5 alpha_next phi D1 (midpoint)
    return MultistepCoefficients(x_scale, -alpha_next * phi * (1.0 + 0.5 / r0), alpha_next * phi * 0.5 / r0, 2)


def dpmpp_2m_step(
    x_t: A,
    eps: A,
    a_t: float,
    coef: MultistepCoefficients,
    prev_x0: A | None = None,
    clip_x0: tuple[object, object] | None = None,
) -> tuple[A, A]:
    """One DPM-Solver++(2M) update: returns (x_next, pred_x0). ``prev_x0`` is the previous step's pred_x0
    (required for a second-order step); with ``clip_x0 = (lo, hi)`` pred_x0 is clipped before use."""
    m0 = predict_x0(x_t, eps, a_t)
    if clip_x0 is not None:
        m0 = m0.clip(*clip_x0)  # type: ignore[attr-defined]
    x_next = coef.m0_scale * m0  # type: ignore[operator]
    if coef.x_scale:
        x_next = x_next + coef.x_scale * x_t  # type: ignore[operator]
    if coef.order == 2:
        if prev_x0 is None:
            raise ValueError("a second-order step needs the previous step's pred_x0")
        x_next = x_next + coef.m1_scale * prev_x0  # type: ignore[operator]
    return x_next, m0
