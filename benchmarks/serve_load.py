"""Load test of ``ddim-serve``: start the real service on 127.0.0.1, drive it with K concurrent clients, report
throughput, latency and time-to-first-step percentiles, errors and the batches the server formed, for each
(--max-batch, --batching) setting.

    python benchmarks/serve_load.py                            # shipped model, 16 clients x 1 image, 20 steps,
                                                               # 200 requests per setting; settings: max batch 1
                                                               # request-level, 16 request-level, 16 step-level
    python benchmarks/serve_load.py --max-batch 16 --batching request --batching step
    python benchmarks/serve_load.py --clients 32 --max-batch 32 --requests 400 --steps 50
    python benchmarks/serve_load.py --autoscale 1:2 --load 2:60,16:90,2:120 --replica-cpus 1 --threads 1

Each setting starts ``ddim-serve`` as a user would (a fresh local Ray instance; its time from start to ready is
reported), sends ``--warmup`` requests, then lets ``--clients`` closed-loop clients (each sends its next request
when the last one answered) send ``--requests`` requests in all or stop at ``--time-limit``. Latency is the
client's wall time per request; time to first step (TTFS) is the server's ``X-Queue-Seconds`` per request, from
the replica admitting it to its first network step. ``batches formed`` counts the server's network batches by size,
read from its ``GET /v1/model`` statistics before and after the measured part (step-level: every network call is
one batch, its size the images in that call; request-level: a batch runs all its steps). Writes
benchmarks/results/serve-load-DATE-HOST.{json,md,png} (the report: :mod:`benchmarks.serve_load_report`).
Nothing else should run on the machine meanwhile.

Settings: with neither --max-batch nor --batching, (1, request), (16, request), (16, step): batching against none,
then step-level (``ddim-serve``'s default) against request-level batching at the same max batch. Otherwise every
given --max-batch with every given --batching, max batch ascending, request before step; --max-batch defaults to
16 and --batching to step (what a plain ``ddim-serve --max-batch B`` runs). Where a max batch has both modes the
report says how much lower the step-level p50 latency is, and at what images/s, against the target: at least 20%
lower at equal or higher images/s (as shown). The runtime-alone ceiling is measured once per max batch.

With ``--autoscale MIN:MAX`` it runs one ``ddim-serve --autoscale MIN:MAX`` (the first --max-batch, default 16; the
first --batching, default step) under a step in load instead (``--load``), recording every request and the replicas
once a second
(:mod:`benchmarks.serve_autoscale`); writes benchmarks/results/serve-autoscale-DATE-HOST.{json,md,png}.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, cpu_name, write_report  # noqa: E402
from benchmarks.serve_load_report import markdown, plot  # noqa: E402
from runtime.common.clitools import friendly_errors  # noqa: E402
from runtime.common.shipped import SHIPPED_MODEL  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``ddim-serve MODEL --port P --max-batch B --batching MODE ...`` in a subprocess, up until ``stop()``."""

    def __init__(self, model: Path, max_batch: int, batching: str, batch_wait_ms: float, extra: tuple[str, ...],
                 timeout: float):
        self.port = free_port()
        cmd = [sys.executable, "-m", "runtime.serving.cli", str(model), "--port", str(self.port),
               "--max-batch", str(max_batch), "--batching", batching, "--batch-wait-ms", str(batch_wait_ms), *extra]
        start = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.stderr: list[str] = []
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()  # type: ignore[arg-type]
        line = self._read_url(timeout)
        self.ready_s = time.perf_counter() - start
        self.url = line.strip()

    def _read_url(self, timeout: float) -> str:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not out or not out[0].startswith("http"):
            self.stop()
            tail = "".join(self.stderr[-5:]).strip()
            raise RuntimeError(f"ddim-serve did not become ready in {timeout:.0f} s: {tail or 'no output'}")
        return out[0]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                return self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()


def post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict[str, str], float]:
    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status, dict(resp.headers), time.perf_counter() - start
    except urllib.error.HTTPError as exc:
        exc.read()
        return exc.code, dict(exc.headers), time.perf_counter() - start
    except OSError:
        return 0, {}, time.perf_counter() - start


