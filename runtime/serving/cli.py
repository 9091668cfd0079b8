"""``ddim-serve``: the model behind an HTTP endpoint, on Ray Serve (replicas, request batching, clusters)."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click

from runtime.choices import Device, RunPrecision, values
from runtime.common.clitools import friendly_errors, one_line
from runtime.options import BackendChoice
from runtime.common.extras import install_hint
from runtime.common.hostinfo import physical_cores

APP_NAME = "ddim"
SHUTDOWN_TIMEOUT_S = 60


def check_port_free(host: str, port: int) -> None:
    """Fail now, in one line, when the port is taken (Serve's proxy would retry it in the background)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no obstacle
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ValueError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc}); "
                             "pick another --port") from None


def wait_ready(url: str, timeout_s: float) -> None:
    """Poll ``url`` until it answers 200 (the replicas have loaded the model and the proxy routes to them)."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=5) as resp:
                if resp.status == 200:
                    return
                last = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(getattr(exc, "reason", exc))
        time.sleep(0.25)
    raise TimeoutError(f"the service did not become ready within {timeout_s:.0f} s ({url}: {last})")


def import_ray() -> tuple[Any, Any]:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise click.ClickException(f"ddim-serve needs Ray Serve: {install_hint('serve')}") from None
    return ray, serve


# Serve gives a starting proxy 3 readiness checks of 5 s before it kills it: on a 2-core machine that is busy (a
# training run beside it) the proxy took longer and Serve failed to start. Defaults only: the environment wins.
RAY_SERVE_DEFAULTS = {"RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30", "RAY_USAGE_STATS_ENABLED": "0"}


def serve_environment() -> None:
    """Set :data:`RAY_SERVE_DEFAULTS` where the environment has no value (before Ray starts: its processes
    inherit it)."""
    for key, value in RAY_SERVE_DEFAULTS.items():
        os.environ.setdefault(key, value)


def quiet_ray_logs() -> None:
    for name in ("ray", "ray.serve", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP proxy listens on (0.0.0.0: every interface; put TLS and auth in front).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=1, show_default=True,
              help="Copies of the model, each a Ray actor (spread over the cluster's nodes with --address).")
@click.option("--replica-cpus", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="CPUs Ray reserves per replica (scheduling only; --threads sets what ONNX Runtime uses).")
@click.option("--replica-gpus", type=click.FloatRange(min=0), default=None,
              help="GPUs Ray gives each replica (fractions share one; Ray hides GPUs from replicas that ask for "
                   "none) [default: 1 when the model runs on CUDA here, else 0].")
@click.option("--max-batch", type=click.IntRange(min=1), default=16, show_default=True,
              help="Most images per network batch, merged across concurrent requests with the same "
                   "sampling settings (steps, eta, solver).")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="How long a batch waits for more images before it runs.")
@click.option("--backend", type=BackendChoice(serve=True), default="auto", show_default=True,
              help="The backends ddim-serve may run: the lean runtime's (replicas never import torch).")
@click.option("--device", type=click.Choice(values(Device)), default=None, help="[default: cuda when usable]")
@click.option("--precision", type=click.Choice(values(RunPrecision)), default="auto", show_default=True,
              help="As ddim-run --precision.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help=f"CPU threads of ONNX Runtime per replica [default: one per physical core, {physical_cores()} "
                   "here].")
@click.option("--address", default=None,
              help="Join this Ray cluster (auto, or HOST:PORT of `ray start --head`) instead of starting a local "
                   "one; MODEL must then lie at the same path on every node.")
@click.option("--max-images-per-request", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--max-steps", type=click.IntRange(min=1), default=1000, show_default=True)
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds to wait for the replicas to load the model.")
@friendly_errors
def main(model: Path | None, host: str, port: int, replicas: int, replica_cpus: float, replica_gpus: float | None,
         max_batch: int,
         batch_wait_ms: float, backend: str, device: str | None, precision: str, threads: int | None,
         address: str | None, max_images_per_request: int, max_steps: int, ready_timeout: float) -> None:
    """Serve MODEL (an export directory or ONNX file; default: the latest export under exports/, else the shipped
    Fashion-MNIST model) over HTTP: POST /v1/samples, GET /v1/model, GET /healthz, docs at /docs."""
    from runtime.exportdir import FP32_ONNX, latest_export
    from runtime.serving.core import ModelService, ServeOptions
    from runtime.common.shipped import pick

    started = time.monotonic()
    model, why = pick(model, "MODEL", "export", "exports", latest_export, FP32_ONNX, "make one with ddim-export")
    options = ServeOptions(str(model.resolve()), backend, device, None if precision == "auto" else precision,  # type: ignore[arg-type]
                           threads, max_batch, batch_wait_ms, max_images_per_request, max_steps)
    # Load it here first: a wrong path, a corrupt file or a missing backend fails in one line before Ray starts.
    probe = ModelService(options)
    click.echo(f"ddim-serve: {model}{why}; {probe.sampler.why}", err=True)
    on_gpu = probe.sampler.backend.device == "cuda"
    if on_gpu and options.device is None:  # replicas pick what was picked here, on the GPU Ray gives them
        options = dataclasses.replace(options, device="cuda")
    replica_gpus = (1.0 if on_gpu else 0.0) if replica_gpus is None else replica_gpus
    if on_gpu and replica_gpus == 0:
        raise click.UsageError("the model runs on CUDA but --replica-gpus is 0: Ray would hide the GPU from the "
                               "replicas; give --replica-gpus (e.g. 0.5 to share a GPU) or --device cpu")
    del probe
    check_port_free(host, port)
    ray, serve = import_ray()
    from runtime.serving.app import build

    quiet_ray_logs()
    serve_environment()
    click.echo(f"ddim-serve: {'joining Ray at ' + address if address else 'starting a local Ray instance'}, "
               f"{replicas} replica(s) ({replica_cpus:g} CPU, {replica_gpus:g} GPU each), max batch {max_batch}, "
               f"batch wait {batch_wait_ms:g} ms", err=True)
    ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING,
             log_to_driver=False, configure_logging=True)
    def stop() -> None:
        """Take the app down (the whole of Serve and Ray when they are ours; only our app on a joined cluster)
        within a bounded time, whatever state Ray is in (a terminal's Ctrl-C may have stopped its processes)."""
        click.echo("ddim-serve: shutting down", err=True)
        failed: list[str] = []

        def take_down() -> None:
            try:
                serve.delete(APP_NAME) if address else serve.shutdown()
            except Exception as exc:  # noqa: BLE001 (reported in one line; Ray is stopped next anyway)
                failed.append(one_line(exc))

        worker = threading.Thread(target=take_down, daemon=True)
        worker.start()
        worker.join(SHUTDOWN_TIMEOUT_S)
        if worker.is_alive() or failed:
            why = failed[0] if failed else f"no answer within {SHUTDOWN_TIMEOUT_S} s"
            click.echo(f"ddim-serve: Serve did not shut down cleanly ({why}); stopping Ray anyway", err=True)
        ray.shutdown()

    def on_sigterm(*_: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build(options, replicas, replica_cpus, replica_gpus), name=APP_NAME, route_prefix="/",
                  blocking=False)
        url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        wait_ready(f"{url}/healthz", ready_timeout)
        click.echo(f"ddim-serve: ready at {url} in {time.monotonic() - started:.1f} s "
                   f"(POST {url}/v1/samples, docs at {url}/docs); Ctrl-C stops", err=True)
        click.echo(url)
        sys.stdout.flush()
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        stop()
    except BaseException:
        stop()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    click.echo("ddim-serve: stopped", err=True)


if __name__ == "__main__":
    main()
