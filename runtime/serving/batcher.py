"""The batcher of a ``ddim-serve`` replica: image jobs of concurrent requests merged into network batches,
fairly (least-served request first, small requests overtaking a long batch at a step boundary), behind admission
control. Ray-free and model-free: :class:`runtime.serving.core.ModelService` gives it the function that samples a
batch."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from numpy.typing import NDArray

from runtime.common.clitools import one_line
from runtime.settings import SamplingSettings


@dataclass(frozen=True)
class ImageJob:
    """One image of one request: what the batcher merges. ``key`` images can share a network batch;
    ``request`` says whose it is (fairness is per request)."""

    seed: int
    index: int
    settings: SamplingSettings
    request: int = 0

    @property
    def key(self) -> SamplingSettings:
        return self.settings

    @property
    def cost(self) -> int:
        """Image-steps: the network calls' share of this image, the unit of fairness and admission."""
        return self.settings.steps


@dataclass
class ImageResult:
    """A sampled image, or the error of the batch it was in; ``batch`` is the network batch size it ran in,
    ``started`` when that batch began (``time.perf_counter``) and ``seconds`` how long it ran."""

    image: NDArray[np.uint8] | None
    batch: int
    seconds: float
    error: str | None = None
    started: float = 0.0


@dataclass
class Stats:
    """Batches this replica formed (sizes), for ``GET /v1/model`` and the load benchmark."""

    batch_sizes: dict[int, int] = field(default_factory=dict)
    images: int = 0
    requests: int = 0
    preemptions: int = 0  # batches run inside a running one at a step boundary (a small request overtook)
    refused: int = 0  # requests answered 503 by admission control


