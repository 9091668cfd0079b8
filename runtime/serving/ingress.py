"""``ddim-serve``'s HTTP front: the one process that talks to clients, in front of the replicas.

    POST /v1/samples   {num_images, steps, seed, eta, solver, spacing, clip_x0, format}  -> PNG grid | zip | npz
    GET  /v1/model     the model's config, export report, backend, limits, the batches formed so far, and the
                       service's replicas by state
    GET  /healthz      {"status": "ok"} while a replica is running, else 503 naming why
    GET  /metrics      Prometheus metrics: answers by route and status, times, batches (runtime.serving.metrics)
    GET  /docs, /openapi.json   the OpenAPI schema (FastAPI)

Clients never reach a replica directly: this front reads the headers (within ``header_timeout_s``, at most
:data:`MAX_HEADER_BYTES`) and the whole body (within ``body_timeout_s``, at most ``MAX_BODY_BYTES``), parses it
strictly, and only then forwards the request's fields to a replica. So a stalled or trickling client holds a
socket here until its deadline (then 408), never a replica's slot or its queue. Every answer, the front's own
refusals included, is JSON ``{"error": "one line"}`` with the documented status. With an API token
(:mod:`runtime.serving.auth`) every route but ``GET /healthz`` needs it.

The front is Ray-free: it forwards through a :class:`Forwarder` (Ray Serve's deployment handle in
:mod:`runtime.serving.cli`, an in-process :class:`runtime.serving.core.Replica` in tests and ``LocalForwarder``).
It runs on uvicorn with :class:`GuardedH11Protocol` (the header deadline, the connection cap, JSON refusals).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, Protocol

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from runtime import __version__
from runtime.common.clitools import one_line
from runtime.serving.auth import OPEN_ROUTES, BearerAuth, check_token
from runtime.serving.core import (
    MAX_BODY_BYTES, Answer, Replica, SampleRequest, parse_request, validation_message,
)
from runtime.serving.metrics import FrontMetrics, Measured, route_paths

MAX_HEADER_BYTES = 16 * 1024  # request line and headers together (h11's incomplete-event limit)


@dataclass(frozen=True)
class FrontOptions:
    """What the front bounds (deadlines for a client's headers and body, connections, the shutdown's grace) and
    whom it serves (``api_token``: the bearer token every route but GET /healthz needs; None: anyone)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 10.0
    max_connections: int = 1000
    grace_s: float = 30.0  # at shutdown, in-flight requests get this long before a JSON 503
    api_token: str | None = field(default=None, repr=False)  # never in a repr, a log or a message

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "body_timeout_s", "grace_s"):
            value = getattr(self, name)
            if not (value > 0 and value < 1e6):
                raise ValueError(f"--{name.replace('_s', '').replace('_', '-')} must be a finite number of seconds "
                                 f"> 0, got {value}")
        if self.max_connections < 1:
            raise ValueError(f"--max-connections must be >= 1, got {self.max_connections}")
        if self.api_token is not None:
            check_token(self.api_token, "api_token")