def header(headers: dict[str, str], name: str) -> str | None:
    """``headers[name]``, whatever the case the server sent it in; None when absent."""
    return next((v for k, v in headers.items() if k.lower() == name.lower()), None)


def settings(max_batches: tuple[int, ...], batchings: tuple[str, ...]) -> list[tuple[int, str]]:
    """The (max batch, batching) settings to run, in order (see the module docstring)."""
    if not max_batches and not batchings:
        return [(1, "request"), (16, "request"), (16, "step")]
    modes = [m for m in ("request", "step") if m in (batchings or ("step",))]
    return [(b, m) for b in sorted(set(max_batches or (16,))) for m in modes]


def batch_stats(url: str) -> dict[int, int]:
    with urllib.request.urlopen(f"{url}/v1/model", timeout=60) as resp:
        return {int(k): v for k, v in json.loads(resp.read())["stats"]["batch_sizes"].items()}


def parse_mix(text: str) -> list[dict[str, Any]]:
    """``--mix 10,20,50:dpmpp-2m``: request shapes, ``STEPS[:SOLVER]`` each (solver default ddim)."""
    shapes = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        steps, _, solver = item.partition(":")
        if not steps.isdigit() or int(steps) < 1 or solver not in ("", "ddim", "dpmpp-2m"):
            raise click.BadParameter(f"{item!r}: expected STEPS[:SOLVER], e.g. 10,50:dpmpp-2m", param_hint="--mix")
        shapes.append({"steps": int(steps), "solver": solver or "ddim"})
    if not shapes:
        raise click.BadParameter("give at least one STEPS[:SOLVER]", param_hint="--mix")
    return shapes


def request_body(body: dict, mix: list[dict[str, Any]] | None, seed: int) -> dict[str, Any]:
    """Request ``seed``'s fields: ``body``, the mix's item ``seed`` modulo its length (the same in every run)."""
    return {**body, **(mix[seed % len(mix)] if mix else {}), "seed": seed}


def drive(url: str, clients: int, requests: int, time_limit: float, body: dict,
          mix: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Closed-loop clients until ``requests`` were sent or ``time_limit`` passed; throughput, latency and time to
    first step (``X-Queue-Seconds``) of the answered requests."""
    lock = threading.Lock()
    sent = [0]
    records: list[tuple[int, float, dict[str, str]]] = []
    deadline = time.perf_counter() + time_limit

    def client(k: int) -> None:
        while True:
            with lock:
                if sent[0] >= requests or time.perf_counter() > deadline:
                    return
                seed = sent[0]
                sent[0] += 1
            status, headers, seconds = post(f"{url}/v1/samples", request_body(body, mix, seed))
            with lock:
                records.append((status, seconds, headers))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [s for status, s, _ in records if status == 200]
    queued = [float(value) for status, _, h in records if status == 200 and (value := header(h, "X-Queue-Seconds"))]
    lat = np.array(ok) if ok else np.array([np.nan])
    ttfs = np.array(queued) if queued else np.array([np.nan])
    return {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok), "seconds": wall,
            "requests_per_s": len(ok) / wall, "images_per_s": len(ok) * body["num_images"] / wall,
            **{f"p{q}_ms": 1e3 * float(np.percentile(lat, q)) for q in (50, 90, 99)},
            **{f"ttfs_p{q}_ms": 1e3 * float(np.percentile(ttfs, q)) for q in (50, 90, 99)},
            "error_statuses": sorted({s for s, _, _ in records if s != 200})}


def replica_alone(model: Path, max_batch: int, batching: str, engine: tuple[str, str, str], threads: int | None,
                  clients: int, requests: int, body: dict, mix: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The same closed-loop workload on a replica in this process (``runtime.serving.core.Replica``: the batcher, the
    runtime and the answer's encoding; no HTTP, no Ray): what the batching policy does on its own, without the front,
    Ray and the client threads competing for the same cores."""
    import asyncio

    from runtime.serving.core import Replica, ServeOptions

    backend, device, precision = engine
    limit = max(body["num_images"], 64)
    options = ServeOptions(str(model), backend, device, precision, threads, max_batch,  # type: ignore[arg-type]
                           max_images_per_request=limit, batching=batching)  # type: ignore[arg-type]
    replica = Replica(options)
    latency: list[float] = []
    ttfs: list[float] = []
    sent = [0]

    async def client() -> None:
        while sent[0] < requests:
            seed, sent[0] = sent[0], sent[0] + 1
            start = time.perf_counter()
            answer = await replica.samples(request_body(body, mix, seed))
            if answer.status != 200:
                raise RuntimeError(f"replica alone: {answer.status} {answer.body[:200]!r}")
            latency.append(time.perf_counter() - start)
            ttfs.append(float(answer.headers["X-Queue-Seconds"]))

    async def run_all() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(clients)))
        return time.perf_counter() - start

    seconds = asyncio.run(run_all())
    return {"alone_images_per_s": requests * body["num_images"] / seconds,
            "alone_p50_ms": 1e3 * float(np.percentile(latency, 50)),
            "alone_p90_ms": 1e3 * float(np.percentile(latency, 90)),
            "alone_ttfs_p50_ms": 1e3 * float(np.percentile(ttfs, 50))}


