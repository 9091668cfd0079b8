"""Load test of ``ddim-serve``: start the real service on 127.0.0.1, drive it with K concurrent clients, report
throughput, latency percentiles, errors and the batches the server formed, for each --max-batch setting.

    python benchmarks/serve_load.py                            # shipped model, 16 clients x 1 image, 20 steps,
                                                               # 200 requests per setting, --max-batch 1 and 16
    python benchmarks/serve_load.py --clients 32 --max-batch 32 --requests 400 --steps 50
    python benchmarks/serve_load.py --autoscale 1:2 --load 2:60,16:90,2:120 --replica-cpus 1 --threads 1

Each setting starts ``ddim-serve`` as a user would (a fresh local Ray instance; its time from start to ready is
reported), sends ``--warmup`` requests, then lets ``--clients`` closed-loop clients (each sends its next request
when the last one answered) send ``--requests`` requests in all or stop at ``--time-limit``. Latency is the
client's wall time per request. ``batches formed`` counts the server's network batches by size, read from its
``GET /v1/model`` statistics before and after the measured part. Writes
benchmarks/results/serve-load-DATE-HOST.{json,md,png}. Nothing else should run on the machine meanwhile.

With ``--autoscale MIN:MAX`` it runs one ``ddim-serve --autoscale MIN:MAX`` (the first --max-batch, default 16)
under a step in load instead (``--load``), recording every request and the replicas once a second
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

from benchmarks.common import RESULTS, cpu_name, pyplot, save_figure, write_report  # noqa: E402
from runtime.common.clitools import friendly_errors  # noqa: E402
from runtime.common.shipped import SHIPPED_MODEL  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``ddim-serve MODEL --port P --max-batch B ...`` in a subprocess, up until ``stop()``."""

    def __init__(self, model: Path, max_batch: int, batch_wait_ms: float, extra: tuple[str, ...], timeout: float):
        self.port = free_port()
        cmd = [sys.executable, "-m", "runtime.serving.cli", str(model), "--port", str(self.port),
               "--max-batch", str(max_batch), "--batch-wait-ms", str(batch_wait_ms), *extra]
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


def batch_stats(url: str) -> dict[int, int]:
    with urllib.request.urlopen(f"{url}/v1/model", timeout=60) as resp:
        return {int(k): v for k, v in json.loads(resp.read())["stats"]["batch_sizes"].items()}


def drive(url: str, clients: int, requests: int, time_limit: float, body: dict) -> dict[str, Any]:
    """Closed-loop clients until ``requests`` were sent or ``time_limit`` passed; per-request records."""
    lock = threading.Lock()
    sent = [0]
    records: list[tuple[int, float]] = []
    deadline = time.perf_counter() + time_limit

    def client(k: int) -> None:
        while True:
            with lock:
                if sent[0] >= requests or time.perf_counter() > deadline:
                    return
                seed = sent[0]
                sent[0] += 1
            status, _, seconds = post(f"{url}/v1/samples", {**body, "seed": seed})
            with lock:
                records.append((status, seconds))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ok = [s for status, s in records if status == 200]
    lat = np.array(ok) if ok else np.array([np.nan])
    return {"requests": len(records), "ok": len(ok), "errors": len(records) - len(ok), "seconds": wall,
            "requests_per_s": len(ok) / wall, "images_per_s": len(ok) * body["num_images"] / wall,
            "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p90_ms": 1e3 * float(np.percentile(lat, 90)),
            "p99_ms": 1e3 * float(np.percentile(lat, 99)),
            "error_statuses": sorted({s for s, _ in records if s != 200})}


