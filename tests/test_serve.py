"""ddim-serve on the real Ray Serve: one local Ray instance for the module, the shipped model behind HTTP on a free
port of 127.0.0.1, plus a second application whose model turns every step into NaN (route prefix /broken)."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.api import load
from runtime.images import grid_bytes, grid_scale
from runtime.serving.core import ImageJob, ModelService, RequestError, SampleRequest, ServeOptions, encode
from runtime.settings import SamplingSettings
from runtime.common.shipped import SHIPPED_MODEL
from test_distributed import free_port

MODEL = SHIPPED_MODEL / "model.onnx"
BATCH_WAIT_MS = 1500.0  # long: the 8 concurrent requests below must meet in one batch on a loaded CI machine


def nan_model(folder: Path) -> Path:
    """The shipped ONNX with a NaN output bias: every step's prediction is NaN."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(MODEL))
    for init in m.graph.initializer:
        if init.name == "conv_out.bias":
            init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, np.nan, np.float32),
                                                  init.name))
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(m, str(folder / "model.onnx"))
    return folder / "model.onnx"


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """(url, options, broken_url): two Serve deployments on one local Ray instance (Serve's proxy off), each
    behind its own front on a free port of 127.0.0.1, reached by deployment handle as ddim-serve does."""
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.serve.api import RunTarget

    from runtime.serving.app import build
    from runtime.serving.cli import quiet_ray_logs, serve_environment
    from runtime.serving.cluster import RayForwarder
    from runtime.serving.ingress import ThreadedFront

    quiet_ray_logs()
    serve_environment()
    options = ServeOptions(str(MODEL), "onnxruntime", "cpu", "fp32", threads=2, max_batch=8,
                           batch_wait_ms=BATCH_WAIT_MS, max_images_per_request=16, max_steps=50)
    broken = ServeOptions(str(nan_model(tmp_path_factory.mktemp("nan"))), "onnxruntime", "cpu", "fp32", threads=1,
                          batch_wait_ms=0)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        serve.start(proxy_location="Disabled")
        handles = serve.run_many([RunTarget(build(options, replica_cpus=0.5), name="main", route_prefix=None),
                                  RunTarget(build(broken, replica_cpus=0.5), name="broken", route_prefix=None)])
        with ThreadedFront(RayForwarder(handles[0])) as url, ThreadedFront(RayForwarder(handles[1])) as broken_url:
            yield url, options, broken_url
    finally:
        serve.shutdown()
        ray.shutdown()


def post(url: str, body: bytes | dict, headers: dict | None = None) -> tuple[int, dict, bytes]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.status, resp.read()


def reference(num_images: int, seed: int, steps: int, **kw) -> np.ndarray:
    """What ddim-run samples for these settings (the same runtime call ddim-run makes)."""
    return load(MODEL, "onnxruntime", "cpu", "fp32").sample(num_images, steps=steps, seed=seed, **kw).images


