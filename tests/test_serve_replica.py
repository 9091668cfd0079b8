"""A ``ddim-serve`` replica without Ray: request rules, the request-level batcher (merging, overtaking, fairness,
admission, cancellation) and step-level batching (staggered mixed requests equal ddim-run; parking). Fast: they pin
the rules tests/test_serve.py sees through Ray Serve and the front."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from runtime.serving.core import ImageJob, ModelService, RequestError, SampleRequest, ServeOptions, encode
from runtime.settings import SamplingSettings
from test_serve import MODEL, reference


def test_core_limits_groups_and_error_isolation():
    svc = ModelService(ServeOptions(str(MODEL), "onnxruntime", "cpu", "fp32", threads=1, max_images_per_request=4,
                                    max_steps=10))
    with pytest.raises(RequestError, match="num_images: 5 is over") as exc:
        svc.check(SampleRequest(num_images=5))
    assert exc.value.status == 413
    with pytest.raises(RequestError, match="steps: 11 is over"):
        svc.check(SampleRequest(steps=11))
    jobs = svc.check(SampleRequest(num_images=2, steps=3, seed=4)) + [ImageJob(9, 0, SamplingSettings(2))]
    results = svc.run_batch(jobs)
    assert [r.batch for r in results] == [2, 2, 1] and all(r.error is None for r in results)
    np.testing.assert_array_equal(np.stack([r.image for r in results[:2]]), reference(2, 4, 3))
    real = svc.sampler.backend.denoise

    def flaky(x, cond):  # one group fails: its own jobs get the one-line error, the other group is sampled
        if x.shape[0] == 1:
            raise RuntimeError("device lost\nsecond line")
        return real(x, cond)

    svc.sampler.backend.denoise = flaky
    results = svc.run_batch(jobs)
    assert [r.error for r in results] == [None, None, "device lost"]
    with pytest.raises(ValueError, match="ddim-serve runs the lean runtime"):
        ServeOptions(str(MODEL), backend="torch")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--max-batch must be >= 1"):
        ServeOptions(str(MODEL), max_batch=0)
    with pytest.raises(ValueError, match="--batching must be request or step, got 'token'"):
        ServeOptions(str(MODEL), batching="token")  # type: ignore[arg-type]
    assert ServeOptions(str(MODEL)).batching == "step"  # ddim-serve's default
    images = reference(2, 4, 3)
    npz = np.load(io.BytesIO(encode(images, jobs[:2], "npz")))
    np.testing.assert_array_equal(npz["images"], images)


def test_batcher_merges_queued_jobs_when_free_and_keeps_keys_apart():
    """Jobs arriving while a batch runs all join the next batch (up to max_batch); keys never mix."""
    import asyncio
    import time

    from runtime.serving.core import Batcher, ImageResult

    batches: list[list[tuple[int, int]]] = []

    def run(jobs, on_step=None):
        batches.append([(j.seed, j.settings.steps) for j in jobs])
        time.sleep(0.05)  # the network is busy: everything that arrives meanwhile queues
        return [ImageResult(None, len(jobs), 0.05) for _ in jobs]

    async def scenario():
        batcher = Batcher(run, max_batch=4, wait_s=0.01)
        first = asyncio.ensure_future(batcher.submit(ImageJob(0, 0, SamplingSettings(5))))
        await asyncio.sleep(0.02)  # the first batch (one job) is running now
        rest = [asyncio.ensure_future(batcher.submit(ImageJob(s, 0, SamplingSettings(5 if s % 2 else 7))))
                for s in range(1, 10)]
        results = await asyncio.gather(first, *rest)
        return [r.batch for r in results]

    sizes = asyncio.run(scenario())
    assert batches[0] == [(0, 5)]
    # Queued meanwhile: odd seeds (steps 5) and even seeds (steps 7); the oldest's key goes first, 4 at most.
    assert batches[1:] == [[(1, 5), (3, 5), (5, 5), (7, 5)], [(2, 7), (4, 7), (6, 7), (8, 7)], [(9, 5)]]
    assert sizes == [1, 4, 4, 4, 4, 4, 4, 4, 4, 1]

    async def waits_to_fill():
        batches.clear()
        batcher = Batcher(run, max_batch=3, wait_s=0.3)
        a = asyncio.ensure_future(batcher.submit(ImageJob(0, 0, SamplingSettings(5))))
        await asyncio.sleep(0.05)
        b = [asyncio.ensure_future(batcher.submit(ImageJob(s, 0, SamplingSettings(5)))) for s in (1, 2)]
        await asyncio.gather(a, *b)

    asyncio.run(waits_to_fill())
    assert batches == [[(0, 5), (1, 5), (2, 5)]]  # full before the wait ran out: it ran at once as one batch


def stepping_run(log: list, step_s: float = 0.01):
    """A fake network: each step of a batch takes step_s; on_step after each, as the sampler calls it."""
    import time

    from runtime.serving.core import ImageResult

    def run(jobs, on_step=None):
        log.append(("start", jobs[0].request, len(jobs), jobs[0].settings.steps))
        for i in range(jobs[0].settings.steps):
            time.sleep(step_s)
            if on_step is not None:
                on_step(i)
        log.append(("end", jobs[0].request))
        return [ImageResult(None, len(jobs), 0.0) for _ in jobs]

    return run


def test_a_small_request_overtakes_a_large_one_at_a_step_boundary():
    """Behind a 8 x 400-step request (about 4 s of work here), a 3-step request runs inside it after about one
    step, and the large one still finishes whole."""
    import asyncio
    import time

    from runtime.serving.core import Batcher

    log: list = []

    async def scenario():
        batcher = Batcher(stepping_run(log), max_batch=8, wait_s=0.0, quantum_s=0.5, throughput=800.0)
        big_id, small_id = batcher.new_request(), batcher.new_request()
        big = asyncio.ensure_future(batcher.submit_all([ImageJob(0, i, SamplingSettings(400), big_id)
                                                        for i in range(8)]))
        await asyncio.sleep(0.3)
        t0 = time.perf_counter()
        small = await batcher.submit_all([ImageJob(1, 0, SamplingSettings(3), small_id)])
        waited = time.perf_counter() - t0
        await big
        return waited, small, batcher.stats

    waited, small, _ = asyncio.run(scenario())
    assert [e[:2] for e in log] == [("start", 1), ("start", 2), ("end", 2), ("end", 1)], log
    assert waited < 1.0, waited  # the large one alone has ~3.7 s left
    assert small[0].error is None


def test_least_served_request_goes_first_and_admission_refuses_with_retry_after():
    import asyncio

    from runtime.serving.core import Batcher, Busy

    log: list = []

    async def scenario():
        batcher = Batcher(stepping_run(log, 0.002), max_batch=2, wait_s=0.0, quantum_s=10.0, throughput=1000.0,
                          max_queue_s=0.5)
        a, b = batcher.new_request(), batcher.new_request()
        # a: 6 images of the same settings as b's 1 image; after a's first batch of 2, b (served 0) goes next.
        fa = asyncio.ensure_future(batcher.submit_all([ImageJob(0, i, SamplingSettings(20), a) for i in range(6)]))
        await asyncio.sleep(0)
        fb = asyncio.ensure_future(batcher.submit_all([ImageJob(1, 0, SamplingSettings(20), b)]))
        await asyncio.sleep(0.005)
        # Queued now: a's 4 left + b's 1, 20 steps each: about 100 image-steps, 0.1 s at 1000/s. A request of
        # 2 x 300 steps would take it over 0.5 s: Busy, with a Retry-After of whole seconds.
        with pytest.raises(Busy, match="queue limit of 0.5 s") as exc:
            batcher.admit(600)
        assert exc.value.retry_after >= 1
        batcher.admit(20)  # a small one still fits
        await asyncio.gather(fa, fb)
        batcher.admit(10**9)  # idle: anything is admitted

    asyncio.run(scenario())
    starts = [e[1:3] for e in log if e[0] == "start"]
    assert starts[0] == (1, 2) and starts[1][0] == 2, starts  # a's first batch, then b's image (least served)


def test_a_cancelled_request_leaves_no_debt_and_an_idle_replica_admits_anything():
    import asyncio

    from runtime.serving.core import Batcher

    log: list = []

    async def scenario():
        batcher = Batcher(stepping_run(log, 0.002), max_batch=2, wait_s=0.0, throughput=1000.0, max_queue_s=0.5)
        r = batcher.new_request()
        task = asyncio.ensure_future(batcher.submit_all([ImageJob(0, i, SamplingSettings(50), r) for i in range(6)]))
        await asyncio.sleep(0.03)  # its first batch runs
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.3)  # the running batch ends; nothing else runs
        assert batcher._left == {} and batcher._jobs == {} and batcher._served == {}
        batcher.admit(10**6)  # idle: no phantom load

    asyncio.run(scenario())
    assert [e[0] for e in log] == ["start", "end"]  # the queued 4 images never ran


def test_step_level_batching_serves_staggered_mixed_requests_as_ddim_run():
    """--batching step: requests with different steps, eta and solvers arrive while others run, join the running
    batch at the next step, and every image equals ddim-run's; a finished request is answered before the others."""
    import asyncio

    from runtime.serving.core import Replica

    replica = Replica(ServeOptions(str(MODEL), "onnxruntime", "cpu", "fp32", threads=1, max_batch=6,
                                   batch_wait_ms=0, batching="step"))
    requests = [(0.0, {"num_images": 3, "steps": 12, "seed": 1}),
                (0.05, {"num_images": 2, "steps": 4, "seed": 2, "eta": 0.5}),
                (0.1, {"num_images": 2, "steps": 6, "seed": 3, "solver": "dpmpp-2m"}),
                (0.15, {"num_images": 1, "steps": 2, "seed": 4}),
                (0.2, {"num_images": 3, "steps": 3, "seed": 5, "eta": 1.0}),
                (0.25, {"num_images": 2, "steps": 5, "seed": 6, "spacing": "quadratic", "clip_x0": True})]

    async def scenario():
        async def one(delay, fields):
            await asyncio.sleep(delay)
            answer = await replica.samples({**fields, "format": "npz"})
            return answer, asyncio.get_running_loop().time()

        return await asyncio.gather(*(one(d, f) for d, f in requests))

    answers = asyncio.run(scenario())
    for (_, fields), (answer, _) in zip(requests, answers):
        assert answer.status == 200, answer.body
        extra = {k: fields[k] for k in ("eta", "solver", "spacing", "clip_x0") if k in fields}
        ref = reference(fields["num_images"], fields["seed"], fields["steps"], **extra)
        np.testing.assert_array_equal(np.load(io.BytesIO(answer.body))["images"], ref)
    sizes = replica.core.stats.batch_sizes
    assert max(sizes) == 6 and sum(sizes.values()) < sum(f["steps"] for _, f in requests)  # images shared calls
    assert answers[3][1] < answers[0][1]  # the 2-step request left the batch before the 12-step one finished
    assert replica.core.info()["batching"] == "step"
    # A spacing this model's (continuous) schedule cannot take: 422 naming the field, before any sampling.
    bad = asyncio.run(replica.samples({"steps": 5, "spacing": "trailing"}))
    assert bad.status == 422 and json.loads(bad.body)["error"].startswith("spacing: spacing 'trailing' needs a discrete")


def test_step_level_fairness_parks_a_large_request_for_a_small_one():
    """A full step batch of one long request: a much smaller request parks one of its images for its own turn, and
    the parked image resumes where it was (same images as ddim-run)."""
    import asyncio
    import time

    from runtime.serving.core import Replica

    replica = Replica(ServeOptions(str(MODEL), "onnxruntime", "cpu", "fp32", threads=1, max_batch=2,
                                   batch_wait_ms=0, batching="step"))

    async def scenario():
        big = asyncio.ensure_future(replica.samples({"num_images": 2, "steps": 120, "seed": 7, "format": "npz"}))
        await asyncio.sleep(0.3)
        t0 = time.perf_counter()
        small = await replica.samples({"num_images": 1, "steps": 3, "seed": 8, "format": "npz"})
        waited = time.perf_counter() - t0
        return await big, small, waited, big.done()

    big, small, waited, _ = asyncio.run(scenario())
    assert replica.core.stats.preemptions >= 1
    assert big.status == small.status == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(small.body))["images"], reference(1, 8, 3))
    np.testing.assert_array_equal(np.load(io.BytesIO(big.body))["images"], reference(2, 7, 120))
    assert waited < float(big.headers["X-Seconds"]) / 3
