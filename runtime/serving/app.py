"""The Ray Serve application of ``ddim-serve``: a FastAPI ingress over :class:`runtime.serving.core.ModelService`.

    POST /v1/samples   {num_images, steps, seed, eta, solver, format}  -> PNG grid | zip of PNGs | npz
    GET  /v1/model     the model's config, export report, backend, limits and the batches formed so far
    GET  /healthz      {"status": "ok"} once the replica has loaded its model
    GET  /docs, /openapi.json   the OpenAPI schema (FastAPI)

Batching: a request becomes one job per image; the replica's :class:`runtime.serving.core.Batcher` merges the
jobs of concurrent requests with the same sampling settings into network batches of up to ``--max-batch``,
taken whenever the replica is free (waiting at most ``--batch-wait-ms`` for a batch to fill), and samples them in
a worker thread (the event loop keeps taking requests meanwhile).

No ``from __future__ import annotations`` here: FastAPI reads the route annotations (``req: SampleRequest``) at
run time, and through Serve's class ingress string annotations are not resolved (the body became a query
parameter).
"""

import asyncio
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve

from runtime import __version__
from runtime.common.clitools import one_line
from runtime.serving.core import (
    MAX_BODY_BYTES, MEDIA_TYPES, Batcher, ModelService, RequestError, SampleRequest, ServeOptions,
    encode,
)

api = FastAPI(title="ddim-serve", version=__version__,
              description="Sample images from a ddim-deploy model. The same (seed, index) gives the same image as "
                          "ddim-run --seed.")


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with 413, by Content-Length or while they stream in."""

    def __init__(self, app: Any, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = JSONResponse({"error": f"request body over {self.max_bytes} bytes"}, status_code=413)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await refusal(scope, receive, send)
            return
        seen, refused = 0, False

        async def limited() -> dict:
            nonlocal seen, refused
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes and not refused:
                    # Answer now and tell the app the client left: FastAPI would turn an exception into a 400.
                    refused = True
                    await refusal(scope, receive, send)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict) -> None:
            if not refused:
                await send(message)

        try:
            await self.app(scope, limited, guarded_send)
        except Exception:
            if not refused:
                raise


api.add_middleware(BodyLimit)


@api.exception_handler(RequestValidationError)
async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """422 with one line naming the field (FastAPI's list stays under ``detail``)."""
    errors = exc.errors()
    lines = []
    for e in errors:
        where = ".".join(p for p in e.get("loc", ())[1:] if isinstance(p, str)) or "body"
        lines.append(f"{where}: {e.get('msg', 'invalid')}")
    return JSONResponse({"error": "; ".join(lines) or "invalid request",
                         "detail": [{k: e[k] for k in ("loc", "msg", "type") if k in e} for e in errors]},
                        status_code=422)


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


@serve.deployment(name="ddim", max_ongoing_requests=256, health_check_period_s=5)
@serve.ingress(api)
class DDIMService:
    """One replica: a loaded model, a batcher, the HTTP routes."""

    def __init__(self, options: ServeOptions) -> None:
        self.core = ModelService(options)
        self.batcher = Batcher(self.core.run_batch, options.max_batch, options.batch_wait_ms / 1000)

    @api.post("/v1/samples", response_class=Response, responses={
        200: {"content": {"image/png": {}, "application/zip": {}, "application/octet-stream": {}},
              "description": "The images: a PNG grid (grid), a zip of PNGs (png) or an npz (npz)."},
        413: {"description": "num_images or steps over the service's limits, or a body over 64 KB"},
        422: {"description": "a field the schema or the model cannot take (the message names it)"},
        500: {"description": "sampling failed (a NaN names its step); the service stays up"}})
    async def samples(self, req: SampleRequest) -> Response:
        start = time.perf_counter()
        try:
            jobs = self.core.check(req)
        except RequestError as exc:
            return error(exc.status, str(exc))
        try:
            results = await asyncio.gather(*(self.batcher.submit(job) for job in jobs))
        except Exception as exc:  # noqa: BLE001 (the batcher's own failure: still one line, still up)
            return error(500, f"sampling failed: {one_line(exc)}")
        failed = next((r.error for r in results if r.error is not None), None)
        if failed is not None:
            return error(500, f"sampling failed: {failed}")
        images = np.stack([r.image for r in results])  # type: ignore[misc]
        try:
            body = await asyncio.to_thread(encode, images, jobs, req.format)
        except Exception as exc:  # noqa: BLE001
            return error(500, f"encoding failed: {one_line(exc)}")
        self.core.stats.requests += 1
        seconds = time.perf_counter() - start
        name = {"grid": "samples.png", "png": "samples.zip", "npz": "samples.npz"}[req.format]
        return Response(body, media_type=MEDIA_TYPES[req.format], headers={
            "X-Model-SHA256": self.core.sha256,
            "X-Backend": self.core.backend_label,
            "X-Seconds": f"{seconds:.4f}",
            "X-Sampling-Seconds": f"{max(r.seconds for r in results):.4f}",
            "X-Batch-Sizes": ",".join(str(r.batch) for r in results),
            "Content-Disposition": f'attachment; filename="{name}"',
        })

    @api.get("/v1/model")
    async def model(self) -> dict[str, Any]:
        return self.core.info()

    @api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


def build(options: ServeOptions, replicas: int = 1, replica_cpus: float = 1.0, replica_gpus: float = 0.0) -> Any:
    """The bound application ``serve.run`` deploys (Ray hides GPUs from actors that ask for none)."""
    return DDIMService.options(num_replicas=replicas,
                               ray_actor_options={"num_cpus": replica_cpus, "num_gpus": replica_gpus}).bind(options)
