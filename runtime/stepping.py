"""Step-level batching: images at different steps of different plans share one network call.

``ddim-run`` and request-level serving run a batch of images through one plan together. Here every image (a
:class:`Lane`) carries its own plan (steps, eta, solver, spacing, clipping), its position in it, its noise stream
and, under DPM-Solver++(2M), its previous pred_x0. :meth:`StepBatch.step` gives the network every lane at once, each
at its own noise level (the denoiser takes one level per image: :func:`runtime.backends.base.cond_values`), then
applies one vectorised update with per-image coefficients ((N, 1, 1, 1) float32 arrays on the backend) and per-image
branch masks. Lanes join between any two steps (:meth:`StepBatch.add`) and leave when their plan is done, as LLM
servers batch tokens.

**Same bits as ddim-run.** Every lane's update is the arithmetic of :func:`runtime.schedule.ddim_step` and
:func:`runtime.dpm_solver.dpmpp_2m_step` in the same order, with the same float32 coefficients (a Python float
scalar meets a float32 array as float32 in numpy, CuPy and torch on the CPU), and branches a lane does not take are
discarded by ``where``, never added as zeros. A lane's noise is its own ``(seed, index)`` stream, drawn exactly when
:func:`runtime.sampler.ddim_sample` would draw it. So a lane's result equals ``Sampler.sample_images`` of its
(seed, index) bit for bit, provided the network itself gives an image the same output whatever shares its batch
(ONNX Runtime and OpenVINO on the CPU do, at fp32, bf16 and int8: tests/test_stepping.py). Known exception: torch on
CUDA divides by a Python scalar as a multiplication by its reciprocal, so the eager backend on a GPU may differ in
the last bit (it is not a serving backend).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Hashable, Sequence

import numpy as np
from numpy.typing import NDArray

from runtime.noise import ImageNoise
from runtime.sampler import NonFiniteError, SamplingPlan
from runtime.settings import SamplingSettings


@dataclass
class Lane:
    """One image in flight: whose it is (``key``), its plan, where it is in it, its noise stream, and its rows of the
    batch while it is in one (``x``, ``prev``: backend arrays of one row, set while the lane is parked)."""

    key: Hashable
    plan: SamplingPlan
    clip: bool
    noise: ImageNoise
    k: int = 0  # the next step of the plan
    x: Any = None
    prev: Any = None  # pred_x0 of its previous step (DPM-Solver++'s history)
    batches: int = 0  # sum of the network batch sizes it ran in (its mean batch: batches / k)

    @property
    def done(self) -> bool:
        return self.k >= len(self.plan)

    @property
    def left(self) -> int:
        return len(self.plan) - self.k


@dataclass
class Finished:
    """A lane that left the batch: its model-space sample ``(C, H, W)`` (host), or why it failed."""

    lane: Lane
    sample: NDArray[np.float32] | None
    error: str | None = None


class _Ops:
    """The few array operations the batch needs beyond arithmetic, in the backend's own array library: numpy (ONNX
    Runtime and OpenVINO on the host), CuPy (``backend.arrays.cp``: TensorRT, ONNX Runtime CUDA) or torch."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        cp = getattr(getattr(backend, "arrays", None), "cp", None)
        if cp is not None:
            self.xp, self.torch = cp, False
        elif type(backend).__module__.startswith("trainer."):
            import torch  # the eager backend only: its arrays are torch tensors

            self.xp, self.torch = torch, True
        else:
            self.xp, self.torch = np, False

    def cat(self, parts: Sequence[Any]) -> Any:
        return self.xp.cat(list(parts)) if self.torch else self.xp.concatenate(list(parts))

    def rows(self, x: Any, index: Sequence[int]) -> Any:
        return x[list(index)] if not self.torch else x[self.xp.as_tensor(list(index), device=x.device)]

    def where(self, mask: Any, a: Any, b: Any) -> Any:
        return self.xp.where(mask, a, b)

    def finite_rows(self, x: Any) -> NDArray[np.bool_]:
        ok = self.xp.isfinite(x).reshape(x.shape[0], -1).all(1)
        if self.torch:
            return ok.cpu().numpy().astype(bool)
        return np.asarray(ok if self.xp is np else self.backend.to_host(ok)).astype(bool)