def direct(model: Path, batch: int, steps: int, solver: str, threads: int | None, min_seconds: float = 5.0) -> float:
    """images/s of the runtime itself at this network batch size, no server: the ceiling a setting can reach."""
    from runtime.api import load
    from runtime.settings import SamplingSettings

    sampler = load(model, "onnxruntime", "cpu", "fp32", threads)
    sampler.sample(batch, SamplingSettings(2), batch_size=batch)  # warm-up
    settings = SamplingSettings(steps, solver=solver)  # type: ignore[arg-type]  # a choice of the CLI
    images, seconds = 0, 0.0
    while seconds < min_seconds:
        result = sampler.sample(batch, settings, seed=images, batch_size=batch)
        images, seconds = images + batch, seconds + result.seconds
    return images / seconds


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# ddim-serve load test ({env['cpu']}, {env['cores']} cores, float32 matmul peak "
             f"{env.get('matmul_peak_gflop_s', '?')} GFLOP/s, Ray {env['ray']})", "",
             "Closed-loop clients on the same machine as the service (they share its CPU), 1 replica. Latency: "
             "client wall time per request. Batches formed: the server's network batches by size (count).", "",
             "| max batch | clients | images/request | steps | requests | errors | requests/s | images/s | p50 ms "
             "| p90 ms | p99 ms | batches formed (size: count) | start to ready s | runtime alone at this batch, "
             "images/s |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        batches = ", ".join(f"{k}: {v}" for k, v in sorted(r["batches"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {r['max_batch']} | {r['clients']} | {r['num_images']} | {r['steps']} | {r['requests']} | "
                     f"{r['errors']} | {r['requests_per_s']:.2f} | {r['images_per_s']:.2f} | {r['p50_ms']:.0f} | "
                     f"{r['p90_ms']:.0f} | {r['p99_ms']:.0f} | {batches} | {r['ready_s']:.1f} | "
                     f"{r['direct_images_per_s']:.2f} |")
    if len(rows) > 1:
        base = min(rows, key=lambda r: r["max_batch"])
        for r in rows:
            if r is not base:
                gain = r["images_per_s"] / base["images_per_s"]
                lines += ["", f"Batching: --max-batch {r['max_batch']} gives {gain:.2f}x "
                              f"the images/s of --max-batch {base['max_batch']}; the runtime alone (no server, same "
                              f"machine) gains {r['direct_images_per_s'] / base['direct_images_per_s']:.2f}x from "
                              f"batch {base['max_batch']} to batch {r['max_batch']}: the most batching can give "
                              "where the network is the bottleneck."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, (ax_t, ax_l, ax_b) = plt.subplots(1, 3, figsize=(13, 4))
    labels = [f"max batch {r['max_batch']}" for r in rows]
    ax_t.bar(labels, [r["images_per_s"] for r in rows], color="tab:blue", label="served")
    ax_t.scatter(labels, [r["direct_images_per_s"] for r in rows], marker="_", s=3000, color="black", zorder=3,
                 label="runtime alone at that batch")
    ax_t.set(title="throughput", ylabel="images/s")
    ax_t.legend(fontsize=8, loc="lower right")
    x = np.arange(len(rows))
    for i, (key, name) in enumerate((("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"))):
        ax_l.bar(x + (i - 1) * 0.25, [r[key] for r in rows], width=0.25, label=name)
    ax_l.set(title="request latency", ylabel="ms", xticks=x, xticklabels=labels)
    ax_l.legend(fontsize=8)
    for r in rows:
        sizes = sorted((int(k), v) for k, v in r["batches"].items())
        ax_b.bar([s for s, _ in sizes], [s * v for s, v in sizes], alpha=0.6, label=f"max batch {r['max_batch']}")
    ax_b.set(title="images by the batch they ran in", xlabel="network batch size", ylabel="images")
    ax_b.legend(fontsize=8)
    for ax in (ax_t, ax_l, ax_b):
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)


@click.command()
@click.option("--model", type=click.Path(path_type=Path, exists=True), default=SHIPPED_MODEL, show_default=True)
@click.option("--max-batch", "max_batches", type=click.IntRange(min=1), multiple=True,
              help="Settings to compare (repeat) [default: 1 and 16].")
@click.option("--batch-wait-ms", type=click.FloatRange(min=0), default=10.0, show_default=True)
@click.option("--clients", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--requests", type=click.IntRange(min=1), default=200, show_default=True, help="Per setting.")
@click.option("--time-limit", type=click.FloatRange(min=1), default=300.0, show_default=True,
              help="Seconds per setting; clients stop sending after it.")
@click.option("--warmup", type=click.IntRange(min=0), default=8, show_default=True)
@click.option("--num-images", type=click.IntRange(min=1), default=1, show_default=True, help="Images per request.")
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True)
@click.option("--solver", type=click.Choice(["ddim", "dpmpp-2m"]), default="ddim", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="ddim-serve --threads.")
@click.option("--ready-timeout", type=click.FloatRange(min=1), default=300.0, show_default=True)
@click.option("--replica-cpus", type=click.FloatRange(min=0), default=None, help="ddim-serve --replica-cpus.")
@click.option("--autoscale", default=None, metavar="MIN:MAX",
              help="Instead: one ddim-serve --autoscale MIN:MAX under the step in load of --load.")
