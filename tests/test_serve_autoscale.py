"""``ddim-serve --autoscale MIN:MAX``: the option's forms and refusals, the config Ray Serve gets, the resource check,
the replica count on /metrics and /v1/model, and the benchmark's analysis: all without a Ray cluster. One test on
the real Ray Serve (marked slow: a Ray start, a scale-up and a scale-down take a minute or more)."""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.request
from typing import Any

import pytest

from runtime.common.shipped import SHIPPED_MODEL
from runtime.serving.scaling import Autoscale, parse_bounds, resolve


@pytest.mark.parametrize("value, message", [
    ("3:1", "3:1: MAX must be at least MIN"),
    ("0:0", "0:0: MIN must be at least 1 (a service without a running replica counts as down"),
    ("0:2", "0:2: MIN must be at least 1"),
    ("a:b", "a:b: expected MIN:MAX, two whole numbers (e.g. 1:4)"),
    ("2", "2: expected MIN:MAX"),
    ("1:2:3", "1:2:3: expected MIN:MAX"),
    ("-1:2", "-1:2: expected MIN:MAX"),
    ("1:5000", "1:5000: MAX must be at most 1000"),
])
def test_bad_autoscale_forms_are_usage_errors_before_anything_loads(tmp_path, value, message):
    from click.testing import CliRunner

    from runtime.serving.cli import main

    result = CliRunner().invoke(main, [str(tmp_path / "no-model"), "--autoscale", value])
    assert result.exit_code == 2, result.output
    assert f"Error: Invalid value for '--autoscale': {message}" in result.output, result.output


@pytest.mark.parametrize("args, message", [
    (["--replicas", "2", "--autoscale", "1:2"], "--replicas 2 and --autoscale 1:2 exclude each other"),
    (["--upscale-delay", "5"], "--upscale-delay needs --autoscale MIN:MAX"),
    (["--target-ongoing-requests", "2"], "--target-ongoing-requests needs --autoscale MIN:MAX"),
    (["--autoscale", "1:2", "--downscale-delay", "nan"], "nan is not a finite number"),
    (["--autoscale", "1:2", "--target-ongoing-requests", "0"], "0.0 is not in the range x>0"),
])
def test_autoscale_conflicts_are_one_line_usage_errors(tmp_path, args, message):
    from click.testing import CliRunner

    from runtime.serving.cli import main

    result = CliRunner().invoke(main, [str(tmp_path / "no-model"), *args])
    assert result.exit_code == 2 and message in result.output, result.output
    assert "does not exist" not in result.output  # refused before the model is looked at


def test_resolve_gives_a_count_or_a_range():
    assert resolve(None, None, None, None, None) == (1, None)
    assert resolve(3, None, None, None, None) == (3, None)
    count, scaling = resolve(None, (2, 5), 8.0, None, 120.0)
    assert count == 2 and scaling == Autoscale(2, 5, 8.0, 10.0, 120.0)
    assert parse_bounds(" 1 : 4 ") == (1, 4)
    with pytest.raises(ValueError, match="--target-ongoing-requests must be a finite number > 0"):
        Autoscale(1, 2, target_ongoing_requests=float("inf"))
    with pytest.raises(ValueError, match="--upscale-delay must be a finite number of seconds >= 0"):
        Autoscale(1, 2, upscale_delay_s=-1)


def test_the_config_serve_gets_is_valid_and_drains_longer_than_the_queue():
    """The dict is what Ray 2.60's AutoscalingConfig takes (its own validation, no cluster), starting MIN replicas;
    a removed replica gets --max-queue-seconds plus a margin to finish what it admitted."""
    from ray.serve.config import AutoscalingConfig

    scaling = Autoscale(1, 3, target_ongoing_requests=6, upscale_delay_s=5, downscale_delay_s=90)
    config = AutoscalingConfig(**scaling.serve_config())
    assert (config.min_replicas, config.initial_replicas, config.max_replicas) == (1, 1, 3)
    assert (config.target_ongoing_requests, config.upscale_delay_s, config.downscale_delay_s) == (6, 5, 90)
    assert config.look_back_period_s > config.metrics_interval_s  # else Ray warns (and will refuse)
    options = scaling.deployment_options(max_queue_s=60.0)
    assert options["graceful_shutdown_timeout_s"] == 90.0

    from runtime.serving.app import build
    from runtime.serving.core import ServeOptions

    app = build(ServeOptions(str(SHIPPED_MODEL / "model.onnx")), replica_cpus=0.5, autoscale=scaling)
    deployment = app._bound_deployment  # what serve.run deploys
    assert deployment._deployment_config.autoscaling_config.max_replicas == 3
    assert deployment._deployment_config.graceful_shutdown_timeout_s == 90.0
    fixed = build(ServeOptions(str(SHIPPED_MODEL / "model.onnx")), replicas=2)._bound_deployment
    assert fixed.num_replicas == 2 and fixed._deployment_config.autoscaling_config is None