def direct(model: Path, batch: int, steps: int, solver: str, threads: int | None, min_seconds: float = 5.0,
           engine: tuple[str, str, str] = ("onnxruntime", "cpu", "fp32")) -> float:
    """images/s of the runtime itself at this network batch size, no server: the ceiling a setting can reach."""
    from runtime.api import load
    from runtime.settings import SamplingSettings

    sampler = load(model, *engine, threads)  # type: ignore[arg-type]
    sampler.sample(batch, SamplingSettings(2), batch_size=batch)  # warm-up
    settings = SamplingSettings(steps, solver=solver)  # type: ignore[arg-type]  # a choice of the CLI
    images, seconds = 0, 0.0
    while seconds < min_seconds:
        result = sampler.sample(batch, settings, seed=images, batch_size=batch)
        images, seconds = images + batch, seconds + result.seconds
    return images / seconds


@click.command()
@click.option("--model", type=click.Path(path_type=Path, exists=True), default=SHIPPED_MODEL, show_default=True)
@click.option("--max-batch", "max_batches", type=click.IntRange(min=1), multiple=True,
              help="Max batches to compare (repeat) [default: 1 request-level and 16 both ways, or 16 with "
                   "--batching].")
@click.option("--batching", "batchings", type=click.Choice(["step", "request"]), multiple=True,
              help="ddim-serve --batching modes to compare at each --max-batch (repeat) [default: step with "
                   "--max-batch].")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=10.0, show_default=True)
@click.option("--clients", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--requests", type=click.IntRange(min=1), default=200, show_default=True, help="Per setting.")
@click.option("--repeat", type=click.IntRange(1, 20), default=1, show_default=True,
              help="Run every setting this many times, interleaved (run 1 of each, then run 2, ...); comparisons "
                   "use the medians (a shared or noisy machine).")
@click.option("--time-limit", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds per setting; clients stop sending after it.")
@click.option("--warmup", type=click.IntRange(min=0), default=8, show_default=True)
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True, help="Images per request.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--solver", type=click.Choice(["ddim", "dpmpp-2m"]), default="ddim", show_default=True)
@click.option("--mix", "mix_text", default=None, metavar="STEPS[:SOLVER],...",
              help="Mixed requests instead of --steps/--solver: request n (its seed) takes item n modulo the list, "
                   "e.g. 10,20,50,10:dpmpp-2m (the same requests in every setting).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ddim-serve --threads.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True)
@click.option("--replica-cpus", type=click.FloatRange(min=0), default=None, help="ddim-serve --replica-cpus.")
@click.option("--autoscale", default=None, metavar="MIN:MAX",
              help="Instead: one ddim-serve --autoscale MIN:MAX under the step in load of --load.")
@click.option("--load", "load_text", default="2:60,16:90,2:120", show_default=True, metavar="CLIENTS:SECONDS,...",
              help="With --autoscale: closed-loop clients per phase, and for how long.")
@click.option("--backend", type=click.Choice(["onnxruntime", "openvino", "tensorrt"]), default="onnxruntime",
              show_default=True, help="ddim-serve --backend (a GPU run: tensorrt or onnxruntime with --device cuda).")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "bf16"]), default="fp32", show_default=True)