@click.option("--load", "load_text", default="2:60,16:90,2:120", show_default=True, metavar="CLIENTS:SECONDS,...",
              help="With --autoscale: closed-loop clients per phase, and for how long.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@friendly_errors
def main(model: Path, max_batches: tuple[int, ...], batch_wait_ms: float, clients: int, requests: int,
         time_limit: float, warmup: int, num_images: int, steps: int, solver: str, threads: int | None,
         ready_timeout: float, replica_cpus: float | None, autoscale: str | None, load_text: str, out: Path) -> None:
    """Start ddim-serve per --max-batch setting, load it, and write JSON, Markdown and a plot (or, with
    --autoscale, one autoscaling service under a step in load)."""
    import ray

    from runtime.common.hostinfo import physical_cores

    body = {"num_images": num_images, "steps": steps, "solver": solver, "format": "png"}
    extra = ("--backend", "onnxruntime", "--device", "cpu", "--precision", "fp32",
             "--max-images-per-request", str(max(num_images, 64)))
    extra += ("--threads", str(threads)) if threads else ()
    extra += ("--replica-cpus", f"{replica_cpus:g}") if replica_cpus is not None else ()
    if autoscale is not None:
        autoscaling_run(model, autoscale, load_text, (max_batches or (16,))[0], batch_wait_ms, warmup, body, extra,
                        ready_timeout, out)
        return
    rows = []
    for max_batch in sorted(set(max_batches or (1, 16))):
        click.echo(f"serve_load: ddim-serve {model} --max-batch {max_batch}", err=True)
        server = Server(model, max_batch, batch_wait_ms, extra, ready_timeout)
        try:
            click.echo(f"  ready at {server.url} in {server.ready_s:.1f} s; warm-up {warmup} requests", err=True)
            drive(server.url, min(clients, max(warmup, 1)), warmup, time_limit, body)
            before = batch_stats(server.url)
            result = drive(server.url, clients, requests, time_limit, body)
            after = batch_stats(server.url)
        finally:
            rc = server.stop()
        ceiling = direct(model, max_batch, steps, solver, threads)
        batches = {str(k): after[k] - before.get(k, 0) for k in sorted(after) if after[k] > before.get(k, 0)}
        shown = model.resolve().relative_to(ROOT) if model.resolve().is_relative_to(ROOT) else model
        row = {"model": str(shown), "max_batch": max_batch, "batch_wait_ms": batch_wait_ms, "clients": clients,
               "num_images": num_images, "steps": steps, "solver": solver, "ready_s": server.ready_s,
               "batches": batches, "shutdown_rc": rc, "direct_images_per_s": ceiling, **result}
        rows.append(row)
        click.echo(f"  {result['ok']} ok / {result['requests']} requests in {result['seconds']:.1f} s: "
                   f"{result['images_per_s']:.2f} images/s, p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} "
                   f"ms, {result['errors']} errors; batches {batches}; shutdown rc {rc}; runtime alone at batch "
                   f"{max_batch}: {ceiling:.2f} images/s", err=True)
    from benchmarks.latency import matmul_peak

    env = {"host": socket.gethostname(), "cpu": cpu_name(), "cores": physical_cores(),
           "python": platform.python_version(), "ray": ray.__version__,
           "matmul_peak_gflop_s": round(matmul_peak("cpu"), 1)}
    _, stem = write_report("serve-load", out, env, rows, ("model", "max_batch", "clients", "num_images", "steps",
                                                           "solver"), markdown, plot)
    click.echo(f"wrote {stem}.json, .md and .png")


def autoscaling_run(model: Path, autoscale: str, load_text: str, max_batch: int, batch_wait_ms: float, warmup: int,
                    body: dict, extra: tuple[str, ...], ready_timeout: float, out: Path) -> None:
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
    click.echo(f"serve_load: ddim-serve {model} --max-batch {max_batch} {' '.join(extra)}; load {load_text}", err=True)
    load_before = [round(x, 2) for x in os.getloadavg()]  # other work on the machine shows here
    server = Server(model, max_batch, batch_wait_ms, extra, ready_timeout)
    try:
        click.echo(f"  ready at {server.url} in {server.ready_s:.1f} s; warm-up {warmup} requests", err=True)
        drive(server.url, max(1, min(warmup, load[0][0])), warmup, 300, body)
        requests, samples, starts = sa.step_load(server.url, load, body)
    finally:
        rc = server.stop()
    summary = sa.summarize(requests, samples, starts, load, body["num_images"])
    row = {"model": str(shown), "autoscale": scaling.label, "load": load_text, "command": command,
           "max_batch": max_batch, "num_images": body["num_images"], "steps": body["steps"], "solver": body["solver"],
           "target_ongoing_requests": scaling.target_ongoing_requests, "upscale_delay_s": scaling.upscale_delay_s,
           "downscale_delay_s": scaling.downscale_delay_s, "ddim_serve_args": list(extra), "ready_s": server.ready_s,
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