class FakeRay:
    """``ray.nodes()`` of a cluster of these nodes' resources."""

    def __init__(self, *nodes: dict[str, float]) -> None:
        self._nodes = [{"Alive": True, "Resources": n} for n in nodes]

    def nodes(self) -> list[dict[str, Any]]:
        return self._nodes


def test_the_resource_check_counts_max_locally_and_min_on_a_joined_cluster(monkeypatch):
    from runtime.serving import cluster

    monkeypatch.setitem(sys.modules, "ray", FakeRay({"CPU": 2.0}))
    assert cluster.check_resources(2, 1.0, 0.0, joined=False) == []
    assert cluster.check_resources(1, 1.0, 0.0, joined=False, autoscale=Autoscale(1, 2)) == []
    with pytest.raises(ValueError, match=r"^the replicas do not fit: --autoscale 1:3: MAX 3 x --replica-cpus 1 = "
                                         r"3 CPUs, the cluster has 2$"):
        cluster.check_resources(1, 1.0, 0.0, joined=False, autoscale=Autoscale(1, 3))
    # Joined: MIN must fit now; MAX not fitting is a warning (Ray's autoscaler may add nodes).
    [warning] = cluster.check_resources(1, 1.0, 0.0, joined=True, autoscale=Autoscale(1, 3))
    assert warning.startswith("--autoscale 1:3: MAX replicas do not fit the cluster now (--autoscale 1:3: MAX 3 x "
                              "--replica-cpus 1 = 3 CPUs, the cluster has 2)")
    with pytest.raises(ValueError, match="--autoscale 3:4: MIN 3 x --replica-cpus 1 = 3 CPUs, the cluster has 2 "
                                         r"\(an autoscaling cluster may add nodes"):
        cluster.check_resources(3, 1.0, 0.0, joined=True, autoscale=Autoscale(3, 4))
    with pytest.raises(ValueError, match=r"^the replicas do not fit: --replicas 3 x --replica-cpus 1 = 3 CPUs"):
        cluster.check_resources(3, 1.0, 0.0, joined=False)
    assert cluster.shortfall([{"CPU": 1.0}, {"CPU": 1.0}], 2, 1.5, 0.0, "--replicas 2") == [
        "--replica-cpus 1.5: no node has 1.5 CPUs (the largest has 1)"]


def test_the_replica_count_is_on_metrics_and_v1_model():
    from prometheus_client.parser import text_string_to_metric_families

    from runtime.serving.ingress import ThreadedFront
    from runtime.serving.metrics import FrontMetrics

    class Forwarder:
        states = {"running": 2, "starting": 1, "stopping": 0}

        async def samples(self, fields):  # pragma: no cover (not called)
            raise AssertionError

        async def info(self) -> dict[str, Any]:
            return {"backend": "stand-in"}

        def health(self) -> str | None:
            return None

        def replicas(self) -> dict[str, int]:
            return dict(self.states)

    forwarder = Forwarder()
    with ThreadedFront(forwarder) as url:  # type: ignore[arg-type]
        with urllib.request.urlopen(f"{url}/v1/model", timeout=30) as resp:
            assert json.loads(resp.read()) == {"backend": "stand-in", "replicas": forwarder.states}
        with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
            text = resp.read().decode()
    samples = {s.labels["state"]: s.value for f in text_string_to_metric_families(text)
               if f.name == "ddim_serve_replicas" for s in f.samples}
    assert samples == {"running": 2.0, "starting": 1.0, "stopping": 0.0}
    body, _ = FrontMetrics(lambda: {}).exposition(None)  # no count known: no sample, not a 0
    assert b"ddim_serve_replicas" not in body


