"""Hostile clients against the real ``ddim-serve`` (a local Ray instance, loopback only): what load it holds,
which faults it survives, which inputs it refuses, and that nothing is lost.

    python benchmarks/serve_hostile.py                       # shipped model; 300 stalled clients, 64 x 1000 steps
    python benchmarks/serve_hostile.py --stalled 100 --large-steps 200 --timeout 3   # quicker

Scenarios, each timed by the client:
  1. alone: a normal request (1 image, 20 steps) on the idle service (the baseline);
  2. stalled: --stalled clients send headers (Content-Length: 100) and no body, --stalled/6 send half a head, one
     trickles its body a byte at a time; normal requests are timed meanwhile, then the 408s are counted;
  3. large: one in-limit large request (--large-images x --large-steps, the defaults are the service's limits); small
     requests (1 image, 3 steps) are timed behind it; a second large one meanwhile must get 503 + Retry-After;
     the large one must still answer 200 with all its images;
  4. inputs: hostile bodies (wrong types, bad JSON, bad UTF-8, deep nesting, huge numbers, unknown fields, over
     limits) must each get their documented status and a one-line JSON error;
  5. shutdown: SIGTERM during a request: the client gets its images or a JSON 503, the process exits 0 and no Ray
     process is left.
Writes benchmarks/results/serve-hostile-DATE-HOST.{json,md,png}.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, cpu_name, pyplot, save_figure, write_report  # noqa: E402
from benchmarks.serve_load import Server  # noqa: E402
from runtime.common.clitools import friendly_errors  # noqa: E402
from runtime.common.shipped import SHIPPED_MODEL  # noqa: E402

HEAD = b"POST /v1/samples HTTP/1.1\r\nHost: b\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"

# (body, expected status) - each must answer that status with {"error": one line}
HOSTILE: list[tuple[bytes, int]] = [
    (b'{"num_images": true}', 422), (b'{"num_images": "2"}', 422), (b'{"num_images": "1_0"}', 422),
    (b'{"num_images": 2.0}', 422), (b'{"num_images": 0}', 422), (b'{"num_images": -1}', 422),
    (b'{"num_images": 65}', 413), (b'{"steps": 1001}', 413), (b'{"steps": 0}', 422), (b'{"steps": null}', 422),
    (b'{"seed": -1}', 422), (b'{"seed": ' + b"9" * 5000 + b"}", 422), (b'{"seed": 1e400}', 422),
    (b'{"eta": NaN}', 422), (b'{"eta": Infinity}', 422), (b'{"eta": 2}', 422), (b'{"eta": "0"}', 422),
    (b'{"solver": "euler"}', 422), (b'{"solver": "dpmpp-2m", "eta": 0.5}', 422), (b'{"format": "gif"}', 422),
    (b'{"path": "/etc/passwd"}', 422), (b"{not json", 422), (b"[1, 2]", 422), (b'"text"', 422), (b"null", 422),
    (b'{"solver": "\xff\xfe"}', 422), (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", 422),
    (b'{"num_images": 1, "pad": "' + b"x" * 70_000 + b'"}', 413), (b"\x00" * 100, 422),
]


def connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def status_of(s: socket.socket, timeout: float) -> int:
    s.settimeout(timeout)
    data = b""
    try:
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        pass
    return int(data.split()[1]) if data.startswith(b"HTTP/") else 0


def post(url: str, body: bytes | dict, timeout: float = 900) -> tuple[int, dict[str, str], bytes, float]:
    import urllib.error
    import urllib.request

    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"{url}/v1/samples", data=data, method="POST",
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, dict(resp.headers), resp.read(), time.perf_counter() - start
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read(), time.perf_counter() - start
    except OSError as exc:
        return 0, {}, str(exc).encode(), time.perf_counter() - start


def one_line_json(body: bytes) -> bool:
    try:
        error = json.loads(body)["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return isinstance(error, str) and "\n" not in error and bool(error)


NORMAL = {"num_images": 1, "steps": 20, "format": "npz"}
SMALL = {"num_images": 1, "steps": 3, "format": "npz"}


class Stallers:
    """``count`` clients that send their headers (Content-Length: 100) and no body, ``halves`` that send half a
    head, and one that trickles its body a byte every ``drip_s``; ``close()`` hangs them all up."""

    def __init__(self, url: str, count: int, halves: int, drip_s: float = 0.5) -> None:
        self.stalled = [connect(url) for _ in range(count)]
        for s in self.stalled:
            s.sendall(HEAD)
        self.halves = [connect(url) for _ in range(halves)]
        for s in self.halves:
            s.sendall(b"POST /v1/samples HTTP/1.1\r\nHost:")
        self.trickle = connect(url)
        self.trickle.sendall(HEAD)
        self._stop = threading.Event()
        threading.Thread(target=self._drip, args=(drip_s,), daemon=True).start()

    def _drip(self, every: float) -> None:
        while not self._stop.is_set():
            try:
                self.trickle.sendall(b" ")
            except OSError:
                return
            time.sleep(every)

    def close(self) -> None:
        self._stop.set()
        for s in self.stalled + self.halves + [self.trickle]:
            s.close()


def stalled(url: str, count: int, body_timeout: float) -> dict[str, Any]:
    clients = Stallers(url, count, max(1, count // 6))
    socks, halves, trickle = clients.stalled, clients.halves, clients.trickle
    opened = time.perf_counter()
    latencies = []
    while time.perf_counter() - opened < body_timeout * 0.8 or not latencies:
        status, _, _, seconds = post(url, NORMAL)
        latencies.append(seconds if status == 200 else float("inf"))
    codes = [status_of(s, body_timeout + 10) for s in socks]
    head_codes = [status_of(s, body_timeout + 10) for s in halves]
    trickled = status_of(trickle, body_timeout + 10)
    cut_after = time.perf_counter() - opened
    clients.close()
    after = post(url, NORMAL)
    return {"stalled": count, "half_heads": len(halves), "normal_requests": len(latencies),
            "normal_max_s": max(latencies), "normal_median_s": sorted(latencies)[len(latencies) // 2],
            "stalled_408": codes.count(408), "half_heads_408": head_codes.count(408), "trickle": trickled,
            "all_cut_within_s": cut_after, "served_after": after[0]}


def large_and_small(url: str, images: int, steps: int, smalls: int) -> dict[str, Any]:
    large: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: large.update(r=post(url, {"num_images": images, "steps": steps,
                                                                        "format": "npz"})))
    t0 = time.perf_counter()
    worker.start()
    time.sleep(2.0)
    waits = []
    for _ in range(smalls):
        status, _, _, seconds = post(url, SMALL)
        waits.append(seconds if status == 200 else float("inf"))
    status, headers, body, _ = post(url, {"num_images": images, "steps": steps})
    second = {"status": status, "retry_after": headers.get("Retry-After") or headers.get("retry-after"),
              "json": one_line_json(body)}
    worker.join()
    status, _, body, seconds = large["r"]
    import io

    import numpy as np

    n = np.load(io.BytesIO(body))["images"].shape[0] if status == 200 else 0
    return {"large": f"{images} x {steps}", "large_status": status, "large_images": n, "large_s": seconds,
            "small_max_s": max(waits), "small_median_s": sorted(waits)[len(waits) // 2], "smalls": len(waits),
            "second_large": second, "total_s": time.perf_counter() - t0}


def inputs(url: str) -> dict[str, Any]:
    wrong = []
    for body, want in HOSTILE:
        status, _, text, _ = post(url, body, timeout=60)
        if status != want or not one_line_json(text):
            wrong.append({"body": body[:60].decode("latin-1"), "want": want, "got": status, "text": text[:200].decode(
                "utf-8", "replace")})
    return {"tried": len(HOSTILE), "wrong": wrong}


def shutdown(server: Server) -> dict[str, Any]:
    got: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: got.update(r=post(server.url, {"num_images": 4, "steps": 200})))
    worker.start()
    time.sleep(1.0)
    server.proc.send_signal(signal.SIGTERM)
    t0 = time.perf_counter()
    rc = server.proc.wait(180)
    worker.join(60)
    status, _, body, _ = got.get("r", (0, {}, b"", 0.0))
    return {"exit_code": rc, "exit_s": time.perf_counter() - t0, "client_status": status,
            "client_json_or_images": status == 200 or one_line_json(body)}


def ray_processes() -> set[int]:
    found = set()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            cmd = cmdline.read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"ray::") or b"gcs_server" in cmd or b"/raylet\0" in cmd:
            found.add(int(cmdline.parent.name))
    return found


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    r = rows[-1]
    s, big, inp, down = r["stalled"], r["large"], r["inputs"], r["shutdown"]
    lines = [f"# ddim-serve under hostile clients ({env['date']})", "",
             f"{env['cpu']}, {env['cores']} cores; model: {env['model']}; start to ready {r['ready_s']:.1f} s. "
             f"Body/header timeout {r['timeout_s']:g} s. Command: `{env['command']}`.", "",
             "| scenario | measured | target | |", "|---|---|---|---|",
             f"| normal request (1 x 20 steps), idle | {r['alone_s']:.2f} s | | |",
             f"| normal requests while {s['stalled']} clients stall after their headers, {s['half_heads']} send "
             f"half a head, 1 trickles | max {s['normal_max_s']:.2f} s of {s['normal_requests']} | < 5 s | "
             f"{'ok' if s['normal_max_s'] < 5 else 'MISSED'} |",
             f"| stalled clients cut with 408 | {s['stalled_408']}/{s['stalled']} + {s['half_heads_408']}/"
             f"{s['half_heads']} heads + trickle {s['trickle']}, all within {s['all_cut_within_s']:.1f} s | all | "
             f"{'ok' if s['stalled_408'] == s['stalled'] and s['half_heads_408'] == s['half_heads'] else 'MISSED'} |",
             f"| small request (1 x 3 steps) behind one {big['large']} request | max {big['small_max_s']:.2f} s of "
             f"{big['smalls']} (median {big['small_median_s']:.2f}) | < 10 s | "
             f"{'ok' if big['small_max_s'] < 10 else 'MISSED'} |",
             f"| a second {big['large']} request meanwhile | {big['second_large']['status']}, Retry-After "
             f"{big['second_large']['retry_after']} | 503 + Retry-After | "
             f"{'ok' if big['second_large']['status'] == 503 and big['second_large']['retry_after'] else 'MISSED'} |",
             f"| the large request itself | {big['large_status']}, {big['large_images']} images in "
             f"{big['large_s']:.0f} s | 200, all | {'ok' if big['large_status'] == 200 else 'MISSED'} |",
             f"| hostile bodies | {inp['tried'] - len(inp['wrong'])}/{inp['tried']} with the documented status and "
             f"a one-line JSON error | all | {'ok' if not inp['wrong'] else 'MISSED'} |",
             f"| SIGTERM during a request | client {down['client_status']}, exit {down['exit_code']} in "
             f"{down['exit_s']:.1f} s, Ray processes left {r['ray_left']} | JSON or images, 0, none | "
             f"{'ok' if down['client_json_or_images'] and down['exit_code'] == 0 and not r['ray_left'] else 'MISSED'} |",
             ""]
    if inp["wrong"]:
        lines += ["Inputs answered otherwise:", ""] + [f"- `{w['body']}`: want {w['want']}, got {w['got']} "
                                                        f"{w['text']}" for w in inp["wrong"]] + [""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    r = rows[-1]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    names = ["normal, idle", f"normal, {r['stalled']['stalled']} stalled", "small, behind large"]
    values = [r["alone_s"], r["stalled"]["normal_max_s"], r["large"]["small_max_s"]]
    ax.barh(names, values, color=["#888", "#4477aa", "#cc6677"])
    for target, label in ((5, "5 s target"), (10, "10 s target")):
        ax.axvline(target, ls="--", lw=1, color="k")
        ax.text(target, 2.4, label, fontsize=8)
    ax.set_xlabel("worst client latency (s)")
    ax.set_title("ddim-serve under hostile clients")
    save_figure(fig, path)


@click.command()
@click.option("--model", type=click.Path(path_type=Path, exists=True), default=SHIPPED_MODEL, show_default=True)
@click.option("--stalled", "stalled_count", type=click.IntRange(1, 5000), default=300, show_default=True)
@click.option("--timeout", "timeout_s", type=click.FloatRange(1, 60), default=10.0, show_default=True,
              help="The service's --header-timeout and --body-timeout.")
@click.option("--large-images", type=click.IntRange(1, 64), default=64, show_default=True)
@click.option("--large-steps", type=click.IntRange(1, 1000), default=1000, show_default=True)
@click.option("--smalls", type=click.IntRange(1, 100), default=10, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@friendly_errors
def main(model: Path, stalled_count: int, timeout_s: float, large_images: int, large_steps: int, smalls: int,
         out: Path) -> None:
    """Drive a real ddim-serve with hostile clients and report what it held."""
    before = ray_processes()
    server = Server(model, 16, 10.0, ("--header-timeout", str(timeout_s), "--body-timeout", str(timeout_s)), 300)
    row: dict[str, Any] = {"ready_s": server.ready_s, "timeout_s": timeout_s}
    try:
        post(server.url, NORMAL)  # warm
        row["alone_s"] = min(post(server.url, NORMAL)[3] for _ in range(3))
        click.echo(f"alone {row['alone_s']:.2f} s; stalling {stalled_count} clients", err=True)
        row["stalled"] = stalled(server.url, stalled_count, timeout_s)
        click.echo(f"stalled: {row['stalled']}", err=True)
        row["large"] = large_and_small(server.url, large_images, large_steps, smalls)
        click.echo(f"large: {row['large']}", err=True)
        row["inputs"] = inputs(server.url)
        row["shutdown"] = shutdown(server)
    finally:
        if server.proc.poll() is None:
            server.stop()
    time.sleep(3)
    row["ray_left"] = len(ray_processes() - before)
    env = {"date": time.strftime("%Y-%m-%d"), "cpu": cpu_name(), "cores": os.cpu_count(), "model": str(model),
           "python": platform.python_version(),
           "command": f"python benchmarks/serve_hostile.py --stalled {stalled_count} --large-images {large_images} "
                      f"--large-steps {large_steps}"}
    write_report("serve-hostile", out, env, [row], ("timeout_s",), markdown, plot)


if __name__ == "__main__":
    main()
