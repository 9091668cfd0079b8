"""The Python API: load a model, sample N images with a seed, get uint8 arrays back.

    from runtime.api import load
    sampler = load("exports/fm")                       # backend picked as ddim-run does
    result = sampler.sample(16, steps=50, seed=0)       # result.images: (16, H, W, C) uint8
    settings = SamplingSettings(steps=10, solver="dpmpp-2m")   # runtime.settings: the same, as one value
    result = sampler.sample(16, settings, seed=0)
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from runtime.backends.base import Backend
from runtime.backends.registry import open_backend
from runtime.choices import Device, RunPrecision
from runtime.images import to_uint8
from runtime.noise import ImageNoise
from runtime.sampler import SamplerHooks, SamplingPlan, ddim_sample, default_spacing
from runtime.schedule import build_schedule
from runtime.settings import SamplingSettings


@dataclass
class SampleResult:
    """Images, the raw model-space samples, and where the time went."""

    images: NDArray[np.uint8]  # (N, H, W, C)
    samples: NDArray[np.float32]  # (N, C, H, W), model space, before de-normalisation
    seconds: float = 0.0
    network_seconds: float = 0.0  # inside denoise calls (synchronous backends; GPU engines return early)
    steps: int = 0
    calls: int = 0  # denoise calls (steps x batches)
    timings: dict[str, float] = field(default_factory=dict)
    settings: SamplingSettings | None = None  # as used: spacing and clipping resolved for the model

    @property
    def overhead_fraction(self) -> float:
        """Share of the time spent outside the network: the update, noise, checks, bookkeeping."""
        return max(self.seconds - self.network_seconds, 0.0) / self.seconds if self.seconds else 0.0


class Sampler:
    """A backend plus the shared DDIM loop."""

    def __init__(self, backend: Backend, why: str = "") -> None:
        self.backend = backend
        self.why = why
        self.spec = backend.spec
        self.schedule = build_schedule(self.spec.schedule)
        self._plans: dict[SamplingSettings, SamplingPlan] = {}
        self._plans_lock = threading.Lock()

    def sample(self, num_images: int, settings: SamplingSettings | None = None, *, seed: int = 0,
               batch_size: int = 16, on_step: Callable[[int], None] | None = None, **changes: Any) -> SampleResult:
        """Sample ``num_images`` images; image i depends only on (seed, i), not on the batch size.

        ``settings`` (default :class:`SamplingSettings()`: 50 DDIM steps, eta 0), with any of its fields given as
        keywords on top: ``sample(16, steps=20, solver="dpmpp-2m")``. ``clip_x0`` unset: the model's default
        (``schedule.clip_sample`` in its config); ``spacing`` unset: the solver's default
        (:func:`runtime.sampler.default_spacing`)."""
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        return self.sample_images([(seed, i) for i in range(num_images)], settings, batch_size=batch_size,
                                  on_step=on_step, **changes)

    def sample_images(self, images: Sequence[tuple[int, int]], settings: SamplingSettings | None = None, *,
                      batch_size: int = 16, on_step: Callable[[int], None] | None = None,
                      **changes: Any) -> SampleResult:
        """Sample the images named by ``(seed, index)`` pairs, in that order: pair (s, i) is image i of
        ``sample(..., seed=s)`` with the same settings, bit for bit, whatever else shares its batch (this is how
        ``ddim-serve`` merges the images of concurrent requests into one network batch)."""
        for name, value in (("images", len(images)), ("batch_size", batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        chosen = self.resolve(SamplingSettings.of(settings, **changes))
        plan = self.plan(chosen)
        b, m = self.backend, self.spec.model
        shape = (m.channels, m.image_size, m.image_size)
        net = [0.0]

        def timed_denoise(x: Any, cond: float) -> Any:
            t0 = time.perf_counter()
            out = b.denoise(x, cond)
            net[0] += time.perf_counter() - t0
            return out

        start = time.perf_counter()
        # GPU backends make their stream current, so the update's kernels queue behind the network's.
        with getattr(b, "context", contextlib.nullcontext)():
            bounds = b.clip_bounds(*self.spec.clip_bounds()) if chosen.clip_x0 else None
            outs = self._batches(images, batch_size, plan, shape, bounds, timed_denoise, on_step)
        seconds = time.perf_counter() - start
        samples = np.concatenate(outs)
        calls = len(plan) * len(outs)
        return SampleResult(to_uint8(samples, self.spec.normalization), samples, seconds, net[0], len(plan), calls,
                            settings=chosen)

    def resolve(self, settings: SamplingSettings | None = None) -> SamplingSettings:
        """``settings`` with what was left to the model filled in: the solver's default spacing on this schedule,
        and the model's own clipping (``schedule.clip_sample``)."""
        s = settings if settings is not None else SamplingSettings()
        return SamplingSettings.of(s, spacing=s.spacing or default_spacing(self.schedule, s.solver),
                                   clip_x0=self.spec.schedule.clip_sample if s.clip_x0 is None else s.clip_x0)

    def plan(self, settings: SamplingSettings | None = None) -> SamplingPlan:
        """The step plan of ``settings`` for this model's schedule, built once per settings and kept;
        :class:`runtime.settings.SettingsError` for what the schedule cannot take (cheap: callers use it to
        refuse bad input before sampling)."""
        chosen = self.resolve(settings)
        with self._plans_lock:  # ddim-serve plans on its event loop while a worker thread samples
            plan = self._plans.get(chosen)
        if plan is None:
            plan = SamplingPlan.build(self.schedule, chosen, self.spec.model.conditioning)
            with self._plans_lock:
                if len(self._plans) >= 64:  # a service sees a few settings; bound it anyway
                    self._plans.pop(next(iter(self._plans)))
                self._plans[chosen] = plan
        return plan

    def _batches(self, images: Sequence[tuple[int, int]], batch_size: int, plan: SamplingPlan,
                 shape: tuple[int, int, int], bounds: Any, denoise: Callable[[Any, float], Any],
                 on_step: Callable[[int], None] | None) -> list[NDArray[np.float32]]:
        b, outs = self.backend, []
        for first in range(0, len(images), batch_size):
            noise = ImageNoise.of(images[first:first + batch_size])
            hooks = SamplerHooks[Any](
                denoise=denoise,
                noise_like=lambda x, i: b.from_host(noise.draw(shape)),  # noqa: B023 (used within the batch)
                is_finite=b.is_finite,
                on_step=(lambda s: on_step(s.index)) if on_step else None,
            )
            outs.append(b.to_host(ddim_sample(b.from_host(noise.draw(shape)), plan, hooks, clip_x0=bounds)))
        return outs


def load(path: str | Path, backend: str = "auto", device: Device | None = None,
         precision: RunPrecision | None = None, threads: int | None = None) -> Sampler:
    """A sampler for an export directory, an ONNX file, or (torch backend) a trainer run directory.

    ``precision`` None or ``auto``: a TensorRT engine's own where one is picked; on ONNX Runtime CPU
    ``model.int8.onnx`` where it passed its gate and is faster on this CPU; else fp32 (``model.onnx``).
    ``why`` says which and why. ``threads``: CPU threads of ONNX Runtime and torch [default: one per
    physical core].
    """
    chosen, why = open_backend(Path(path), backend, device, precision, threads)
    return Sampler(chosen, why)
