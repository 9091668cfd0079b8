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
import io
import json
import math
import os
import sys
import time
import uuid
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field

from runtime import __version__
from runtime.choices import Device, RunPrecision, Solver, Spacing, values
from runtime.common.clitools import one_line
from runtime.exportdir import is_export, read_report
from runtime.common.files import sha256_file
from runtime.serving.batcher import Batcher, Busy, ImageJob, ImageResult, Stats
from runtime.settings import SamplingSettings, SettingsError

MAX_BODY_BYTES = 64 * 1024  # a request body is a few fields of JSON: anything larger is refused unread
Format = Literal["grid", "png", "npz"]
Batching = Literal["request", "step"]
MEDIA_TYPES = {"grid": "image/png", "png": "application/zip", "npz": "application/octet-stream"}


class SampleRequest(BaseModel):
    """``POST /v1/samples``: which images, how to sample them, how to send them back."""

    # strict: JSON types only (true is not 1, "2" is not 2); ``parse_request`` reads the raw body.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    num_images: int = Field(1, ge=1, description="Images to sample: (seed, 0) .. (seed, num_images - 1).")
    steps: int = Field(50, description="Sampling steps (at least 1).")
    seed: int = Field(0, ge=0, le=2**63 - 1, description="Noise seed, as ddim-run --seed.")
    eta: float = Field(0.0, le=1.0, description="0 = deterministic DDIM, 1 = DDPM-like (ddim only).")
    solver: Solver = Field("ddim", description="ddim, or dpmpp-2m (DPM-Solver++(2M), eta 0).")
    spacing: Spacing | None = Field(None, description="How the steps spread over the schedule, as ddim-run "
                                                         "--spacing [default: the solver's on this model].")
    clip_x0: bool | None = Field(None, description="Clip each step's predicted clean image, as ddim-run "
                                                      "--clip-x0 [default: the model's setting].")
    # The rules of steps, eta and solver are SamplingSettings' (checked in ModelService.check, 422 naming the
    # field); what is left here is the service's own bound on eta.
    format: Format = Field("grid", description="grid: one PNG grid; png: a zip of one PNG per image; "
                                               "npz: numpy arrays images (N, H, W, C) uint8, seeds, indices.")


class ModelChanged(RuntimeError):
    """The file at the model path is not the one the service started with."""


def parse_request(body: bytes) -> SampleRequest:
    """A request body -> :class:`SampleRequest`, strictly (pydantic's JSON parser: bad UTF-8, bad JSON, deep
    nesting and wrong types are all ``pydantic.ValidationError``)."""
    return SampleRequest.model_validate_json(body or b"{}")


