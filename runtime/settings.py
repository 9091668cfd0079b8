"""How to sample, as one value: :class:`SamplingSettings`, validated once, here.

Every layer that samples takes one of these instead of loose scalars: ``ddim-run`` (its sampling flags are
generated from the fields, as ``fit``'s and ``ddim-export``'s are from their configs), the Python API
(``Sampler.sample(n, settings)``, or keywords that build one), ``ddim-serve`` (the settings are the key under which
images of different requests share a network batch), the trainer's eager sampling and the benchmarks.

Rules that do not depend on the model are checked in ``__post_init__``, each once, and a broken one raises
:class:`SettingsError` naming the field. Rules that depend on the model (at most T steps on a discrete schedule,
spacings a continuous schedule cannot take) are checked where the plan is built (:mod:`runtime.sampler`), and raise
the same error. A new setting is a new field here, with its docstring (the ``--help`` text) and its rule.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from runtime.choices import Solver, Spacing, values


class SettingsError(ValueError):
    """A sampling setting that cannot be used; ``field`` names it (``steps``, ``eta``, ...). The message names the
    field by its name, which command lines rewrite into the flag typed (``runtime.common.cliconfig.with_flag_names``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def check_steps(steps: Any) -> int:
    """The rule of ``steps``: an integer >= 1 (how many the schedule takes is the plan's rule)."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise SettingsError("steps", f"steps must be an integer >= 1, got {steps!r}")
    return int(steps)


def check_eta(eta: Any) -> float:
    """The rule of ``eta``: a finite number >= 0."""
    try:
        ok = not isinstance(eta, bool) and isinstance(eta, (int, float, np.integer, np.floating)) \
            and math.isfinite(eta) and eta >= 0
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        raise SettingsError("eta", f"eta must be a finite number >= 0, got {eta!r}")
    return float(eta)


def check_spacing(spacing: Any) -> Spacing:
    """The rule of ``spacing``: one of :data:`runtime.choices.Spacing`."""
    if not isinstance(spacing, str) or spacing not in values(Spacing):
        raise SettingsError("spacing", f"unknown spacing {spacing!r}; allowed: {', '.join(values(Spacing))}")
    return str(spacing)  # type: ignore[return-value]


@dataclass(frozen=True)
class SamplingSettings:
    """The settings of one sampling run; frozen and hashable (``ddim-serve`` batches by it)."""

    steps: int = 50
    """Sampling steps: network evaluations per image."""
    eta: float = 0.0
    """0 = deterministic DDIM, 1 = DDPM-like."""
    solver: Solver = "ddim"
    """ddim, or dpmpp-2m (DPM-Solver++(2M), eta 0: on the shipped model 10 steps score as 50 DDIM steps)."""
    spacing: Spacing | None = None
    """How the steps spread over the schedule [default: uniform; trailing for dpmpp-2m on a discrete schedule]."""
    clip_x0: bool | None = None
    """Clip each step's predicted clean image to the pixel range (or the model's clip range) [default: the model's
    setting, off for models trained here]."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_steps(self.steps))
        object.__setattr__(self, "eta", check_eta(self.eta))
        if not isinstance(self.solver, str) or self.solver not in values(Solver):
            raise SettingsError("solver", f"unknown solver {self.solver!r}; allowed: {', '.join(values(Solver))}")
        object.__setattr__(self, "solver", str(self.solver))
        if self.spacing is not None:
            object.__setattr__(self, "spacing", check_spacing(self.spacing))
        if self.clip_x0 is not None and not isinstance(self.clip_x0, (bool, np.bool_)):
            raise SettingsError("clip_x0", f"clip_x0 must be true, false or unset, got {self.clip_x0!r}")
        if self.clip_x0 is not None:
            object.__setattr__(self, "clip_x0", bool(self.clip_x0))
        if self.solver == "dpmpp-2m" and self.eta != 0:
            raise SettingsError("eta", f"solver dpmpp-2m is deterministic: eta must be 0, got {self.eta:g} (use "
                                       "solver ddim for eta > 0)")

    @classmethod
    def of(cls, settings: SamplingSettings | None = None, **changes: Any) -> SamplingSettings:
        """``settings`` (default: the defaults) with ``changes`` applied: ``SamplingSettings.of(steps=20)``.
        An unknown name is a TypeError naming it."""
        if settings is not None and not isinstance(settings, SamplingSettings):
            raise TypeError(f"settings must be a SamplingSettings (or None), got {type(settings).__name__}; give "
                            "steps, eta, ... as keywords: sample(16, steps=20)")
        base = settings if settings is not None else cls()
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise TypeError(f"unknown sampling setting(s): {', '.join(unknown)}; allowed: "
                            f"{', '.join(f.name for f in dataclasses.fields(cls))}")
        return dataclasses.replace(base, **changes) if changes else base

    def describe(self) -> str:
        """One line for logs: ``ddim, 50 steps (uniform spacing), eta 0, no clipping`` (of resolved settings)."""
        clip = "no clipping" if self.clip_x0 is False else "pred_x0 clipped" if self.clip_x0 else "model's clipping"
        return (f"{self.solver}, {self.steps} steps ({self.spacing or 'default'} spacing), eta {self.eta:g}, "
                f"{clip}")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-ready values (for reports and files that record how they were sampled)."""
        return dataclasses.asdict(self)