class Unavailable(RuntimeError):
    """No replica can take the request now (a 503 with Retry-After)."""

    def __init__(self, message: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Forwarder(Protocol):
    """Where the front sends validated requests."""

    async def samples(self, fields: dict[str, Any]) -> Answer: ...
    async def info(self) -> dict[str, Any]: ...
    def health(self) -> str | None: ...  # None: serving; else why not (one line)
    def replicas(self) -> dict[str, int]: ...  # replicas by state (running, starting, stopping); {}: unknown


class LocalForwarder:
    """A replica in this process (tests, and a front without Ray)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    async def samples(self, fields: dict[str, Any]) -> Answer:
        return await self.replica.samples(fields)

    async def info(self) -> dict[str, Any]:
        return self.replica.core.info()

    def health(self) -> str | None:
        return None

    def replicas(self) -> dict[str, int]:
        return {"running": 1, "starting": 0, "stopping": 0}


def raw_json(status: int, reason: str, message: str, retry_after: int | None = None) -> bytes:
    """A complete HTTP/1.1 JSON answer that closes the connection (written by the protocol, outside any app)."""
    body = json.dumps({"error": message}).encode()
    retry = f"retry-after: {retry_after}\r\n" if retry_after is not None else ""
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"{retry}connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers, a cap on open connections, and JSON for
    the refusals uvicorn answers in plain text (a malformed or oversized request head)."""

    header_timeout_s = 10.0  # set per server by :func:`protocol_for`
    max_connections = 1000
    metrics: FrontMetrics | None = None  # counts the refusals written here (route "none")

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            self._count(503)
            transport.write(raw_json(503, "Service Unavailable",
                                     f"over {self.max_connections} open connections; retry later", retry_after=1))
            transport.close()
            return
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_late)

    def _disarm(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()  # type: ignore[union-attr]
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self._count(408)
            self.transport.write(raw_json(408, "Request Timeout",
                                          f"request headers not received within {self.header_timeout_s:g} s"))
            self.transport.close()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and not self.cycle.response_complete:
            self._disarm()  # the head is in: the body has its own deadline (in the app)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _count(self, status: int) -> None:
        if self.metrics is not None:
            self.metrics.refused(status)

    def send_400_response(self, msg: str) -> None:
        self._count(400)
        self.transport.write(raw_json(400, "Bad Request", f"malformed HTTP request ({msg.rstrip('.')}; "
                                                          f"the head may be at most {MAX_HEADER_BYTES} bytes)"))
        self.transport.close()


def protocol_for(options: FrontOptions, metrics: FrontMetrics | None = None) -> type[GuardedH11Protocol]:
    return type("Guarded", (GuardedH11Protocol,), {"header_timeout_s": options.header_timeout_s,
                                                   "max_connections": options.max_connections,
                                                   "metrics": metrics})


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_body(request: Request, timeout_s: float, max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """The whole body within ``timeout_s`` of the head (408) and at most ``max_bytes`` (413, unread past it)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > max_bytes):
        raise _Refused(413, f"request body over {max_bytes} bytes")
    chunks: list[bytes] = []
    size = 0

    async def collect() -> None:
        nonlocal size
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise _Refused(413, f"request body over {max_bytes} bytes")
            chunks.append(chunk)

    try:
        await asyncio.wait_for(collect(), timeout_s)
    except asyncio.TimeoutError:
        raise _Refused(408, f"request body not received within {timeout_s:g} s") from None
    except ClientDisconnect:  # nobody to answer; the status is for the record only
        raise _Refused(400, "the client left before sending its whole body") from None
    return b"".join(chunks)


class HeadLimit:
    """431 for a request head over :data:`MAX_HEADER_BYTES` that arrived whole (h11 bounds only incomplete ones)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"") + sum(
                len(k) + len(v) + 4 for k, v in scope.get("headers") or [])
            if size > MAX_HEADER_BYTES:
                await closing(431, f"request head over {MAX_HEADER_BYTES} bytes")(scope, receive, send)
                return
        await self.app(scope, receive, send)


def error(status: int, message: str, **headers: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers or None)


def closing(status: int, message: str, **headers: str) -> JSONResponse:
    """An error after which the connection is closed (the client may still be sending)."""
    return error(status, message, connection="close", **headers)


REQUEST_SCHEMA = SampleRequest.model_json_schema()


def make_app(forwarder: Forwarder, options: FrontOptions = FrontOptions()) -> FastAPI:
    """The front's FastAPI app; ``app.state.draining`` (an Event) set at shutdown starts the grace period,
    ``app.state.metrics`` holds what ``GET /metrics`` shows."""
    api = FastAPI(title="ddim-serve", version=__version__,
                  description="Sample images from a ddim-deploy model. The same (seed, index) gives the same image "
                              "as ddim-run --seed.")
    api.state.draining = Draining()
    metrics = api.state.metrics = FrontMetrics(forwarder.replicas)
    # Outermost last: every answer is counted (431 and 401 too), a head over the limit is refused before its
    # token is looked at.
    if options.api_token is not None:
        api.add_middleware(BearerAuth, token=options.api_token)
    api.add_middleware(HeadLimit)
    api.add_middleware(Measured, metrics=metrics)

    @api.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail))

    @api.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return error(500, f"internal error: {one_line(exc)}")

    @api.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, validation_message(exc.errors()))

    async def forward(fields: dict[str, Any]) -> Answer:
        """The replica's answer; a JSON 503 when none can give it (gone, full, or the grace period ran out)."""
        call = asyncio.ensure_future(forwarder.samples(fields))
        drained = asyncio.ensure_future(api.state.draining.grace_over(options.grace_s))
        try:
            done, _ = await asyncio.wait({call, drained}, return_when=asyncio.FIRST_COMPLETED)
            if call not in done:
                call.cancel()
                return Answer.error(503, "the service is shutting down; retry on another instance",
                                    **{"Retry-After": "5"})
            return call.result()
        except Unavailable as exc:
            return Answer.error(503, str(exc), **{"Retry-After": str(exc.retry_after)})
        finally:
            drained.cancel()

    @api.post("/v1/samples", response_class=Response, openapi_extra={
        "requestBody": {"required": False, "content": {"application/json": {
            "schema": {"$ref": "#/components/schemas/SampleRequest"}}}}},
        responses={
            200: {"content": {"image/png": {}, "application/zip": {}, "application/octet-stream": {}},
                  "description": "The images: a PNG grid (grid), a zip of PNGs (png) or an npz (npz)."},
            401: {"description": "an API token is set and the request has none, or a wrong one"},
            408: {"description": "the request's headers or body did not arrive within the deadline"},
            413: {"description": "num_images or steps over the service's limits, or a body over 64 KB"},
            422: {"description": "a field the schema or the model cannot take (the message names it)"},
            500: {"description": "sampling failed (a NaN names its step); the service stays up"},
            503: {"description": "busy (the queue is full), no replica running, or shutting down: retry after "
                                 "Retry-After seconds"}})
    async def samples(request: Request) -> Response:
        if api.state.draining.is_set():
            return closing(503, "the service is shutting down; retry on another instance", **{"Retry-After": "5"})
        try:
            body = await read_body(request, options.body_timeout_s)
            req = parse_request(body)
        except _Refused as exc:
            return closing(exc.status, str(exc))
        except ValidationError as exc:
            return error(422, validation_message(exc.errors()))
        why = forwarder.health()
        if why is not None:
            return error(503, f"no replica is serving: {why}", **{"Retry-After": "5"})
        try:
            answer = await forward(req.model_dump())
        except Exception as exc:  # noqa: BLE001 (a replica that died, a Ray error: one line, still up)
            return error(503, f"the replica did not answer: {one_line(exc)}; retry", **{"Retry-After": "1"})
        metrics.replica_answer(answer)
        return Response(answer.body, status_code=answer.status, media_type=answer.media_type,
                        headers=answer.headers)

    @api.get("/v1/model")
    async def model() -> Response:
        why = forwarder.health()
        if why is not None:
            return error(503, f"no replica is serving: {why}", **{"Retry-After": "5"})
        try:
            info = await asyncio.wait_for(forwarder.info(), 30)
        except Exception as exc:  # noqa: BLE001
            return error(503, f"the replica did not answer: {one_line(exc) or 'timeout'}", **{"Retry-After": "1"})
        return JSONResponse({**info, "replicas": forwarder.replicas()})  # the service's; the rest is one replica's

    @api.get("/healthz")
    async def healthz() -> Response:
        if api.state.draining.is_set():
            return error(503, "shutting down", **{"Retry-After": "5"})
        why = forwarder.health()
        if why is not None:
            return error(503, f"no replica is serving: {why}")
        return JSONResponse({"status": "ok"})

    @api.get("/metrics", response_class=Response, responses={200: {
        "content": {"text/plain": {}, "application/openmetrics-text": {}},
        "description": "Prometheus text format (OpenMetrics when the Accept header asks for it)."}})
    async def scrape(request: Request) -> Response:
        body, content_type = metrics.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    metrics.routes = route_paths(api.routes)
    plain_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        """FastAPI's schema plus the request body's model (the route reads the raw body itself) and, with a token,
        the bearer scheme every route but the open ones needs."""
        if api.openapi_schema is None:
            schema = plain_openapi()
            schema.setdefault("components", {}).setdefault("schemas", {})["SampleRequest"] = REQUEST_SCHEMA
            if options.api_token is not None:
                bearer_scheme(schema)
        return api.openapi_schema  # type: ignore[return-value]

    api.openapi = openapi  # type: ignore[method-assign]
    return api


