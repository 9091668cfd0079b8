"""What a ``ddim-serve`` replica does, without Ray: validate a request, sample batches of (seed, index) images
merged across requests, encode the answer.

Importing this module needs numpy, pydantic and the runtime, never torch (replicas run the lean runtime) and not
Ray (so it is tested and reused on its own). :mod:`runtime.serving.app` wraps it in a Ray Serve deployment.

A request for ``num_images`` images with seed ``s`` is the images ``(s, 0) .. (s, num_images - 1)``: exactly
``ddim-run --seed s``'s images, because the runtime draws every image's noise from its own ``(seed, index)``
stream (:class:`runtime.noise.ImageNoise`). So the images of concurrent requests with the same
sampling settings can share one network batch and each still equals its own ``ddim-run``.
"""

from __future__ import annotations

import asyncio
import collections
import io
import json
import math
import os
import sys
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from runtime import __version__
from runtime.choices import Device, RunPrecision, Solver, values
from runtime.common.clitools import one_line
from runtime.exportdir import is_export, read_report
from runtime.common.files import sha256_file
from runtime.settings import SamplingSettings, SettingsError

MAX_BODY_BYTES = 64 * 1024  # a request body is a few fields of JSON: anything larger is refused unread
Format = Literal["grid", "png", "npz"]
MEDIA_TYPES = {"grid": "image/png", "png": "application/zip", "npz": "application/octet-stream"}


class SampleRequest(BaseModel):
    """``POST /v1/samples``: which images, how to sample them, how to send them back."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    num_images: int = Field(1, ge=1, description="Images to sample: (seed, 0) .. (seed, num_images - 1).")
    steps: int = Field(50, description="Sampling steps (at least 1).")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Noise seed, as ddim-run --seed.")
    eta: float = Field(0.0, le=1.0, description="0 = deterministic DDIM, 1 = DDPM-like (ddim only).")
    solver: Solver = Field("ddim", description="ddim, or dpmpp-2m (DPM-Solver++(2M), eta 0).")
    # The rules of steps, eta and solver are SamplingSettings' (checked in ModelService.check, 422 naming the
    # field); what is left here is the service's own bound on eta.
    format: Format = Field("grid", description="grid: one PNG grid; png: a zip of one PNG per image; "
                                               "npz: numpy arrays images (N, H, W, C) uint8, seeds, indices.")


class RequestError(ValueError):
    """A request the service refuses, with the HTTP status and a one-line message naming the field."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ServeOptions:
    """How a replica loads its model and what it accepts (``ddim-serve``'s options)."""

    model: str  # export folder or ONNX file, resolved on the machine that starts the service
    backend: str = "auto"  # a row of runtime.backends.registry that may serve
    device: Device | None = None
    precision: RunPrecision | None = None
    threads: int | None = None
    max_batch: int = 16
    batch_wait_ms: float = 10.0
    max_images_per_request: int = 64
    max_steps: int = 1000

    def __post_init__(self) -> None:
        from runtime.backends.registry import names

        if self.backend not in names(serve=True):
            raise ValueError(f"--backend {self.backend}: ddim-serve runs the lean runtime "
                             f"({', '.join(names(serve=True))}); export a trainer run with ddim-export first")
        for name in ("max_batch", "max_images_per_request", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.batch_wait_ms >= 0 and math.isfinite(self.batch_wait_ms)):
            raise ValueError(f"--batch-wait-ms must be >= 0, got {self.batch_wait_ms}")


@dataclass(frozen=True)
class ImageJob:
    """One image of one request: what the batcher merges. ``key`` images can share a network batch."""

    seed: int
    index: int
    settings: SamplingSettings

    @property
    def key(self) -> SamplingSettings:
        return self.settings


@dataclass
class ImageResult:
    """A sampled image, or the error of the batch it was in; ``batch`` is the network batch size it ran in."""

    image: NDArray[np.uint8] | None
    batch: int
    seconds: float
    error: str | None = None