def validation_message(errors: Sequence[Any]) -> str:
    """pydantic's errors as one line naming each field."""
    lines = []
    for e in errors:
        where = ".".join(str(p) for p in e.get("loc", ()) if isinstance(p, str) and p != "body") or "body"
        lines.append(f"{where}: {e.get('msg', 'invalid')}")
    return "; ".join(lines) or "invalid request"


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
    max_queue_s: float = 60.0  # admission: a request that would finish later than this is a 503 (Busy)
    batching: Batching = "step"  # step: images join the running batch at any step; request: a batch runs first to last
    sha256: str = ""  # the model file a replica must find; "" = whatever is there (checked by the caller)

    def __post_init__(self) -> None:
        from runtime.backends.registry import names

        if self.backend not in names(serve=True):
            raise ValueError(f"--backend {self.backend}: ddim-serve runs the lean runtime "
                             f"({', '.join(names(serve=True))}); export a trainer run with ddim-export first")
        for name in ("max_batch", "max_images_per_request", "max_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.batching not in ("request", "step"):
            raise ValueError(f"--batching must be request or step, got {self.batching!r}")
        for name, value in (("batch_wait_ms", self.batch_wait_ms), ("max_queue_s", self.max_queue_s)):
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"--{name.replace('_', '-')} must be a finite number >= 0, got {value}")


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
        if options.sha256 and self.sha256 != options.sha256:
            # A restarted replica must not serve whatever now lies at the path (another export copied there).
            raise ModelChanged(f"{path}: sha256 {self.sha256[:12] or '(missing)'} is not the model this service "
                               f"started with ({options.sha256[:12]}); restart ddim-serve to serve it")
        self.backend_label = f"{b.name} {b.device} {b.precision}"
        self.stats = Stats()

    def measure(self, max_batch: int) -> float | None:
        """Image-steps per second of a small warm batch: admission's first estimate (refined at every step);
        None when the model cannot sample (its requests will say why)."""
        n = max(1, min(max_batch, 4))
        images = [(0, i) for i in range(n)]
        try:
            settings = self.sampler.resolve(SamplingSettings(steps=2))
            self.sampler.sample_images(images, settings, batch_size=n)  # warm-up
            start = time.perf_counter()
            self.sampler.sample_images(images, settings, batch_size=n)
        except Exception:  # noqa: BLE001 (a NaN model still starts: each request gets its one-line 500)
            return None
        return 2 * n / max(time.perf_counter() - start, 1e-6)

    def check(self, req: SampleRequest, request: int = 0) -> list[ImageJob]:
        """The request's images as jobs; RequestError (413 over a limit, 422 what the model cannot take)."""
        o = self.options
        if req.num_images > o.max_images_per_request:
            raise RequestError(413, f"num_images: {req.num_images} is over this service's limit of "
                                    f"{o.max_images_per_request} images per request")
        if req.steps > o.max_steps:
            raise RequestError(413, f"steps: {req.steps} is over this service's limit of {o.max_steps}")
        try:
            settings = self.sampler.resolve(SamplingSettings(steps=req.steps, eta=req.eta, solver=req.solver,
                                                             spacing=req.spacing, clip_x0=req.clip_x0))
            self.sampler.plan(settings)
        except SettingsError as exc:
            raise RequestError(422, f"{exc.field}: {one_line(exc)}") from None
        except ValueError as exc:  # what else the model cannot take
            raise RequestError(422, one_line(exc)) from None
        return [ImageJob(req.seed, i, settings, request) for i in range(req.num_images)]

    def run_batch(self, jobs: Sequence[ImageJob], on_step: Callable[[int], None] | None = None) -> list[ImageResult]:
        """Sample jobs (from any requests): one network batch per settings, in job order; ``on_step`` after every
        network step (the batcher's accounting and preemption point).
        A failing group (a NaN, a backend error) fails its own jobs only, each with a one-line message."""
        out: list[ImageResult | None] = [None] * len(jobs)
        groups: dict[SamplingSettings, list[int]] = {}
        for k, job in enumerate(jobs):
            groups.setdefault(job.key, []).append(k)
        for settings, ks in groups.items():
            start = time.perf_counter()
            try:
                result = self.sampler.sample_images([(jobs[k].seed, jobs[k].index) for k in ks], settings,
                                                    batch_size=len(ks), on_step=on_step)
            except Exception as exc:  # noqa: BLE001 (a replica answers every error; it must not die)
                for k in ks:
                    out[k] = ImageResult(None, len(ks), time.perf_counter() - start, one_line(exc), start)
                continue
            seconds = time.perf_counter() - start
            self.stats.batch_sizes[len(ks)] = self.stats.batch_sizes.get(len(ks), 0) + 1
            self.stats.images += len(ks)
            for j, k in enumerate(ks):
                out[k] = ImageResult(result.images[j], len(ks), seconds, started=start)
        return [r for r in out if r is not None]

    def stats_now(self) -> dict[str, Any]:
        """A copy of the statistics (the worker thread adds batch sizes meanwhile: retry a copy it disturbed)."""
        for _ in range(10):
            try:
                return asdict(self.stats)
            except RuntimeError:  # "dictionary changed size during iteration"
                continue
        return {}

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
                       "max_body_bytes": MAX_BODY_BYTES, "max_queue_s": o.max_queue_s},
            "batching": o.batching,
            "config": json.loads(spec.to_json()),
            "export": export_info,
            "stats": self.stats_now(),
            "process": {"pid": os.getpid(), "torch_imported": "torch" in sys.modules},
        }


@dataclass(frozen=True)
class Report:
    """What a replica's answer tells the front's metrics, never the client: which replica (an id for its life), its
    running totals (batches by size, images), and this request's queue wait and sampling time (None unless it was
    sampled)."""

    replica: str
    batch_sizes: dict[int, int]
    images: int
    queue_s: float | None = None
    sampling_s: float | None = None


