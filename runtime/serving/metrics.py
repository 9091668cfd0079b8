"""``GET /metrics`` of ``ddim-serve``'s front: what it answered and what its replicas ran, in Prometheus' text
format (OpenMetrics when the scraper asks for it), from a registry of its own (never prometheus_client's global
one: two fronts in one process, or a test's, must not share counts).

The front sees every answer it sends, so it counts them itself: by route and status (its own refusals too, those
the protocol writes before any route is known under route ``none``), their time, and the requests in flight. What
only a replica knows travels in its answer (:class:`runtime.serving.core.Report`): the request's queue wait and
sampling time, and the replica's running totals of batches by size and images sampled. Totals rather than
per-request shares, because a batch mixes requests: the front keeps the largest total each replica has reported
(they only grow, so the largest is the latest) and exports their sum, so a restarted replica (new totals from 0)
never makes a counter go back.
"""

from __future__ import annotations

import threading
import time
from typing import Any, Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.utils import floatToGoString

from runtime.serving.core import Answer, Report

NO_ROUTE = "none"  # answered by the protocol before a request was read (header deadline, connection cap, bad head)
OTHER_ROUTE = "other"  # a path that is no route of the app (any path a client sends must not become a label)
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(13))  # 1 .. 4096, the most --max-batch allows


class ReplicaTotals:
    """A collector of what the replicas report about themselves: batches by size and images sampled, summed over
    every replica this front has heard from (each kept at the largest totals it reported)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._batches: dict[str, dict[int, int]] = {}  # replica -> batch size -> batches
        self._images: dict[str, int] = {}

    def update(self, report: Report) -> None:
        with self._lock:
            batches = self._batches.setdefault(report.replica, {})
            for size, count in report.batch_sizes.items():
                batches[size] = max(batches.get(size, 0), count)
            self._images[report.replica] = max(self._images.get(report.replica, 0), report.images)

    def collect(self) -> Iterator[Any]:
        with self._lock:
            sizes: dict[int, int] = {}
            for batches in self._batches.values():
                for size, count in batches.items():
                    sizes[size] = sizes.get(size, 0) + count
            images = sum(self._images.values())
        images_family = CounterMetricFamily(
            "ddim_serve_images_sampled", "Images the replicas sampled (as of their latest answers).")
        images_family.add_metric([], images)
        yield images_family
        buckets = [(floatToGoString(bound), sum(c for s, c in sizes.items() if s <= bound)) for bound in BATCH_BUCKETS]
        buckets.append(("+Inf", sum(sizes.values())))
        yield HistogramMetricFamily(
            "ddim_serve_batch_size", "Images per network batch, as the replicas ran them.",
            buckets=buckets, sum_value=sum(s * c for s, c in sizes.items()))


class ReplicaCount:
    """A collector of the replicas by state (``running``, ``starting``, ``stopping``) as the front's health watcher
    last read them from Serve (every second): a replica count that ``--autoscale`` moves shows here. Nothing
    (no sample) when the front has no count to give."""

    def __init__(self, states: Callable[[], dict[str, int]]) -> None:
        self.states = states

    def collect(self) -> Iterator[Any]:
        states = self.states()
        if not states:
            return
        family = GaugeMetricFamily("ddim_serve_replicas", "Replicas of the service by state (running: serving "
                                   "requests; starting; stopping: draining before removal), as Serve reported them "
                                   "within the last second or so.", labels=["state"])
        for state in sorted(states):
            family.add_metric([state], states[state])
        yield family


class FrontMetrics:
    """The front's metrics: the app's middleware (:class:`Measured`) and the protocol count answers, the samples
    route reports each replica answer; :meth:`exposition` renders them for a scrape. ``replica_states``: where the
    replica count comes from (the forwarder's)."""

    def __init__(self, replica_states: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.routes: frozenset[str] = frozenset()  # set by the app once its routes exist
        r = self.registry
        self.requests = Counter("ddim_serve_requests", "Answers the front sent, by route and HTTP status "
                                "(route none: refused by the protocol before a request was read).",
                                ["route", "status"], registry=r)
        self.request_seconds = Histogram("ddim_serve_request_seconds", "Time from a request's head to its answer "
                                         "at the front, by route.", ["route"], buckets=SECONDS_BUCKETS, registry=r)
        self.in_flight = Gauge("ddim_serve_requests_in_flight", "Requests the front is handling now (this scrape "
                               "included).", registry=r)
        self.queue_seconds = Histogram("ddim_serve_queue_wait_seconds", "Per sampled request: from the replica "
                                       "admitting it to its first network batch.", buckets=SECONDS_BUCKETS,
                                       registry=r)
        self.sampling_seconds = Histogram("ddim_serve_sampling_seconds", "Per sampled request: from its first "
                                          "network batch to its last image.", buckets=SECONDS_BUCKETS, registry=r)
        self.replicas = ReplicaTotals()
        r.register(self.replicas)  # type: ignore[arg-type]
        if replica_states is not None:
            r.register(ReplicaCount(replica_states))  # type: ignore[arg-type]

    def route(self, path: str) -> str:
        """The route label of a path: the route itself, or ``other`` (labels never hold what a client made up)."""
        return path if path in self.routes else OTHER_ROUTE

    def answered(self, route: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(route, str(status)).inc()
        if seconds is not None:
            self.request_seconds.labels(route).observe(seconds)

    def refused(self, status: int) -> None:
        """An answer the protocol wrote itself (no route: the request was never read)."""
        self.answered(NO_ROUTE, status)

    def replica_answer(self, answer: Answer) -> None:
        """What a replica's answer says about its work: the request's times (sampled ones) and its totals."""
        report = answer.report
        if report is None:
            return
        if answer.status == 200 and report.queue_s is not None and report.sampling_s is not None:
            self.queue_seconds.observe(report.queue_s)
            self.sampling_seconds.observe(report.sampling_s)
        self.replicas.update(report)

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """(body, content type) for a scrape: the text format, or OpenMetrics when ``accept`` asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


class Measured:
    """ASGI middleware: every answer of the app counted by route and status and timed, and the in-flight gauge.
    An exception that escapes the app is counted as the 500 that FastAPI's outer error handler sends; a request
    cancelled before any answer (the server stopping) sent nothing and is not counted."""

    def __init__(self, app: Any, metrics: FrontMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        route = m.route(scope.get("path", ""))
        status: int | None = None

        async def sending(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        start = time.perf_counter()
        m.in_flight.inc()
        try:
            await self.app(scope, receive, sending)
        except Exception:
            status = status or 500
            raise
        finally:
            m.in_flight.dec()
            if status is not None:
                m.answered(route, status, time.perf_counter() - start)


def route_paths(routes: Iterable[Any]) -> frozenset[str]:
    """The paths of an app's routes (ours have no path parameters: a path is its own label)."""
    return frozenset(p for p in (getattr(r, "path", None) for r in routes) if p)
