"""The Python API: load a model, sample N images with a seed, get uint8 arrays back.

    from runtime.api import load
    sampler = load("exports/fm")                       # backend picked as ddim-run does
    result = sampler.sample(16, steps=50, seed=0)       # result.images: (16, H, W, C) uint8
    settings = SamplingSettings(steps=10, solver="dpmpp-2m")   # runtime.settings: the same, as one value
    result = sampler.sample(16, settings, seed=0)
"""

from __future__ import annotations

import contextlib
import math
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
from runtime.latents import check_batch
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


@dataclass
class Job:
    """One run of the loop: which images (their noise streams), the settings and plan, where each batch starts
    (``start(first, noise)``: x at the plan's first level, host array), and whether the result is images."""

    images: list[tuple[int, int]]
    settings: SamplingSettings
    plan: SamplingPlan
    start: Callable[[int, ImageNoise], NDArray[np.float32]]
    batch_size: int = 16
    on_step: Callable[[int], None] | None = None
    decode: bool = True


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
        chosen = self.resolve(SamplingSettings.of(settings, **changes))
        draw = lambda first, noise: noise.draw(self.image_shape)  # noqa: E731 (x_T: each stream's first draw)
        return self._run(Job(list(images), chosen, self.plan(chosen), draw, batch_size, on_step))

    def decode(self, latents: NDArray[np.floating], settings: SamplingSettings | None = None, *, seed: int = 0,
               batch_size: int = 16, on_step: Callable[[int], None] | None = None, **changes: Any) -> SampleResult:
        """Sample from given x_T (``(N, C, H, W)``, model space) instead of drawn ones: decoding the x_T that
        ``sample(n, seed=s)`` draws gives its images bit for bit. Under eta > 0 image i's per-step noise is the
        ``(seed, i)`` stream's, after the x_T it would have drawn, so that holds for every eta."""
        x_T = check_batch(latents, self.image_shape, "latents")
        chosen = self.resolve(SamplingSettings.of(settings, **changes))

        def start(first: int, noise: ImageNoise) -> NDArray[np.float32]:
            noise.draw(self.image_shape)  # the x_T this stream would have drawn: per-step noise as in sample()
            return x_T[first:first + noise.count]

        return self._run(Job([(seed, i) for i in range(len(x_T))], chosen, self.plan(chosen), start, batch_size,
                             on_step))

    def encode(self, images: NDArray[np.floating], settings: SamplingSettings | None = None, *, batch_size: int = 16,
               on_step: Callable[[int], None] | None = None, **changes: Any) -> SampleResult:
        """DDIM inversion: the x_T that decodes (``decode`` with the same steps and spacing) back to ``images``
        (``(N, C, H, W)`` model space, see ``runtime.inputs.to_model_space``). The plan ``sample`` uses for these
        settings, walked backwards from alpha_bar = 1 (:meth:`runtime.sampler.SamplingPlan.inverse`); deterministic
        DDIM (eta 0), no clipping. ``result.samples`` are the latents; ``result.images`` is empty."""
        x0 = check_batch(images, self.image_shape, "images")
        chosen = self.resolve(SamplingSettings.of(settings, **changes))
        chosen = SamplingSettings.of(chosen, clip_x0=False)
        plan = self.plan(chosen).inverse()
        return self._run(Job([(0, i) for i in range(len(x0))], chosen, plan,
                             lambda first, noise: x0[first:first + noise.count], batch_size, on_step, decode=False))

    def image_to_image(self, images: NDArray[np.floating], strength: float, settings: SamplingSettings | None = None,
                       *, seed: int = 0, batch_size: int = 16, on_step: Callable[[int], None] | None = None,
                       **changes: Any) -> SampleResult:
        """SDEdit: noise ``images`` (``(N, C, H, W)`` model space) to the level of the plan's step S - int(S *
        strength) with image i's ``(seed, i)`` noise (its first draw, where ``sample`` draws x_T), then run the rest
        of the plan. ``strength`` in (0, 1]: 1 starts from the plan's noisiest level."""
        x0 = check_batch(images, self.image_shape, "images")
        chosen = self.resolve(SamplingSettings.of(settings, **changes))
        plan = self.plan(chosen).tail(strength)
        a = plan.steps[0].coef.a_t

        def start(first: int, noise: ImageNoise) -> NDArray[np.float32]:
            z = noise.draw(self.image_shape)
            return (math.sqrt(a) * x0[first:first + noise.count] + math.sqrt(1.0 - a) * z).astype(np.float32)

        return self._run(Job([(seed, i) for i in range(len(x0))], chosen, plan, start, batch_size, on_step))

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image in model space."""
        m = self.spec.model
        return m.channels, m.image_size, m.image_size

    def _run(self, job: Job) -> SampleResult:
        for name, value in (("images", len(job.images)), ("batch_size", job.batch_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        b = self.backend
        net = [0.0]

        def timed_denoise(x: Any, cond: float) -> Any:
            t0 = time.perf_counter()
            out = b.denoise(x, cond)
            net[0] += time.perf_counter() - t0
            return out

        start = time.perf_counter()
        # GPU backends make their stream current, so the update's kernels queue behind the network's.
        with getattr(b, "context", contextlib.nullcontext)():
            bounds = b.clip_bounds(*self.spec.clip_bounds()) if job.settings.clip_x0 else None
            outs = self._batches(job, bounds, timed_denoise)
        seconds = time.perf_counter() - start
        samples = np.concatenate(outs)
        calls = len(job.plan) * len(outs)
        images = to_uint8(samples, self.spec.normalization) if job.decode else np.zeros((0,), np.uint8)
        return SampleResult(images, samples, seconds, net[0], len(job.plan), calls, settings=job.settings)

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

    def _batches(self, job: Job, bounds: Any, denoise: Callable[[Any, float], Any]) -> list[NDArray[np.float32]]:
        b, shape, outs = self.backend, self.image_shape, []
        on_step = job.on_step
        for first in range(0, len(job.images), job.batch_size):
            noise = ImageNoise.of(job.images[first:first + job.batch_size])
            hooks = SamplerHooks[Any](
                denoise=denoise,
                noise_like=lambda x, i: b.from_host(noise.draw(shape)),  # noqa: B023 (used within the batch)
                is_finite=b.is_finite,
                precision=getattr(b, "precision", None),
                on_step=(lambda s: on_step(s.index)) if on_step else None,
            )
            x = b.from_host(job.start(first, noise))
            outs.append(b.to_host(ddim_sample(x, job.plan, hooks, clip_x0=bounds)))
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