@click.option("--alone/--no-alone", default=True, show_default=True,
              help="Also run each setting's workload on a replica in this process (no HTTP, no Ray): the batching "
                   "policy without the serving stack competing for the cores.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@friendly_errors
def main(model: Path, max_batches: tuple[int, ...], batchings: tuple[str, ...], batch_wait_ms: float, clients: int,
         requests: int, repeat: int, time_limit: float, warmup: int, num_images: int, steps: int, solver: str,
         mix_text: str | None, threads: int | None,
         ready_timeout: float, replica_cpus: float | None, autoscale: str | None, load_text: str, backend: str,
         device: str, precision: str, alone: bool, out: Path) -> None:
    """Start ddim-serve per (--max-batch, --batching) setting, load it, and write JSON, Markdown and a plot (or, with
    --autoscale, one autoscaling service under a step in load)."""
    import ray

    from runtime.common.hostinfo import physical_cores

    body = {"num_images": num_images, "steps": steps, "solver": solver, "format": "png"}
    mix = parse_mix(mix_text) if mix_text else None
    if mix:  # the row's steps and solver name the mix; the ceiling scales by its mean steps (equal cost per step)
        steps_label: Any = "/".join(str(m["steps"]) for m in mix)
        solver_label = "/".join(sorted({m["solver"] for m in mix}))
        mean_steps = sum(m["steps"] for m in mix) / len(mix)
    else:
        steps_label, solver_label, mean_steps = steps, solver, float(steps)
    engine = (backend, device, precision)
    extra = ("--backend", backend, "--device", device, "--precision", precision,
             "--max-images-per-request", str(max(num_images, 64)))
    extra += ("--threads", str(threads)) if threads else ()
    extra += ("--replica-cpus", f"{replica_cpus:g}") if replica_cpus is not None else ()
    if autoscale is not None:
        autoscaling_run(model, autoscale, load_text, (max_batches or (16,))[0], (batchings or ("step",))[0],
                        batch_wait_ms, warmup, body, extra, ready_timeout, out)
        return
    rows = []
    ceilings: dict[int, float] = {}  # the runtime alone, once per max batch
    for run, (max_batch, batching) in ((r, s) for r in range(1, repeat + 1) for s in settings(max_batches, batchings)):
        click.echo(f"serve_load: ddim-serve {model} --max-batch {max_batch} --batching {batching} (run {run} of "
                   f"{repeat})", err=True)
        server = Server(model, max_batch, batching, batch_wait_ms, extra, ready_timeout)
        try:
            click.echo(f"  ready at {server.url} in {server.ready_s:.1f} s; warm-up {warmup} requests", err=True)
            drive(server.url, min(clients, max(warmup, 1)), warmup, time_limit, body, mix)
            before = batch_stats(server.url)
            result = drive(server.url, clients, requests, time_limit, body, mix)
            after = batch_stats(server.url)
        finally:
            rc = server.stop()
        if max_batch not in ceilings:
            ceilings[max_batch] = direct(model, max_batch, steps, solver, threads, engine=engine) * steps / mean_steps
        ceiling = ceilings[max_batch]
        if alone:
            result.update(replica_alone(model, max_batch, batching, engine, threads, clients, requests, body, mix))
            click.echo(f"  replica alone (no HTTP, no Ray): {result['alone_images_per_s']:.2f} images/s, p50 "
                       f"{result['alone_p50_ms']:.0f} ms, time to first step p50 {result['alone_ttfs_p50_ms']:.0f} ms",
                       err=True)
        batches = {str(k): after[k] - before.get(k, 0) for k in sorted(after) if after[k] > before.get(k, 0)}
        shown = model.resolve().relative_to(ROOT) if model.resolve().is_relative_to(ROOT) else model
        row = {"model": str(shown), "backend": " ".join(engine), "max_batch": max_batch, "batching": batching,
               "run": run, "batch_wait_ms": batch_wait_ms,
               "clients": clients, "num_images": num_images, "steps": steps_label, "solver": solver_label,
               "ready_s": server.ready_s, "batches": batches, "shutdown_rc": rc, "direct_images_per_s": ceiling,
               **result}
        rows.append(row)
        click.echo(f"  {result['ok']} ok / {result['requests']} requests in {result['seconds']:.1f} s: "
                   f"{result['images_per_s']:.2f} images/s, p50 {result['p50_ms']:.0f} ms, p90 {result['p90_ms']:.0f} "
                   f"ms, p99 {result['p99_ms']:.0f} ms, time to first step p50 {result['ttfs_p50_ms']:.0f} ms, p90 "
                   f"{result['ttfs_p90_ms']:.0f} ms, {result['errors']} errors; batches {batches}; shutdown rc {rc}; "
                   f"runtime alone at batch {max_batch}: {ceiling:.2f} images/s", err=True)
    from benchmarks.latency import matmul_peak

    peak, peak_source = matmul_peak("cpu")
    env = {"host": socket.gethostname(), "cpu": cpu_name(), "cores": physical_cores(),
           "python": platform.python_version(), "ray": ray.__version__, "matmul_peak_gflop_s": round(peak, 1),
           "matmul_peak_source": peak_source}
    key = ("model", "max_batch", "batching", "run", "clients", "num_images", "steps", "solver")
    # rows from before --batching and --repeat existed: request-level, one run
    _, stem = write_report("serve-load", out, env, rows, key, markdown, plot, defaults={"batching": "request",
                                                                                      "run": 1})
    click.echo(f"wrote {stem}.json, .md and .png")


def autoscaling_run(model: Path, autoscale: str, load_text: str, max_batch: int, batching: str, batch_wait_ms: float,
                    warmup: int, body: dict, extra: tuple[str, ...], ready_timeout: float, out: Path) -> None:
    """One ``ddim-serve --autoscale MIN:MAX`` under the step in load of ``load_text``; the serve-autoscale report."""
    import ray

    from benchmarks import serve_autoscale as sa
    from runtime.common.hostinfo import physical_cores
    from runtime.serving.scaling import Autoscale, parse_bounds

    scaling = Autoscale(*parse_bounds(autoscale))  # ddim-serve's defaults for the rest: the report names them
    load = sa.parse_load(load_text)
    extra += ("--autoscale", scaling.label)
    shown = model.resolve().relative_to(ROOT) if model.resolve().is_relative_to(ROOT) else model
    command = " ".join(["python benchmarks/serve_load.py", *sys.argv[1:]])
    click.echo(f"serve_load: ddim-serve {model} --max-batch {max_batch} --batching {batching} {' '.join(extra)}; "
               f"load {load_text}", err=True)
    load_before = [round(x, 2) for x in os.getloadavg()]  # other work on the machine shows here
    server = Server(model, max_batch, batching, batch_wait_ms, extra, ready_timeout)
    try:
        click.echo(f"  ready at {server.url} in {server.ready_s:.1f} s; warm-up {warmup} requests", err=True)
        drive(server.url, max(1, min(warmup, load[0][0])), warmup, 300, body)
        requests, samples, starts = sa.step_load(server.url, load, body)
    finally:
        rc = server.stop()
    summary = sa.summarize(requests, samples, starts, load, body["num_images"])
    row = {"model": str(shown), "autoscale": scaling.label, "load": load_text, "command": command,
           "max_batch": max_batch, "batching": batching, "num_images": body["num_images"], "steps": body["steps"],
           "solver": body["solver"], "target_ongoing_requests": scaling.target_ongoing_requests,
           "upscale_delay_s": scaling.upscale_delay_s, "downscale_delay_s": scaling.downscale_delay_s,
           "ddim_serve_args": list(extra), "ready_s": server.ready_s,
           "shutdown_rc": rc, "loadavg_before": load_before, "loadavg_after": [round(x, 2) for x in os.getloadavg()],
           "phase_starts": starts, **summary, "requests": requests, "replicas": samples,
           "server_log": [line.rstrip() for line in server.stderr]}
    click.echo(f"  {summary['verdict']}", err=True)
    env = {"host": socket.gethostname(), "cpu": cpu_name(), "cores": physical_cores(),
           "python": platform.python_version(), "ray": ray.__version__}
    _, stem = write_report("serve-autoscale", out, env, [row], ("model", "autoscale", "load"), sa.markdown, sa.plot)
    click.echo(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