class StepBatch:
    """The images in flight on one backend, stepped together.

    ``add`` a lane (its x_T drawn from its stream), ``step()`` once per network call: every lane advances one step
    of its own plan and the lanes that finished (or failed) come back. ``park`` takes a lane out with its state
    (``resume`` puts it back): a scheduler can let a smaller request run first without losing work.
    ``capacity``: at most this many lanes (the engine's own bound too: a TensorRT profile's max batch)."""

    def __init__(self, sampler: Any, capacity: int) -> None:
        self.sampler, self.backend = sampler, sampler.backend
        engine_max, engine_min = (getattr(self.backend, name, None) for name in ("max_batch", "min_batch"))
        self.capacity = max(1, min(capacity, engine_max) if isinstance(engine_max, int) else capacity)
        self.min_batch = engine_min if isinstance(engine_min, int) else 1  # a TensorRT profile's, else any
        self.ops = _Ops(self.backend)
        self.lanes: list[Lane] = []
        self.x: Any = None  # (n, C, H, W) on the backend, one row per lane in order
        self.prev: Any = None  # (n, C, H, W) pred_x0 of each lane's previous step (zeros for a lane's first)
        lo, hi = self.sampler.spec.clip_bounds()
        self._lo, self._hi = (np.asarray(b, dtype=np.float32).reshape(1, -1, 1, 1) for b in (lo, hi))
        self.precision = getattr(self.backend, "precision", None)

    def __len__(self) -> int:
        return len(self.lanes)

    @property
    def free(self) -> int:
        return self.capacity - len(self.lanes)

    def lane(self, key: Hashable, seed: int, index: int, settings: SamplingSettings) -> Lane:
        """A new lane for image ``index`` of seed ``seed`` (not in the batch yet: :meth:`resume` adds it)."""
        chosen = self.sampler.resolve(settings)
        noise = ImageNoise.of([(seed, index)])
        x_T = noise.draw(self.sampler.image_shape)  # its stream's first draw, as ddim-run's
        return Lane(key, self.sampler.plan(chosen), bool(chosen.clip_x0), noise, x=self.backend.from_host(x_T))

    def add(self, key: Hashable, seed: int, index: int, settings: SamplingSettings) -> Lane:
        with self._context():
            lane = self.lane(key, seed, index, settings)
            self.resume(lane)
        return lane

    def _context(self) -> Any:
        """The backend's stream made current (GPU backends), so every array op here queues behind the engine's."""
        return getattr(self.backend, "context", contextlib.nullcontext)()

    def resume(self, lane: Lane) -> None:
        """Put a new or parked lane into the batch (its rows join at the end)."""
        with self._context():
            self._resume(lane)

    def _resume(self, lane: Lane) -> None:
        if len(self.lanes) >= self.capacity:
            raise RuntimeError(f"the step batch is full ({self.capacity} images)")
        prev = lane.prev if lane.prev is not None else lane.x * 0  # no history yet: never read (first order)
        self.x = lane.x if self.x is None else self.ops.cat([self.x, lane.x])
        self.prev = prev if self.prev is None else self.ops.cat([self.prev, prev])
        lane.x = lane.prev = None
        self.lanes.append(lane)

    def park(self, keys: Sequence[Hashable]) -> list[Lane]:
        """Take the lanes of ``keys`` out of the batch with their state (their rows kept on the lane)."""
        with self._context():
            return self._park(set(keys))

    def _park(self, wanted: set[Hashable]) -> list[Lane]:
        out = [i for i, lane in enumerate(self.lanes) if lane.key in wanted]
        for i in out:
            self.lanes[i].x, self.lanes[i].prev = self.ops.rows(self.x, [i]), self.ops.rows(self.prev, [i])
        parked = [self.lanes[i] for i in out]
        self._keep([i for i in range(len(self.lanes)) if i not in set(out)])
        return parked

    def _keep(self, index: list[int]) -> None:
        if len(index) == len(self.lanes):
            return
        self.lanes = [self.lanes[i] for i in index]
        if index:
            self.x, self.prev = self.ops.rows(self.x, index), self.ops.rows(self.prev, index)
        else:
            self.x = self.prev = None

    def step(self) -> list[Finished]:
        """One network call over every lane, each at its own step, then the update; returns the lanes that left
        (finished: their sample; failed: a non-finite result names the step, a backend error fails every lane)."""
        if not self.lanes:
            return []
        with self._context():
            return self._step()

    def _step(self) -> list[Finished]:
        n = len(self.lanes)
        steps = [lane.plan.steps[lane.k] for lane in self.lanes]
        try:
            eps = self._denoise([s.cond for s in steps])
            x0, x_new = self._update(eps, steps)
        except Exception as exc:  # noqa: BLE001 (a backend error: every lane of this call fails with it)
            from runtime.common.clitools import one_line

            failed = [Finished(lane, None, one_line(exc)) for lane in self.lanes]
            self.lanes, self.x, self.prev = [], None, None
            return failed
        self.x, self.prev = x_new, x0
        ok = self.ops.finite_rows(x_new)
        out: list[Finished] = []
        keep: list[int] = []
        for i, (lane, s) in enumerate(zip(self.lanes, steps)):
            lane.k += 1
            lane.batches += n
            if not ok[i]:
                where = f"at sampling step {s.index + 1}/{len(lane.plan)} (noise variance {s.noise_var:.4g})"
                out.append(Finished(lane, None, str(NonFiniteError(where, self.precision))))
            elif lane.done:
                out.append(Finished(lane, self.backend.to_host(self.ops.rows(x_new, [i]))[0]))
            else:
                keep.append(i)
        self._keep(keep)
        return out

    # -- the network and the update -----------------------------------------------------------------------------------
    def _denoise(self, conds: list[float]) -> Any:
        b, n, x = self.backend, len(conds), self.x
        if getattr(b, "per_image_cond", False):
            pad = max(self.min_batch - n, 0)  # a static-batch engine (TensorRT): fill with copies of the last row
            if pad:
                x = self.ops.cat([x] + [self.ops.rows(x, [n - 1])] * pad)
            eps = b.denoise(x, np.asarray(conds + conds[-1:] * pad, dtype=np.float64))
            return eps[:n] if pad else eps
        # A backend that takes one level per call: one call per distinct level, rows put back in order.
        groups: dict[float, list[int]] = {}
        for i, c in enumerate(conds):
            groups.setdefault(c, []).append(i)
        if len(groups) == 1:
            return b.denoise(x, conds[0])
        order = [i for idx in groups.values() for i in idx]
        parts = [b.denoise(self.ops.rows(x, idx), c) for c, idx in groups.items()]
        inverse = np.argsort(order)
        return self.ops.rows(self.ops.cat(parts), inverse.tolist())

    def _update(self, eps: Any, steps: list[Any]) -> tuple[Any, Any]:
        """Every lane's ddim_step or dpmpp_2m_step at once; returns (pred_x0, x_next)."""
        b, ops, x, n = self.backend, self.ops, self.x, len(steps)
        lanes = self.lanes
        dpm = np.array([s.multistep is not None for s in steps])
        clip = np.array([lane.clip for lane in lanes])
        # Per-lane scalars, float64 -> float32 as numpy rounds a Python float meeting a float32 array.
        col = {
            "s1a": [math.sqrt(1.0 - s.coef.a_t) for s in steps],
            "sa": [math.sqrt(s.coef.a_t) for s in steps],
            "sap": [math.sqrt(s.coef.a_prev) for s in steps],
            "es": [s.coef.eps_scale for s in steps],
            "sig": [s.coef.sigma for s in steps],
            "m0s": [s.multistep.m0_scale if s.multistep else 0.0 for s in steps],
            "xs": [s.multistep.x_scale if s.multistep else 0.0 for s in steps],
            "m1s": [s.multistep.m1_scale if s.multistep else 0.0 for s in steps],
        }
        names = list(col)
        table = b.from_host(np.asarray([col[k] for k in names], dtype=np.float32).reshape(len(names), n, 1, 1, 1))
        c = {k: table[j] for j, k in enumerate(names)}
        mask = {}  # built on the backend only when a lane needs the branch

        def m(name: str, rows: NDArray[np.bool_]) -> Any:
            if name not in mask:
                mask[name] = b.from_host(rows.reshape(n, 1, 1, 1))
            return mask[name]

        x0 = (x - c["s1a"] * eps) / c["sa"]  # predict_x0
        eps_d = eps
        if clip.any():
            lo = np.where(clip.reshape(n, 1, 1, 1), self._lo, np.float32(-np.inf)).astype(np.float32)
            hi = np.where(clip.reshape(n, 1, 1, 1), self._hi, np.float32(np.inf)).astype(np.float32)
            x0 = x0.clip(b.from_host(lo), b.from_host(hi))  # +-inf: unchanged
            ddim_clip = clip & ~dpm
            if ddim_clip.any():  # DDIM recomputes eps from the clipped pred_x0 (diffusers' DDIMScheduler)
                eps_d = ops.where(m("ddim_clip", ddim_clip), (x - c["sa"] * x0) / c["s1a"], eps)
        x_new = None
        if not dpm.all():  # DDIM lanes
            x_new = c["sap"] * x0 + c["es"] * eps_d
            noisy = np.array([s.coef.sigma > 0.0 and s.multistep is None for s in steps])
            if noisy.any():
                draws = np.zeros((n, *self.sampler.image_shape), dtype=np.float32)
                for i in np.flatnonzero(noisy):
                    draws[i] = lanes[i].noise.draw(self.sampler.image_shape)[0]
                x_new = ops.where(m("noisy", noisy), x_new + c["sig"] * b.from_host(draws), x_new)
        if dpm.any():  # DPM-Solver++(2M) lanes
            x_m = c["m0s"] * x0
            with_x = np.array([s.multistep is not None and bool(s.multistep.x_scale) for s in steps])
            if with_x.any():
                x_m = ops.where(m("with_x", with_x), x_m + c["xs"] * x, x_m)
            second = np.array([s.multistep is not None and s.multistep.order == 2 for s in steps])
            if second.any():
                x_m = ops.where(m("second", second), x_m + c["m1s"] * self.prev, x_m)
            x_new = x_m if x_new is None else ops.where(m("dpm", dpm), x_m, x_new)
        return x0, x_new
