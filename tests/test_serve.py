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
from runtime.serving.core import ServeOptions
from runtime.common.shipped import SHIPPED_MODEL

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