def bearer_scheme(schema: dict[str, Any]) -> None:
    """Declare the bearer token in an OpenAPI schema: required everywhere, none on :data:`OPEN_ROUTES`."""
    schema["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    schema["security"] = [{"bearer": []}]
    for method, path in OPEN_ROUTES:
        operation = schema.get("paths", {}).get(path, {}).get(method.lower())
        if operation is not None:
            operation["security"] = []


class Draining(asyncio.Event):
    """Set at shutdown; ``grace_over(s)`` returns ``s`` seconds after it was set (not after each caller began)."""

    since: float | None = None

    def set(self) -> None:
        if self.since is None:
            self.since = time.monotonic()
        super().set()

    async def grace_over(self, grace_s: float) -> None:
        await self.wait()
        assert self.since is not None
        await asyncio.sleep(max(0.0, self.since + grace_s - time.monotonic()))


def make_server(app: FastAPI, host: str, port: int, options: FrontOptions) -> Any:
    """A uvicorn server for ``app`` with the guarded protocol; ``serve()`` it on an event loop. It leaves signals
    to its caller (``ddim-serve`` drains on SIGINT/SIGTERM itself)."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    protocol = protocol_for(options, getattr(app.state, "metrics", None))
    config = uvicorn.Config(app, host=host, port=port, http=protocol, lifespan="off",
                            log_level="warning", access_log=False, timeout_keep_alive=5,
                            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
                            # uvicorn cancels what is left after this: the body deadline and the grace must fit
                            timeout_graceful_shutdown=math.ceil(options.grace_s + options.body_timeout_s) + 5)
    return Server(config)


class ThreadedFront:
    """A front on a free port of 127.0.0.1, served by a thread (tests, and an in-process service):
    ``with ThreadedFront(forwarder) as url: ...``; ``drain()`` starts a shutdown as a signal would."""

    def __init__(self, forwarder: Forwarder, options: FrontOptions = FrontOptions(), port: int = 0) -> None:
        self.app = make_app(forwarder, options)
        self.server = make_server(self.app, "127.0.0.1", port, options)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True, name="ddim-serve-front")

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.run_until_complete(self.server.serve())

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the front did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}"

    def drain(self) -> None:
        assert self.loop is not None
        self.loop.call_soon_threadsafe(self.app.state.draining.set)
        self.server.should_exit = True

    def __exit__(self, *exc: Any) -> None:
        self.drain()
        self.thread.join(60)