def test_served_images_equal_ddim_run_in_every_format(service, tmp_path):
    url, _, _ = service
    status, headers, body = post(f"{url}/v1/samples", {"num_images": 3, "steps": 4, "seed": 7, "format": "npz"})
    assert status == 200, body
    ref = reference(3, 7, 4)
    arrays = np.load(io.BytesIO(body))
    np.testing.assert_array_equal(arrays["images"], ref)
    assert arrays["seeds"].tolist() == [7, 7, 7] and arrays["indices"].tolist() == [0, 1, 2]
    from hashlib import sha256

    assert headers["x-model-sha256"] == sha256(MODEL.read_bytes()).hexdigest()
    assert headers["x-backend"] == "onnxruntime cpu fp32"
    assert float(headers["x-seconds"]) > 0
    # The ddim-run command line itself, same seed: its npz holds the same images.
    from click.testing import CliRunner

    from runtime.cli import main as ddim_run

    result = CliRunner().invoke(ddim_run, [str(MODEL), "--steps", "4", "--seed", "7", "--num-images", "3",
                                           "--backend", "onnxruntime", "--device", "cpu", "--precision", "fp32",
                                           "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz"),
                                           "--no-progress"])
    assert result.exit_code == 0, result.output
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["images"], arrays["images"])

    status, headers, body = post(f"{url}/v1/samples", {"num_images": 2, "steps": 4, "seed": 7, "format": "png"})
    assert status == 200 and headers["content-type"] == "application/zip"
    with zipfile.ZipFile(io.BytesIO(body)) as zf:
        assert zf.namelist() == ["7-00000.png", "7-00001.png"]
        for i, name in enumerate(zf.namelist()):
            np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(zf.read(name)))), ref[i, ..., 0])
    status, headers, body = post(f"{url}/v1/samples", {"num_images": 3, "steps": 4, "seed": 7})
    assert status == 200 and headers["content-type"] == "image/png"
    assert body == grid_bytes(ref, scale=grid_scale(ref.shape[1], 3))
    status, _, body = post(f"{url}/v1/samples", {"num_images": 2, "steps": 4, "seed": 3, "solver": "dpmpp-2m",
                                                 "format": "npz"})
    assert status == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(body))["images"], reference(2, 3, 4, solver="dpmpp-2m"))