def test_the_benchmark_finds_the_changes_and_the_failures_during_them():
    from benchmarks import serve_autoscale as sa

    assert sa.parse_load("2:60, 16:90,2:120") == [(2, 60.0), (16, 90.0), (2, 120.0)]
    for bad in ("2:0", "0:10", "two:10", "2"):
        with pytest.raises(ValueError, match="expected CLIENTS:SECONDS"):
            sa.parse_load(bad)
    # 1 replica, a second starting at 12 s and running at 14 s, stopping at 40 s and gone at 42 s.
    samples = [{"t": float(t), "clients": 2 if t < 10 or t >= 30 else 16,
                "running": 2 if 14 <= t < 42 else 1, "starting": 1 if 12 <= t < 14 else 0,
                "stopping": 1 if 40 <= t < 42 else 0} for t in range(60)]
    events, windows = sa.changes(samples)
    assert events == [{"t": 14.0, "from": 1, "to": 2}, {"t": 42.0, "from": 2, "to": 1}]
    assert windows == [(11.0, 14.0), (39.0, 42.0)]
    requests = [{"start": 1.0, "end": 3.0, "status": 200, "clients": 2},
                {"start": 13.5, "end": 16.0, "status": 200, "clients": 16},
                {"start": 20.0, "end": 22.0, "status": 200, "clients": 16},
                {"start": 41.0, "end": 41.5, "status": 503, "clients": 2, "error": "the replica stopped"}]
    load = [(2, 10.0), (16, 20.0), (2, 30.0)]
    summary = sa.summarize(requests, samples, [0.0, 10.0, 30.0, 60.0], load, 1)
    assert [p["requests"] for p in summary["phases"]] == [1, 2, 1]
    assert [(p["replicas_min"], p["replicas_max"]) for p in summary["phases"]] == [(1, 1), (1, 2), (1, 2)]
    assert summary["requests_during_changes"] == 2 and summary["failed_during_changes"] == 1
    assert [(g["phase"], g["replicas"], g["from_s"], g["to_s"]) for g in summary["segments"]] == [
        (1, 1, 0.0, 10.0), (2, 1, 10.0, 14.0), (2, 2, 14.0, 30.0), (3, 2, 30.0, 42.0), (3, 1, 42.0, 60.0)]
    assert summary["segments"][2]["images_per_s"] == 2 / 16  # answered at 16 s and 22 s, 1 image each
    assert summary["verdict"].startswith("1 of the 2 requests in flight while replicas were added or removed failed "
                                         "(statuses [503]; first: the replica stopped)")
    requests[-1].update(status=200)
    summary = sa.summarize(requests, samples, [0.0, 10.0, 30.0, 60.0], load, 1)
    assert summary["verdict"].startswith("No request failed while replicas were added or removed: 2 requests")
    row = {"command": "python benchmarks/serve_load.py --autoscale 1:2", "autoscale": "1:2",
           "target_ongoing_requests": 4.0, "upscale_delay_s": 10.0, "downscale_delay_s": 60.0, "max_batch": 16,
           "num_images": 1, "steps": 20, "ready_s": 12.0, "shutdown_rc": 0, "phase_starts": [0.0, 10.0, 30.0, 60.0],
           "requests": requests, "replicas": samples, **summary}
    md = sa.markdown({"cpu": "CPU", "cores": 2, "ray": "2.60.0"}, [row])
    assert "| 2 | 16 | 20 | 2 | 0 |" in md and "| 1-2 |" in md
    assert "Running replicas changed: 1 -> 2 at 14 s, 2 -> 1 at 42 s" in md


@pytest.mark.slow
def test_serve_adds_and_removes_a_replica_and_no_request_fails(tmp_path):
    """The real Ray Serve, --autoscale 1:2 at a target of 1 request in flight: 4 clients bring a second replica,
    idling takes it away again, and every request meanwhile is answered 200 through the front."""
    ray = pytest.importorskip("ray")
    from ray import serve
    from ray.serve.api import RunTarget

    from benchmarks.serve_autoscale import post
    from runtime.serving.app import build
    from runtime.serving.cli import quiet_ray_logs, serve_environment
    from runtime.serving.cluster import RayForwarder, deployment_status
    from runtime.serving.core import ServeOptions
    from runtime.serving.ingress import ThreadedFront

    quiet_ray_logs()
    serve_environment()
    options = ServeOptions(str(SHIPPED_MODEL / "model.onnx"), "onnxruntime", "cpu", "fp32", threads=1, max_batch=4,
                           batch_wait_ms=0, max_steps=50)
    scaling = Autoscale(1, 2, target_ongoing_requests=1, upscale_delay_s=0, downscale_delay_s=1)
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    seen: list[dict[str, int]] = []
    statuses: list[int] = []
    stop = threading.Event()
    try:
        serve.start(proxy_location="Disabled")
        [handle] = serve.run_many([RunTarget(build(options, replica_cpus=0.5, autoscale=scaling), name="scaled",
                                             route_prefix=None)])
        forwarder = RayForwarder(handle)

        def watch() -> None:  # what ddim-serve's watcher does each second
            while not stop.is_set():
                forwarder.states = deployment_status("scaled")[0]
                seen.append(forwarder.states)
                stop.wait(0.5)

        def until(running: int, timeout_s: float) -> bool:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if seen and seen[-1]["running"] == running and not seen[-1]["stopping"]:
                    return True
                time.sleep(0.5)
            return False

        threading.Thread(target=watch, daemon=True).start()
        with ThreadedFront(forwarder) as url:
            load = threading.Event()

            def client() -> None:
                while load.is_set():
                    statuses.append(post(f"{url}/v1/samples", {"num_images": 1, "steps": 40, "format": "npz"})[0])

            load.set()
            clients = [threading.Thread(target=client, daemon=True) for _ in range(4)]
            for c in clients:
                c.start()
            assert until(2, 90), seen[-3:]
            with urllib.request.urlopen(f"{url}/metrics", timeout=30) as resp:
                assert 'ddim_serve_replicas{state="running"} 2.0' in resp.read().decode()
            load.clear()
            for c in clients:
                c.join(120)
            assert until(1, 90), seen[-3:]
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()
    assert statuses and set(statuses) == {200}, statuses
