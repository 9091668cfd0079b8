"""``ddim-serve``: the model behind an HTTP endpoint: a front (this process) in front of replicas on Ray Serve.

Startup, every stage under ``--ready-timeout``: load the model here (a wrong path or file fails in one line before
Ray starts), check the port and the cluster address, start or join Ray, check the replicas fit its resources,
deploy them (Serve's own HTTP proxy is not started), wait until they run, then open the front
(:mod:`runtime.serving.ingress`). A stage that does not finish in time ends the process with one line naming it and
Ray's reason, exit 1. SIGINT and SIGTERM (whatever the disposition inherited: a background job ignores SIGINT;
SIGINT is taken back first thing, so even the checks before Ray stop on it) drain: the front stops taking requests,
in-flight ones finish or get a JSON 503 after ``--grace``, then Serve and Ray stop and every process Ray left behind
is ended. With ``--autoscale MIN:MAX`` Serve moves the replica count by load (:mod:`runtime.serving.scaling`; the
resource check counts MAX on a local instance, MIN on a joined cluster). With an API token (``DDIM_SERVE_TOKEN``,
``--api-token-file`` or ``--api-token``) every route but ``GET /healthz`` needs it (:mod:`runtime.serving.auth`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

from runtime.choices import Device, RunPrecision, values
from runtime.common.clitools import friendly_errors, one_line, threads_option
from runtime.options import BackendChoice
from runtime.common.hostinfo import physical_cores
from runtime.serving.process import (Watchdog, _write, check_port_free, import_ray, loopback, quiet_ray_logs,
                                      raise_file_limit, say, serve_environment, take_sigint)
from runtime.serving.scaling import Autoscale, autoscale_options, resolve

SHUTDOWN_TIMEOUT_S = 60  # a joined cluster: deleting our app
LOCAL_SHUTDOWN_TIMEOUT_S = 20  # our own instance: ray.shutdown()
POLL_S = 1.0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address the HTTP front listens on (0.0.0.0: every interface; put TLS and auth in front).")
@click.option("--port", type=click.IntRange(1, 65535), default=8000, show_default=True)
@click.option("--replicas", type=click.IntRange(min=1), default=None,
              help="Copies of the model, each a Ray actor (spread over the cluster's nodes with --address) "
                   "[default: 1; or a range by load with --autoscale].")
@autoscale_options
@click.option("--replica-cpus", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="CPUs Ray reserves per replica (scheduling only; --threads sets what ONNX Runtime uses).")
@click.option("--replica-gpus", type=click.FloatRange(min=0), default=None,
              help="GPUs Ray gives each replica (fractions share one; Ray hides GPUs from replicas that ask for "
                   "none) [default: 1 when the model runs on CUDA here, else 0].")
@click.option("--max-batch", type=click.IntRange(1, 4096), default=16, show_default=True,
              help="Most images per network batch, merged across concurrent requests.")
@click.option("--batching", type=click.Choice(["step", "request"]), default="step", show_default=True,
              help="step: images join the running network batch at the next step and leave when done, whatever "
                   "their settings; request: a batch of images with the same settings runs from first "
                   "step to last.")
@click.option("--batch-wait-ms", type=click.FloatRange(0, 60_000), default=10.0, show_default=True,
              help="How long a batch waits for more images before it runs.")
@click.option("--max-queue-seconds", "max_queue_s", type=click.FloatRange(min=0, min_open=True), default=60.0,
              show_default=True,
              help="Admission control: a request that would finish later than this (at the replica's measured "
                   "image-steps per second, sharing fairly with the queue) is a 503 with Retry-After.")
@click.option("--backend", type=BackendChoice(serve=True), default="auto", show_default=True,
              help="The backends ddim-serve may run: the lean runtime's (replicas never import torch).")
@click.option("--device", type=click.Choice(values(Device)), default=None, help="[default: cuda when usable]")
@click.option("--precision", type=click.Choice(values(RunPrecision)), default="auto", show_default=True,
              help="As ddim-run --precision.")
@threads_option(f"CPU threads of ONNX Runtime per replica [default: one per physical core, {physical_cores()} here].")
@click.option("--address", default=None,
              help="Join this Ray cluster (auto, or HOST:PORT of `ray start --head`) instead of starting a local "
                   "one; MODEL must then lie at the same path on every node.")
@click.option("--max-images-per-request", type=click.IntRange(1, 100_000), default=64, show_default=True)
@click.option("--max-steps", type=click.IntRange(1, 100_000), default=1000, show_default=True)
@click.option("--ready-timeout", type=click.FloatRange(1, 86_400), default=300.0, show_default=True,
              help="Seconds every startup stage together may take (Ray, placement, loading the model); also how "
                   "long the service may run with no replica before it exits 1.")
@click.option("--header-timeout", "header_timeout_s", type=click.FloatRange(0, 3600, min_open=True), default=10.0,
              show_default=True, help="Seconds a client has to send a request's headers (then 408).")
@click.option("--body-timeout", "body_timeout_s", type=click.FloatRange(0, 3600, min_open=True), default=10.0,
              show_default=True, help="Seconds a client has to send a request's body after its headers (then 408).")
@click.option("--max-connections", type=click.IntRange(1, 100_000), default=1000, show_default=True,
              help="Open client connections the front holds; more are answered 503.")
@click.option("--grace", "grace_s", type=click.FloatRange(0, 3600, min_open=True), default=30.0, show_default=True,
              help="At SIGINT/SIGTERM, seconds in-flight requests get to finish (then a JSON 503).")
@click.option("--api-token", metavar="TOKEN", default=None,
              help="Require 'Authorization: Bearer TOKEN' on every route but GET /healthz (at least 16 characters). "
                   "A command line is visible to every user in ps: prefer the environment variable "
                   "DDIM_SERVE_TOKEN (used when neither option is given) or --api-token-file.")
@click.option("--api-token-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Read the API token from this file (one line; a trailing newline is dropped).")
@friendly_errors
def main(model: Path | None, host: str, port: int, replicas: int | None, autoscale: tuple[int, int] | None,
         target_ongoing_requests: float | None, upscale_delay_s: float | None, downscale_delay_s: float | None,
         replica_cpus: float, replica_gpus: float | None,
         max_batch: int, batching: str, batch_wait_ms: float, max_queue_s: float, backend: str, device: str | None,
         precision: str, threads: int | None, address: str | None, max_images_per_request: int, max_steps: int,
         ready_timeout: float, header_timeout_s: float, body_timeout_s: float, max_connections: int,
         grace_s: float, api_token: str | None, api_token_file: Path | None) -> None:
    """Serve MODEL (an export directory or ONNX file; default: the latest export under exports/, else the shipped
    Fashion-MNIST model) over HTTP: POST /v1/samples, GET /v1/model, GET /healthz, GET /metrics, docs at /docs."""
    from runtime.exportdir import FP32_ONNX, latest_export
    from runtime.serving.auth import ENV_VAR, resolve_token
    from runtime.serving.core import ModelService, ServeOptions
    from runtime.serving.ingress import FrontOptions
    from runtime.common.shipped import pick

    take_sigint()
    started = time.monotonic()
    replicas, scaling = resolve(replicas, autoscale, target_ongoing_requests, upscale_delay_s, downscale_delay_s)
    token, token_from = resolve_token(api_token, api_token_file)  # a bad token fails before anything loads
    os.environ.pop(ENV_VAR, None)  # Ray's processes inherit the environment: the token stays in this one
    model, why = pick(model, "MODEL", "export", "exports", latest_export, FP32_ONNX, "make one with ddim-export")
    options = ServeOptions(str(model.resolve()), backend, device, None if precision == "auto" else precision,  # type: ignore[arg-type]
                           threads, max_batch, batch_wait_ms, max_images_per_request, max_steps, max_queue_s,
                           batching)  # type: ignore[arg-type]
    front = FrontOptions(header_timeout_s, body_timeout_s, max_connections, grace_s, api_token=token)
    # Load it here first: a wrong path, a corrupt file or a missing backend fails in one line before Ray starts.
    probe = ModelService(options)
    say(f"{model}{why}; {probe.sampler.why}")
    on_gpu = probe.sampler.backend.device == "cuda"
    replica_gpus = (1.0 if on_gpu else 0.0) if replica_gpus is None else replica_gpus
    if on_gpu and replica_gpus == 0:
        raise click.UsageError("the model runs on CUDA but --replica-gpus is 0: Ray would hide the GPU from the "
                               "replicas; give --replica-gpus (e.g. 0.5 to share a GPU) or --device cpu")
    # Replicas load only this file (by sha256), and pick what was picked here, on the GPU Ray gives them.
    options = dataclasses.replace(options, sha256=probe.sha256, device="cuda" if on_gpu else options.device)
    del probe
    if token:
        say(f"every route but GET /healthz needs the bearer token from {token_from}")
    elif not loopback(host):
        say(f"--host {host} without an API token: anyone who reaches the port may sample (set DDIM_SERVE_TOKEN)")
    check_port_free(host, port)
    raise_file_limit(max_connections)
    from runtime.serving import cluster

    cluster.check_address(address)
    ray, serve = import_ray()
    quiet_ray_logs()
    serve_environment()
    cluster.become_subreaper()
    run = Run(front, host, port, ready_timeout, address)
    code = run.start_and_serve(options, replicas, replica_cpus, replica_gpus, started, scaling)
    if code:
        sys.exit(code)


class Run:
    """One ddim-serve process's life: start (under a watchdog), serve, drain, stop. Its signal handler stays
    installed until the end: a second signal while stopping ends Ray's processes and exits at once."""

    def __init__(self, front: Any, host: str, port: int, ready_timeout: float, address: str | None) -> None:
        self.front, self.host, self.port, self.ready_timeout = front, host, port, ready_timeout
        self.address = address
        # A joined cluster may run other services: this one's app has its own name, so it neither replaces
        # another ddim-serve's app nor deletes it at exit.
        self.app_name = f"ddim-{socket.gethostname()}-{os.getpid()}" if address else "ddim"
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
        self.server: Any = None
        self.app: Any = None
        self.handle: Any = None  # Serve's deployment handle, once deployed
        self.autoscaled = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.draining = False
        self.stopping = False
        self.exit_code = 0

    def on_signal(self, signum: int, _frame: Any) -> None:
        """Startup: interrupt it. Serving: drain. While stopping (or a second signal while draining): end now."""
        name = signal.Signals(signum).name
        if self.stopping:
            _write(f"ddim-serve: {name} again: ending Ray's processes now\n")
            from runtime.serving.cluster import end_descendants

            end_descendants(grace_s=1.0)
            os._exit(self.exit_code or 130)
        if self.server is None or self.loop is None or self.loop.is_closed():
            raise KeyboardInterrupt
        if self.draining:
            self.server.force_exit = True
            return
        self.draining = True
        _write(f"ddim-serve: {name}: draining (in-flight requests get {self.front.grace_s:g} s)\n")
        self.loop.call_soon_threadsafe(self.app.state.draining.set)
        self.server.should_exit = True

    def status(self) -> tuple[dict[str, int], str]:
        """The replicas by state (running, starting, stopping) and, when none runs, why."""
        from runtime.serving.cluster import deployment_status

        return deployment_status(self.app_name)

    def start_and_serve(self, options: Any, replicas: int, replica_cpus: float, replica_gpus: float,
                        started: float, autoscale: Autoscale | None = None) -> int:
        """``replicas`` replicas, or MIN of ``autoscale`` to start with and Serve's autoscaling up to MAX."""
        import ray
        from ray import serve
        from ray.serve.api import RunTarget

        from runtime.serving import cluster
        from runtime.serving.app import build
        from runtime.serving.ingress import make_app, make_server

        address = self.address
        watchdog = Watchdog(self.ready_timeout)
        previous = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            try:
                watchdog.stage = (f"joining the Ray cluster at {address}" if address
                                  else "starting a local Ray instance")
                count = f"{replicas} replica(s)" if autoscale is None else (
                    f"{autoscale.min_replicas} to {autoscale.max_replicas} replicas by load (target "
                    f"{autoscale.target_ongoing_requests:g} requests in flight each; up after "
                    f"{autoscale.upscale_delay_s:g} s, down after {autoscale.downscale_delay_s:g} s)")
                say(f"{watchdog.stage}, {count} ({replica_cpus:g} CPU, {replica_gpus:g} GPU each), "
                    f"{options.batching}-level batching, max batch {options.max_batch}, batch wait "
                    f"{options.batch_wait_ms:g} ms")
                ray.init(address=address or "local", include_dashboard=False, logging_level=logging.WARNING,
                         log_to_driver=False, configure_logging=True)
                for sig in previous:  # ray.init's core worker installs a C handler for SIGTERM (a stack dump,
                    signal.signal(sig, self.on_signal)  # then death with nothing cleaned up): ours again
                watchdog.stage = "checking the cluster's resources"
                for warning in cluster.check_resources(replicas, replica_cpus, replica_gpus, joined=bool(address),
                                                       autoscale=autoscale):
                    say(warning)
                watchdog.stage = "starting Serve"
                serve.start(proxy_location="Disabled")
                watchdog.stage = f"placing {replicas} replica(s) and loading the model"
                watchdog.detail = lambda: self.status()[1]
                self.autoscaled = autoscale is not None
                [self.handle] = serve.run_many([RunTarget(build(options, replicas, replica_cpus, replica_gpus,
                                                                autoscale), name=self.app_name, route_prefix=None)],
                                               wait_for_applications_running=False)
                forwarder = cluster.RayForwarder(self.handle)
                forwarder.states = self.wait_running(replicas)
                watchdog.stage = f"opening {self.url}"
                self.app = make_app(forwarder, self.front)
                self.server = make_server(self.app, self.host, self.port, self.front)
                asyncio.run(self.serve(forwarder, watchdog, started, self.autoscaled))
            except KeyboardInterrupt:
                say("interrupted")
                self.exit_code = 130
            except SystemExit:  # uvicorn exits when it cannot bind; it logged why
                self.exit_code = 1
            finally:
                watchdog.done()
                self.stopping = True
                self.stop(serve, ray)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return self.exit_code

    def wait_running(self, replicas: int) -> dict[str, int]:
        """Until every replica runs (returns them by state); one line when the deployment failed (a model that cannot
        load)."""
        while True:
            states, why = self.status()
            if states["running"] >= replicas:
                return states
            if "DEPLOY_FAILED" in why or "UNHEALTHY" in why:
                raise RuntimeError(f"the replicas did not start: {why}")
            time.sleep(0.25)

    async def serve(self, forwarder: Any, watchdog: Watchdog, started: float, autoscaled: bool = False) -> None:
        """The front until a signal or a service without replicas for --ready-timeout."""
        self.loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(self.server.serve())
        try:
            while not self.server.started and not task.done():
                await asyncio.sleep(0.05)
        finally:
            watchdog.done()
        if task.done():
            await task
            return
        say(f"ready at {self.url} in {time.monotonic() - started:.1f} s (POST {self.url}/v1/samples, docs at "
            f"{self.url}/docs); Ctrl-C stops")
        click.echo(self.url)
        sys.stdout.flush()
        monitor = asyncio.ensure_future(self.watch(forwarder, autoscaled))
        try:
            await task
        finally:
            monitor.cancel()

    async def watch(self, forwarder: Any, autoscaled: bool = False) -> None:
        """Poll the replicas' health and count for the front (``forwarder.why``, ``forwarder.states``); say when
        health changes, and with ``autoscaled`` when the running count does; exit 1 after --ready-timeout without
        a running replica."""
        from runtime.serving import cluster

        down_since: float | None = None
        while True:
            await asyncio.sleep(POLL_S)
            try:
                states, why = await cluster.in_daemon_thread(self.status, 10)
            except Exception as exc:  # noqa: BLE001 (Ray's controller or GCS gone: the front still answers)
                states, why = {}, f"Ray does not answer ({one_line(exc) or 'timeout'})"
            running = states.get("running", 0)
            if autoscaled and running and running != forwarder.states.get("running"):
                say(f"autoscaling: {running} replica(s) running")
            forwarder.states = states
            if running:
                if forwarder.why is not None:
                    say(f"a replica is serving again ({running} running)")
                forwarder.why, down_since = None, None
                continue
            if forwarder.why is None:
                say(f"no replica is serving: {why}; requests get 503 until one is (exit in "
                    f"{self.ready_timeout:g} s)")
                down_since = time.monotonic()
            forwarder.why = why
            if down_since is not None and time.monotonic() - down_since > self.ready_timeout:
                click.echo(f"error: ddim-serve: no replica for {self.ready_timeout:g} s (--ready-timeout): {why}",
                           err=True)
                self.exit_code = 1
                self.app.state.draining.set()
                self.server.should_exit = True
                return

    def stop(self, serve: Any, ray: Any) -> None:
        """Take the app down (Serve and Ray when they are ours; only our app on a joined cluster) within a bounded
        time, whatever state Ray is in, then end every process left below us."""
        from runtime.serving import cluster

        address = self.address
        ours = ray.is_initialized()
        say("shutting down")
        failed: list[str] = []
        gcs_gone = ours and not address and not cluster.local_gcs_alive()

        def take_down() -> None:
            try:
                if ours and self.autoscaled and self.handle is not None and not gcs_gone:
                    # Its router sends Serve's controller the load every 2 s from a thread of its own: stopped
                    # first, or it reaches for the controller Ray is taking down (a traceback, or a reconnect).
                    self.handle.shutdown()
                if ours and address:
                    serve.delete(self.app_name)  # a joined cluster keeps running, with its other apps
                if ours and not gcs_gone:
                    ray.shutdown()  # a local instance goes whole: its replicas have no work left (drained)
            except Exception as exc:  # noqa: BLE001 (reported in one line; what is left is ended below)
                failed.append(one_line(exc))

        worker = threading.Thread(target=take_down, daemon=True)
        worker.start()
        limit = SHUTDOWN_TIMEOUT_S if address else LOCAL_SHUTDOWN_TIMEOUT_S
        worker.join(limit)
        stuck = worker.is_alive() or gcs_gone
        if stuck or failed:
            why = failed[0] if failed else "its GCS is gone" if gcs_gone else f"no answer within {limit} s"
            say(f"Ray did not shut down cleanly ({why}); ending its processes")
        left = cluster.end_descendants()
        if left:
            say(f"ended {left} process(es) Ray left behind")
        say("stopped")
        if stuck:  # Ray's exit hooks would wait for the GCS again (a minute, then an abort): leave now
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.exit_code)


if __name__ == "__main__":
    main()