@dataclass
class Stats:
    """Batches this replica formed (sizes), for ``GET /v1/model`` and the load benchmark."""

    batch_sizes: dict[int, int] = field(default_factory=dict)
    images: int = 0
    requests: int = 0


class Batcher:
    """Merge the image jobs of concurrent requests into network batches, taken when the replica is free.

    ``submit(job)`` queues one image and waits for its result. One worker task runs batches one at a time (the
    network uses every core): when free, it takes the oldest queued job and every queued job with the same
    sampling settings, oldest first, up to ``max_batch``; if fewer than ``max_batch`` are queued it first waits
    for more, until ``wait_s`` after the oldest job arrived or after the previous batch finished, whichever is
    later. So jobs that arrive while a batch runs all join the next one, and clients that answer a finished batch
    with their next request (closed loop) get ``wait_s`` to do so instead of being split into a small batch.
    (Ray Serve's ``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first item even while the
    previous batch still runs: under 16 closed-loop clients it formed batches of 1 and 2.) ``run`` runs in a worker
    thread so the event loop keeps accepting requests meanwhile.
    """

    def __init__(self, run: Callable[[list[ImageJob]], list[ImageResult]], max_batch: int, wait_s: float) -> None:
        self.run, self.max_batch, self.wait_s = run, max_batch, wait_s
        self._pending: collections.deque[tuple[ImageJob, asyncio.Future, float]] = collections.deque()
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._free_since = float("-inf")  # loop time the previous batch finished

    async def submit(self, job: ImageJob) -> ImageResult:
        loop = asyncio.get_running_loop()
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        future: asyncio.Future = loop.create_future()
        self._pending.append((job, future, loop.time()))
        self._arrived.set()
        return await future

    def _take(self) -> list[tuple[ImageJob, asyncio.Future, float]]:
        """The oldest live job and the live jobs of its key, oldest first, up to max_batch; cancelled ones dropped."""
        self._pending = collections.deque(p for p in self._pending if not p[1].done())
        if not self._pending:
            return []
        key = self._pending[0][0].key
        taken, kept = [], collections.deque()
        for item in self._pending:
            (taken if item[0].key == key and len(taken) < self.max_batch else kept).append(item)
        self._pending = kept
        return taken

    def _ready(self) -> int:
        if not self._pending:
            return 0
        key = self._pending[0][0].key
        return sum(1 for job, future, _ in self._pending if job.key == key and not future.done())

    async def _work(self) -> None:
        assert self._arrived is not None
        loop = asyncio.get_running_loop()
        while True:
            while not self._pending:
                self._arrived.clear()
                await self._arrived.wait()
            deadline = max(self._pending[0][2], self._free_since) + self.wait_s
            while self._ready() < self.max_batch and (left := deadline - loop.time()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            batch = self._take()
            if not batch:
                continue
            try:
                results = await asyncio.to_thread(self.run, [job for job, _, _ in batch])
            except Exception as exc:  # noqa: BLE001 (run answers errors per job; this is the unexpected rest)
                results = [ImageResult(None, len(batch), 0.0, one_line(exc))] * len(batch)
            self._free_since = loop.time()
            for (_, future, _), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)