@dataclass
class Answer:
    """An HTTP answer built without Ray: what a replica returns to the ingress (``report`` stays at the front)."""

    status: int
    body: bytes
    media_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    report: Report | None = None

    @classmethod
    def error(cls, status: int, message: str, **headers: str) -> "Answer":
        return cls(status, json.dumps({"error": message}).encode(), headers=dict(headers))


class Replica:
    """A replica's work without Ray: a loaded model, its batcher, and ``POST /v1/samples``'s answer."""

    def __init__(self, options: ServeOptions) -> None:
        self.core = ModelService(options)
        throughput = self.core.measure(options.max_batch)
        if options.batching == "step":
            from runtime.images import to_uint8
            from runtime.serving.stepbatcher import StepBatcher
            from runtime.stepping import StepBatch

            norm = self.core.sampler.spec.normalization
            self.batcher: Batcher = StepBatcher(StepBatch(self.core.sampler, options.max_batch),
                                                lambda sample: to_uint8(sample[None], norm)[0],
                                                options.batch_wait_ms / 1000, max_queue_s=options.max_queue_s,
                                                throughput=throughput)
        else:
            self.batcher = Batcher(self.core.run_batch, options.max_batch, options.batch_wait_ms / 1000,
                                   max_queue_s=options.max_queue_s, throughput=throughput)
        self.batcher.stats = self.core.stats
        self.id = uuid.uuid4().hex  # this replica's life: a restarted one reports totals of its own

    async def samples(self, fields: dict[str, Any]) -> Answer:
        """Validate (413/422), admit (503 + Retry-After), sample fairly, encode (200); every error one JSON line.
        Every answer carries this replica's :class:`Report` for the front's metrics."""
        times: dict[str, float] = {}
        answer = await self._samples(fields, times)
        answer.report = self.report(**times)
        return answer

    def report(self, queue_s: float | None = None, sampling_s: float | None = None) -> Report:
        stats = self.core.stats_now()
        return Report(self.id, stats.get("batch_sizes", {}), stats.get("images", 0), queue_s, sampling_s)

    async def _samples(self, fields: dict[str, Any], times: dict[str, float]) -> Answer:
        """:meth:`samples`' answer; ``times`` gets the request's ``queue_s`` and ``sampling_s`` once sampled."""
        start = time.perf_counter()
        try:
            req = SampleRequest.model_validate(fields)
            request = self.batcher.new_request()
            jobs = self.core.check(req, request)
            self.batcher.admit(sum(job.cost for job in jobs))
            admitted = time.perf_counter()
        except RequestError as exc:
            return Answer.error(exc.status, str(exc))
        except Busy as exc:
            return Answer.error(503, str(exc), **{"Retry-After": str(exc.retry_after)})
        except ValueError as exc:  # pydantic's ValidationError: the ingress validated already; one line anyway
            return Answer.error(422, one_line(exc))
        try:
            results = await self.batcher.submit_all(jobs)
        except Exception as exc:  # noqa: BLE001 (the batcher's own failure: still one line, still up)
            return Answer.error(500, f"sampling failed: {one_line(exc)}")
        failed = next((r.error for r in results if r.error is not None), None)
        if failed is not None:
            return Answer.error(500, f"sampling failed: {failed}")
        first = min(r.started for r in results)
        times.update(queue_s=max(0.0, first - admitted),
                     sampling_s=max(r.started + r.seconds for r in results) - first)
        images = np.stack([r.image for r in results])  # type: ignore[misc]
        try:
            body = await asyncio.to_thread(encode, images, jobs, req.format)
        except Exception as exc:  # noqa: BLE001
            return Answer.error(500, f"encoding failed: {one_line(exc)}")
        self.core.stats.requests += 1
        name = {"grid": "samples.png", "png": "samples.zip", "npz": "samples.npz"}[req.format]
        return Answer(200, body, MEDIA_TYPES[req.format], {
            "X-Model-SHA256": self.core.sha256,
            "X-Backend": self.core.backend_label,
            "X-Seconds": f"{time.perf_counter() - start:.4f}",
            "X-Queue-Seconds": f"{times['queue_s']:.4f}",
            "X-Sampling-Seconds": f"{times['sampling_s']:.4f}",
            "X-Batch-Sizes": ",".join(str(r.batch) for r in results),
            "Content-Disposition": f'attachment; filename="{name}"',
        })


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
