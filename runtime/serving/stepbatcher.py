"""Step-level (continuous) batching for a ``ddim-serve`` replica (``--batching step``): images join the running
network batch at the next step and leave when their own plan is done.

The request-level :class:`runtime.serving.batcher.Batcher` runs one batch of images with the same settings from
first step to last; a request arriving meanwhile waits for the whole batch. Here the batch is a
:class:`runtime.stepping.StepBatch` of images each at its own step of its own plan (steps, eta, solver may differ):
at every step boundary the worker retires the finished images (their requests are answered as soon as their last
image is), admits queued images into free slots (least-served request first, as the request-level batcher orders
them) and runs one network call. Fairness when the batch is full: a queued request served less than a running one
and needing under a quarter of that one's remaining image-steps parks one of its images (its state kept) and takes
the slot; the parked image resumes where it was. Admission control (``admit``), accounting, cancellation and the
request API are the request-level batcher's.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Callable

import numpy as np
from numpy.typing import NDArray

from runtime.serving.batcher import Batcher, ImageResult, _Queued, _settle
from runtime.stepping import Finished, StepBatch


class StepBatcher(Batcher):
    """:class:`Batcher`'s queue, fairness order and admission, run one network step at a time over a
    :class:`StepBatch` (``decode`` turns a finished model-space sample into the uint8 image)."""

    def __init__(self, batch: StepBatch, decode: Callable[[NDArray[np.float32]], NDArray[np.uint8]], wait_s: float,
                 *, max_queue_s: float = float("inf"), throughput: float | None = None) -> None:
        super().__init__(lambda jobs, on_step: [], batch.capacity, wait_s, max_queue_s=max_queue_s,
                         throughput=throughput)
        self.batch, self.decode = batch, decode
        self._in: dict[int, _Queued] = {}  # id(lane) -> its queue entry, while the lane is in the batch
        self._first_step: dict[int, float] = {}  # id(queue entry) -> when its image's first step began

    def _ready(self, key: Any) -> int:  # any settings share a step batch
        with self._lock:
            return sum(1 for q in self._pending if not q.future.done())

    async def _run(self) -> None:
        await asyncio.to_thread(self._run_steps)

    # -- the worker thread --------------------------------------------------------------------------------------------
    def _run_steps(self) -> None:
        """Step until no image is queued or in flight."""
        self._last_step = time.perf_counter()
        while True:
            with self._lock:
                self._drop_cancelled()
                self._drop_gone()
                self._schedule()
                n = len(self.batch)
            if not n:
                return
            started = time.perf_counter()
            for q in self._in.values():
                self._first_step.setdefault(id(q), started)
            finished = self.batch.step()
            now = time.perf_counter()
            with self._lock:
                self._account_step([q.job for q in self._in.values()], now)  # every image in the call advanced
                if self.stats is not None:
                    self.stats.batch_sizes[n] = self.stats.batch_sizes.get(n, 0) + 1
                settled = [self._retire(f, now) for f in finished]
            for q, result in settled:
                assert self._loop is not None
                self._loop.call_soon_threadsafe(_settle, q.future, result)

    def _retire(self, f: Finished, now: float) -> tuple[_Queued, ImageResult]:
        """A lane that left the batch: its entry settled (lock held), its result built."""
        q = self._in.pop(id(f.lane))
        self._settled(q.job, f.lane.left)
        first = self._first_step.pop(id(q), now)
        mean = round(f.lane.batches / max(f.lane.k, 1))
        if f.error is not None or f.sample is None:
            return q, ImageResult(None, mean, now - first, f.error or "sampling failed", first)
        if self.stats is not None:
            self.stats.images += 1
        return q, ImageResult(self.decode(f.sample), mean, now - first, None, first)

    def _drop_gone(self) -> None:
        """Images of requests whose client left (their futures cancelled) leave the batch (lock held)."""
        gone = [lane for lane in self.batch.lanes if self._in[id(lane)].future.done()]
        if gone:
            for lane in self.batch.park([lane.key for lane in gone]):
                q = self._in.pop(id(lane))
                self._first_step.pop(id(q), None)
                self._settled(q.job, lane.left)

    def _schedule(self) -> None:
        """Fill free slots from the queue in fairness order; when full, let a much smaller, less-served request park
        one image of the most-served running request (lock held)."""
        queue = sorted(self._pending, key=self._order)
        free = self.batch.free
        taken = queue[:free]
        for q in taken:
            self._enter(q)
        for q in queue[free:]:
            victim = self._victim(q)
            if victim is None:
                break  # the queue is in fairness order: later entries have no better claim
            (lane,) = self.batch.park([victim.key])
            vq = self._in.pop(id(lane))
            vq.lane = lane
            self._pending.append(vq)
            self._enter(q)
            taken.append(q)
            if self.stats is not None:
                self.stats.preemptions += 1
        chosen = {id(q) for q in taken}
        self._pending = [q for q in self._pending if id(q) not in chosen]

    def _victim(self, q: _Queued) -> Any:
        """The lane ``q`` may replace: one of the most-served running request, when ``q``'s request has been served
        less and needs under a quarter of that request's remaining image-steps; else None."""
        if not self.batch.lanes:
            return None
        r = q.job.request
        lane = max(self.batch.lanes, key=lambda ln: (self._served.get(self._in[id(ln)].job.request, 0), ln.left))
        owner = self._in[id(lane)].job.request
        if owner == r or self._served.get(r, 0) >= self._served.get(owner, 0):
            return None
        return lane if self._left.get(r, 0) < self._left.get(owner, 0) / 4 else None

    def _enter(self, q: _Queued) -> None:
        """Put a queued image (new, or parked with its state) into the batch (lock held)."""
        if q.lane is not None:
            lane, q.lane = q.lane, None
            self.batch.resume(lane)
        else:
            job = q.job
            lane = self.batch.add(id(q), job.seed, job.index, job.settings)
        self._in[id(lane)] = q