def test_concurrent_requests_share_one_batch_and_keep_their_images(service):
    """8 concurrent 1-image requests (seeds 0..7) run as one network batch of 8; each equals ddim-run --seed s."""
    url, options, _ = service
    assert options.max_batch == 8
    out: dict[int, tuple[int, dict, bytes]] = {}
    barrier = threading.Barrier(8)

    def client(seed: int) -> None:
        barrier.wait()
        out[seed] = post(f"{url}/v1/samples", {"num_images": 1, "steps": 3, "seed": seed, "format": "npz"})

    threads = [threading.Thread(target=client, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == list(range(8))
    assert {out[s][1]["x-batch-sizes"] for s in range(8)} == {"8"}, [out[s][1]["x-batch-sizes"] for s in range(8)]
    for seed in range(8):
        status, _, body = out[seed]
        assert status == 200
        np.testing.assert_array_equal(np.load(io.BytesIO(body))["images"], reference(1, seed, 3))
    # A request larger than a batch is split across batches and still whole and in order.
    status, headers, body = post(f"{url}/v1/samples", {"num_images": 10, "steps": 2, "seed": 1, "format": "npz"})
    assert status == 200
    assert sorted(set(int(b) for b in headers["x-batch-sizes"].split(","))) == [2, 8]
    np.testing.assert_array_equal(np.load(io.BytesIO(body))["images"], reference(10, 1, 2))
    info = json.loads(get(f"{url}/v1/model")[1])
    assert info["stats"]["batch_sizes"]["8"] >= 2
    # The front's /metrics has the replica's batches through Ray too (its answers carry them): the same totals.
    from prometheus_client.parser import text_string_to_metric_families

    metrics = {s.name + str(sorted(s.labels.items())): s.value
               for f in text_string_to_metric_families(get(f"{url}/metrics")[1].decode()) for s in f.samples}
    assert metrics["ddim_serve_images_sampled_total[]"] == info["stats"]["images"]
    assert metrics["ddim_serve_batch_size_count[]"] == sum(info["stats"]["batch_sizes"].values())
    up_to = {le: metrics[f"ddim_serve_batch_size_bucket[('le', '{le}')]"] for le in ("4.0", "8.0")}
    assert up_to["8.0"] - up_to["4.0"] == info["stats"]["batch_sizes"]["8"]  # no other size in (4, 8] here


@pytest.mark.parametrize("body, status, message", [
    ({"num_images": 0}, 422, "num_images: Input should be greater than or equal to 1"),
    ({"steps": "many"}, 422, "steps: Input should be a valid integer"),
    ({"eta": -1}, 422, "eta: eta must be a finite number >= 0, got -1.0"),
    ({"solver": "euler"}, 422, "solver: Input should be 'ddim' or 'dpmpp-2m'"),
    ({"format": "gif"}, 422, "format: Input should be 'grid', 'png' or 'npz'"),
    ({"path": "/etc/passwd"}, 422, "path: Extra inputs are not permitted"),
    ({"seed": -5}, 422, "seed: Input should be greater than or equal to 0"),
    ({"num_images": 17}, 413, "num_images: 17 is over this service's limit of 16 images per request"),
    ({"steps": 51}, 413, "steps: 51 is over this service's limit of 50"),
    ({"solver": "dpmpp-2m", "eta": 0.5}, 422, "eta: solver dpmpp-2m is deterministic"),
    (b"{not json", 422, "body: Invalid JSON"),
    (b"[1, 2]", 422, "body: Input should be an object"),
    # Strict types (no coercion) and hostile JSON: all one-line 422s, never a 400 or FastAPI's {"detail": ...}.
    ({"num_images": True}, 422, "num_images: Input should be a valid integer"),
    ({"num_images": "2"}, 422, "num_images: Input should be a valid integer"),
    ({"num_images": "1_0"}, 422, "num_images: Input should be a valid integer"),
    ({"num_images": 2.0}, 422, "num_images: Input should be a valid integer"),
    (b'{"num_images": ' + b"[" * 5000 + b"]" * 5000 + b"}", 422, "body: Invalid JSON: recursion limit exceeded"),
    (b'{"solver": "' + bytes([0xFF, 0xFE]) + b'"}', 422, "body: Invalid JSON"),
    (b'{"seed": ' + b"9" * 5000 + b"}", 422, "body: Invalid JSON: number out of range"),
    (b'{"eta": NaN}', 422, "eta: Input should be a finite number"),
])
def test_bad_requests_get_one_line_errors(service, body, status, message):
    url, _, _ = service
    got, _, text = post(f"{url}/v1/samples", body)
    assert got == status, text
    error = json.loads(text)["error"]
    assert error.startswith(message) and "\n" not in error


def test_oversized_bodies_are_refused_unread(service):
    url, _, _ = service
    big = json.dumps({"num_images": 1, "pad": "x" * 70_000}).encode()
    assert post(f"{url}/v1/samples", big)[0] == 413
    status, _, text = post(f"{url}/v1/samples", big, {"Transfer-Encoding": "chunked"})
    assert status == 413 and json.loads(text)["error"] == "request body over 65536 bytes"


def test_nan_is_a_500_naming_the_step_and_the_service_stays_up(service):
    url, _, broken = service
    status, _, text = post(f"{broken}/v1/samples", {"num_images": 2, "steps": 5})
    assert status == 500
    assert json.loads(text)["error"].startswith("sampling failed: non-finite values at sampling step 1/5")
    assert get(f"{broken}/healthz") == (200, b'{"status":"ok"}')
    assert post(f"{url}/v1/samples", {"num_images": 1, "steps": 2})[0] == 200


def test_model_info_openapi_and_health(service):
    url, options, _ = service
    info = json.loads(get(f"{url}/v1/model")[1])
    assert info["model_file"] == "model.onnx" and info["backend"] == "onnxruntime cpu fp32"
    assert info["config"]["model"]["image_size"] == 32
    assert info["limits"]["max_images_per_request"] == 16 and info["limits"]["max_batch"] == 8
    assert info["process"]["torch_imported"] is False  # replicas run the lean runtime
    schema = json.loads(get(f"{url}/openapi.json")[1])
    assert "/v1/samples" in schema["paths"] and "SampleRequest" in schema["components"]["schemas"]
    props = schema["components"]["schemas"]["SampleRequest"]["properties"]
    assert set(props) == {"num_images", "steps", "seed", "eta", "solver", "spacing", "clip_x0", "format"}
    assert info["batching"] == "step"  # ddim-serve's default
    assert get(f"{url}/healthz") == (200, b'{"status":"ok"}')


# The parts of a replica that need no Ray: fast, and they pin the rules the HTTP tests see through the proxy.

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