class ModelService:
    """A loaded model plus the request rules: the part of a replica that does not depend on Ray."""

    def __init__(self, options: ServeOptions) -> None:
        from runtime.api import load

        self.options = options
        self.sampler = load(options.model, options.backend, options.device, options.precision, options.threads)
        b = self.sampler.backend
        if b.name == "torch":
            raise ValueError(f"{options.model} is a trainer run directory: ddim-serve runs exported models "
                             f"(ddim-export {options.model} first)")
        path = Path(getattr(b, "model_path", None) or options.model)
        self.model_file = path
        self.sha256 = sha256_file(path) if path.is_file() else ""
        self.backend_label = f"{b.name} {b.device} {b.precision}"
        self.stats = Stats()

    def check(self, req: SampleRequest) -> list[ImageJob]:
        """The request's images as jobs; RequestError (413 over a limit, 422 what the model cannot take)."""
        o = self.options
        if req.num_images > o.max_images_per_request:
            raise RequestError(413, f"num_images: {req.num_images} is over this service's limit of "
                                    f"{o.max_images_per_request} images per request")
        if req.steps > o.max_steps:
            raise RequestError(413, f"steps: {req.steps} is over this service's limit of {o.max_steps}")
        try:
            settings = self.sampler.resolve(SamplingSettings(steps=req.steps, eta=req.eta, solver=req.solver))
            self.sampler.plan(settings)
        except SettingsError as exc:
            raise RequestError(422, f"{exc.field}: {one_line(exc)}") from None
        except ValueError as exc:  # what else the model cannot take
            raise RequestError(422, one_line(exc)) from None
        return [ImageJob(req.seed, i, settings) for i in range(req.num_images)]

    def run_batch(self, jobs: Sequence[ImageJob]) -> list[ImageResult]:
        """Sample jobs (from any requests): one network batch per settings, in job order.
        A failing group (a NaN, a backend error) fails its own jobs only, each with a one-line message."""
        out: list[ImageResult | None] = [None] * len(jobs)
        groups: dict[SamplingSettings, list[int]] = {}
        for k, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(k)
        for settings, ks in groups.items():
            start = time.perf_counter()
            try:
                result = self.sampler.sample_images([(jobs[k].seed, jobs[k].index) for k in ks], settings,
                                                    batch_size=len(ks))
            except Exception as exc:  # noqa: BLE001 (a replica answers every error; it must not die)
                for k in ks:
                    out[k] = ImageResult(None, len(ks), time.perf_counter() - start, one_line(exc))
                continue
            seconds = time.perf_counter() - start
            self.stats.batch_sizes[len(ks)] = self.stats.batch_sizes.get(len(ks), 0) + 1
            self.stats.images += len(ks)
            for j, k in enumerate(ks):
                out[k] = ImageResult(result.images[j], len(ks), seconds)
        return [r for r in out if r is not None]

    def info(self) -> dict[str, Any]:
        """``GET /v1/model``: the model's config and export report, what runs it, the service's limits."""
        spec = self.sampler.spec
        export_info: Any = None
        if is_export(self.model_file.parent):
            try:
                export_info = read_report(self.model_file.parent)
            except (OSError, ValueError):
                export_info = None
        o = self.options
        return {
            "toolkit_version": __version__,
            "model_file": self.model_file.name,
            "sha256": self.sha256,
            "backend": self.backend_label,
            "backend_why": self.sampler.why,
            "image_shape": [spec.model.image_size, spec.model.image_size, spec.model.channels],
            "solvers": list(values(Solver)),
            "limits": {"max_images_per_request": o.max_images_per_request, "max_steps": o.max_steps,
                       "max_batch": o.max_batch, "batch_wait_ms": o.batch_wait_ms,
                       "max_body_bytes": MAX_BODY_BYTES},
            "config": json.loads(spec.to_json()),
            "export": export_info,
            "stats": asdict(self.stats),
            "process": {"pid": os.getpid(), "torch_imported": "torch" in sys.modules},
        }


def encode(images: NDArray[np.uint8], jobs: Sequence[ImageJob], fmt: str) -> bytes:
    """The response body: a PNG grid, a zip of PNGs (``{seed}-{index:05d}.png``), or an npz."""
    from runtime.images import grid_bytes, grid_scale, png_bytes

    if fmt == "grid":
        return grid_bytes(images, scale=grid_scale(images.shape[1], len(images)), fmt="PNG")
    buf = io.BytesIO()
    if fmt == "png":
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
            for job, image in zip(jobs, images):
                zf.writestr(f"{job.seed}-{job.index:05d}.png", png_bytes(image))
    else:
        np.savez(buf, images=images, seeds=np.array([j.seed for j in jobs], dtype=np.uint64),
                 indices=np.array([j.index for j in jobs], dtype=np.int64))
    return buf.getvalue()