class Busy(RuntimeError):
    """Admission control refused a request: ``retry_after`` seconds is when the queue should have room."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(eq=False)
class _Queued:
    job: ImageJob
    future: asyncio.Future
    arrived: float
    lane: Any = None  # step-level batching: the image's state while it is parked (runtime.stepping.Lane)


@dataclass
class _Running:
    jobs: list[ImageJob]
    steps_left: int
    started: float
    nested_s: float = 0.0  # wall time spent in batches run inside this one


RunBatch = Callable[[list[ImageJob], Callable[[int], None]], list[ImageResult]]


class Batcher:
    """Merge the image jobs of concurrent requests into network batches, fairly, with bounded admission.

    ``submit(jobs)`` queues one request's images and waits for their results. One worker runs batches (the network
    uses every core): when free, it takes the queued job of the request served least so far (in image-steps;
    arrival breaks ties) and every queued job with the same sampling settings, least-served first, up to
    ``max_batch``. If fewer than ``max_batch`` are queued it first waits for more, until ``wait_s`` after the
    oldest job arrived or after the previous batch finished, whichever is later. So jobs arriving while a batch runs
    join the next one, and closed-loop clients get ``wait_s`` to send their next request.
    (Ray Serve's ``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first item even while the
    previous batch still runs: under 16 closed-loop clients it formed batches of 1 and 2.)

    Fairness at step boundaries: a batch with more than ``quantum_s`` of work left pauses after a step when a
    request served less than every request in it is queued and would take under a quarter of what is left; that
    request's batch runs inside it (at most ``max_depth`` deep) and the paused batch resumes. A paused batch keeps
    at least half of the worker: it is not paused again until it has run as long as its nested batches took. So a
    3-step request behind a 64 x 1000-step one waits about one network step, and the large one at most doubles.

    Admission: ``admit(cost)`` (a request's image-steps) refuses with :class:`Busy` when, under fair sharing, the
    request would finish later than ``max_queue_s`` from now: every request ahead gets at most ``cost`` more
    image-steps before this one is done, at the measured image-steps per second. An idle replica admits anything.
    """

    def __init__(self, run: RunBatch, max_batch: int, wait_s: float, *, max_queue_s: float = float("inf"),
                 quantum_s: float = 2.0, max_depth: int = 2, throughput: float | None = None) -> None:
        self.run, self.max_batch, self.wait_s = run, max_batch, wait_s
        self.max_queue_s, self.quantum_s, self.max_depth = max_queue_s, quantum_s, max_depth
        self.throughput = throughput  # image-steps per second, measured at every step (EWMA)
        self.stats: Stats | None = None
        self._lock = threading.Lock()  # the queue and the accounts: the loop submits, the worker thread takes
        self._pending: list[_Queued] = []
        self._served: dict[int, int] = {}  # request -> image-steps sampled so far
        self._left: dict[int, int] = {}  # request -> image-steps still to sample
        self._jobs: dict[int, int] = {}  # request -> its jobs not settled yet (queued or running)
        self._running: list[_Running] = []
        self._last_step: float | None = None
        self._arrived: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._free_since = float("-inf")
        self._next_request = 0

    # -- the event loop's side --------------------------------------------------------------------------------------
    def new_request(self) -> int:
        self._next_request += 1
        return self._next_request

    def admit(self, cost: int) -> None:
        """Raise :class:`Busy` when a request of ``cost`` image-steps would wait longer than ``max_queue_s``."""
        with self._lock:
            if not self._left or not math.isfinite(self.max_queue_s) or not self.throughput:
                return
            ahead = sum(min(left, cost) for left in self._left.values())
        seconds = (ahead + cost) / self.throughput
        if seconds > self.max_queue_s:
            wait = max(1, math.ceil((ahead + cost) / self.throughput - self.max_queue_s))
            if self.stats is not None:
                self.stats.refused += 1
            raise Busy(f"the service is busy: this request would finish in about {seconds:.0f} s, over its "
                       f"queue limit of {self.max_queue_s:g} s; retry later", min(wait, 3600))

    async def submit(self, job: ImageJob) -> ImageResult:
        """One job: its own request unless ``job.request`` names one."""
        if job.request == 0:
            job = dataclasses.replace(job, request=self.new_request())
        return (await self.submit_all([job]))[0]

    async def submit_all(self, jobs: Sequence[ImageJob]) -> list[ImageResult]:
        """A request's jobs (one ``request`` id); their results in order. Cancelling drops the queued ones."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # a new event loop (a restarted front in one process): a worker of its own
            self._loop, self._arrived, self._worker = loop, None, None
        if self._arrived is None:
            self._arrived = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        queued = [_Queued(job, loop.create_future(), time.monotonic()) for job in jobs]
        with self._lock:
            for q in queued:
                r = q.job.request
                self._left[r] = self._left.get(r, 0) + q.job.cost
                self._jobs[r] = self._jobs.get(r, 0) + 1
                self._served.setdefault(r, 0)
            self._pending.extend(queued)
        self._arrived.set()
        try:
            return list(await asyncio.gather(*(q.future for q in queued)))
        finally:
            for q in queued:
                q.future.cancel()  # no-op when done: a cancelled request's queued jobs are dropped now
            with self._lock:
                self._drop_cancelled()

    def _settled(self, job: ImageJob, unsampled: int) -> None:
        """Account a job that left the queue or a batch for good (lock held); a request with no job left is
        forgotten, so an idle replica owes nothing."""
        r = job.request
        self._left[r] = max(0, self._left.get(r, 0) - unsampled)
        self._jobs[r] = self._jobs.get(r, 1) - 1
        if self._jobs[r] <= 0:
            for book in (self._left, self._served, self._jobs):
                book.pop(r, None)

    def _drop_cancelled(self) -> None:
        kept = []
        for q in self._pending:
            if q.future.done():
                self._settled(q.job, q.job.cost)
            else:
                kept.append(q)
        self._pending = kept

    async def _work(self) -> None:
        assert self._arrived is not None
        while True:
            while not self._pending:
                self._arrived.clear()
                self._last_step = None  # idle time is not sampling time
                await self._arrived.wait()
            with self._lock:
                first = self._first()
            if first is None:
                continue
            deadline = max(first.arrived, self._free_since) + self.wait_s
            while self._ready(first.job.key) < self.max_batch and (left := deadline - time.monotonic()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except asyncio.TimeoutError:
                    break
            await self._run()
            self._free_since = time.monotonic()

    async def _run(self) -> None:
        """Run what is queued now: one batch (the step-level batcher: until nothing is left)."""
        with self._lock:
            batch = self._take()
        if batch:
            await asyncio.to_thread(self._run_batch, batch, 0)

    def _ready(self, key: SamplingSettings) -> int:
        with self._lock:
            return sum(1 for q in self._pending if q.job.key == key and not q.future.done())

    # -- shared (call with the lock held) ---------------------------------------------------------------------------
    def _first(self) -> _Queued | None:
        """The live queued job to run next (cancelled jobs dropped): see :meth:`_order`."""
        self._drop_cancelled()
        return min(self._pending, key=self._order) if self._pending else None

    def _order(self, q: _Queued) -> tuple[bool, int, float]:
        """Least-served request first, then the oldest; but a job queued longer than ``max_queue_s`` goes before
        any younger one (so a large request under steady small traffic still finishes)."""
        aged = math.isfinite(self.max_queue_s) and time.monotonic() - q.arrived > self.max_queue_s
        return (not aged, self._served.get(q.job.request, 0), q.arrived)

    def _take(self, first: _Queued | None = None) -> list[_Queued]:
        """``first``'s key (default :meth:`_first`): its live jobs, in :meth:`_order`, up to max_batch."""
        first = first or self._first()
        if first is None:
            return []
        same = sorted((q for q in self._pending if q.job.key == first.job.key), key=self._order)[:self.max_batch]
        chosen = {id(q) for q in same}
        self._pending = [q for q in self._pending if id(q) not in chosen]
        return same

    # -- the worker thread's side -----------------------------------------------------------------------------------
    def _run_batch(self, batch: list[_Queued], depth: int) -> None:
        jobs = [q.job for q in batch]
        running = _Running(jobs, jobs[0].cost, time.perf_counter())
        with self._lock:
            self._running.append(running)
            self._last_step = running.started  # the rate counts sampling, not the gaps between batches
        if depth and self.stats is not None:
            self.stats.preemptions += 1
        try:
            results = self.run(jobs, lambda index: self._after_step(running, depth))
        except Exception as exc:  # noqa: BLE001 (run answers errors per job; this is the unexpected rest)
            results = [ImageResult(None, len(jobs), 0.0, one_line(exc))] * len(jobs)
        finally:
            with self._lock:
                self._running.remove(running)
                for job in jobs:  # what a failed batch did not sample is not owed any more
                    self._settled(job, running.steps_left)
        assert self._loop is not None
        for q, result in zip(batch, results):
            self._loop.call_soon_threadsafe(_settle, q.future, result)

    def _after_step(self, running: _Running, depth: int) -> None:
        """Account one step of ``running``; maybe run a least-served queued request's batch inside it."""
        now = time.perf_counter()
        with self._lock:
            running.steps_left -= 1
            self._account_step(running.jobs, now)
            nested = self._overtaker(running, depth, now)
        if nested:
            t0 = time.perf_counter()
            self._run_batch(nested, depth + 1)
            running.nested_s += time.perf_counter() - t0
            self._last_step = time.perf_counter()

    def _account_step(self, jobs: Sequence[ImageJob], now: float) -> None:
        """One network step of ``jobs`` done at ``now`` (lock held): each job's request served one image-step more
        and owing one less; the throughput (image-steps per second, EWMA) from the time since the previous step."""
        for job in jobs:
            self._served[job.request] = self._served.get(job.request, 0) + 1
            self._left[job.request] = max(0, self._left.get(job.request, 0) - 1)
        if self._last_step is not None and now > self._last_step:
            rate = len(jobs) / (now - self._last_step)
            self.throughput = rate if self.throughput is None else 0.9 * self.throughput + 0.1 * rate
        self._last_step = now

    def _overtaker(self, running: _Running, depth: int, now: float) -> list[_Queued] | None:
        if depth >= self.max_depth or not self.throughput or running.steps_left <= 0:
            return None
        left_s = len(running.jobs) * running.steps_left / self.throughput
        own_s = now - running.started - running.nested_s
        if left_s <= self.quantum_s or own_s < running.nested_s:
            return None
        self._drop_cancelled()
        floor = min(self._served.get(j.request, 0) for j in running.jobs)
        for q in sorted(self._pending, key=self._order):  # the first queued request that may overtake
            r = q.job.request
            if self._served.get(r, 0) < floor and self._left.get(r, 0) / self.throughput < left_s / 4:
                return self._take(q)
        return None


def _settle(future: asyncio.Future, result: ImageResult) -> None:
    if not future.done():
        future.set_result(result)
