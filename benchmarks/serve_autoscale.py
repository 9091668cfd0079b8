"""The autoscaling run of ``benchmarks/serve_load.py --autoscale MIN:MAX``: ``ddim-serve --autoscale MIN:MAX`` under a
step in load (``--load 2:60,16:90,2:120``: 2 closed-loop clients for 60 s, then 16 for 90 s, then 2 for 120 s).

Every request's outcome is recorded (start, end, status, the client count when it was sent), and the replicas by
state (running, starting, stopping) from the service's ``GET /metrics`` (``ddim_serve_replicas``) once a second.
The report says per phase what was served and how many replicas ran, when the running count changed, and whether
any request failed while replicas were added or removed: a request counts as sent during a change when it was in
flight while a replica was starting or stopping, or within one poll of the running count changing.
Written to benchmarks/results/serve-autoscale-DATE-HOST.{json,md,png}.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.common import pyplot, save_figure

POLL_S = 1.0
STATES = ("running", "starting", "stopping")


def parse_load(text: str) -> list[tuple[int, float]]:
    """``"2:60,16:90,2:120"`` -> [(2, 60.0), (16, 90.0), (2, 120.0)]: clients and seconds per phase."""
    phases = []
    for part in text.split(","):
        clients, sep, seconds = part.strip().partition(":")
        try:
            phase = (int(clients), float(seconds))
        except ValueError:
            phase = (0, 0.0)
        if not sep or phase[0] < 1 or not 0 < phase[1] < 86_400:
            raise ValueError(f"--load {text}: expected CLIENTS:SECONDS,... with CLIENTS >= 1 and SECONDS > 0 "
                             "(e.g. 2:60,16:90,2:120)")
        phases.append(phase)
    return phases


def replica_states(url: str, timeout: float = 5.0) -> dict[str, int]:
    """The service's replicas by state, from its ``GET /metrics`` ({} when it does not answer in time)."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(f"{url}/metrics", timeout=timeout) as resp:
            text = resp.read().decode()
    except OSError:
        return {}
    return {s.labels["state"]: int(s.value) for f in text_string_to_metric_families(text)
            if f.name == "ddim_serve_replicas" for s in f.samples}


def post(url: str, body: dict, timeout: float = 300) -> tuple[int, str, float]:
    """(status, the error's message or "", seconds) of one request; status 0 when no answer came (connection)."""
    import json
    import urllib.error

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            resp.read()
            return resp.status, "", time.perf_counter() - start
    except urllib.error.HTTPError as exc:
        text = exc.read().decode("utf-8", "replace")
        try:
            text = json.loads(text)["error"]
        except (ValueError, KeyError, TypeError):
            pass
        return exc.code, text[:300], time.perf_counter() - start
    except OSError as exc:
        return 0, f"no answer: {exc}"[:300], time.perf_counter() - start


def step_load(url: str, load: list[tuple[int, float]], body: dict,
              send: Callable[[str, dict], tuple[int, str, float]] = post,
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[float]]:
    """Closed-loop clients, their number stepped per phase (a client beyond the current count finishes its request
    and waits); the replicas polled every second meanwhile, until the last request is answered. Returns (requests,
    replica samples, phase starts and the end), times in seconds from the start."""
    lock = threading.Lock()
    active, in_flight = [0], [0]
    done = threading.Event()
    requests: list[dict[str, Any]] = []
    samples: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    next_seed = [0]

    def client(k: int) -> None:
        while not done.is_set():
            with lock:
                go = k < active[0]
                if go:
                    seed, clients = next_seed[0], active[0]
                    next_seed[0] += 1
                    in_flight[0] += 1
            if not go:
                time.sleep(0.05)
                continue
            start = time.perf_counter() - t0
            status, error, seconds = send(f"{url}/v1/samples", {**body, "seed": seed})
            record = {"start": round(start, 3), "end": round(start + seconds, 3), "status": status,
                      "clients": clients}
            if status != 200:
                record["error"] = error
            with lock:
                requests.append(record)
                in_flight[0] -= 1

    def poll() -> None:
        while not done.is_set():
            at = time.perf_counter() - t0
            samples.append({"t": round(at, 3), "clients": active[0], **replica_states(url)})
            done.wait(max(0.0, POLL_S - (time.perf_counter() - t0 - at)))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(max(n for n, _ in load))]
    poller = threading.Thread(target=poll, daemon=True)
    for t in threads:
        t.start()
    starts: list[float] = []
    for clients, seconds in load:
        with lock:
            starts.append(round(time.perf_counter() - t0, 3))
            active[0] = clients
        if not poller.is_alive():
            poller.start()
        time.sleep(seconds)
    with lock:
        starts.append(round(time.perf_counter() - t0, 3))
        active[0] = 0  # clients finish what they sent; nothing new
    while in_flight[0]:
        time.sleep(0.1)
    done.set()
    for t in [*threads, poller]:
        t.join(10)
    return sorted(requests, key=lambda r: r["start"]), samples, starts


def changes(samples: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[tuple[float, float]]]:
    """(the times the running count changed, with from/to; the windows in which replicas were being added or
    removed: a replica starting or stopping, or the poll before and after a change of the running count)."""
    events, windows = [], []
    previous: dict[str, Any] | None = None
    for s in samples:
        if "running" not in s:
            continue
        if previous is not None and s["running"] != previous["running"]:
            events.append({"t": s["t"], "from": previous["running"], "to": s["running"]})
            windows.append((previous["t"], s["t"]))
        if s.get("starting", 0) or s.get("stopping", 0):
            windows.append((s["t"] - POLL_S, s["t"] + POLL_S))
        previous = s
    merged: list[tuple[float, float]] = []
    for a, b in sorted(windows):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return events, merged


def segments(requests: list[dict[str, Any]], samples: list[dict[str, Any]], starts: list[float],
             load: list[tuple[int, float]], num_images: int) -> list[dict[str, Any]]:
    """Each phase cut where the running count changed: what the service answered with that many replicas under
    that many clients (images/s answered in the segment; latency of the requests sent in it)."""
    out = []
    for i, (clients, _) in enumerate(load):
        a, b = starts[i], starts[i + 1]
        cuts = [(s["t"], s["running"]) for s in samples if a <= s["t"] < b and "running" in s]
        pieces: list[tuple[float, float, int]] = []
        for t, running in cuts:
            if pieces and pieces[-1][2] == running:
                continue
            if pieces:
                pieces[-1] = (pieces[-1][0], t, pieces[-1][2])
            pieces.append((t if pieces else a, b, running))
        for lo, hi, running in pieces:
            if hi - lo < 1.0:
                continue
            answered = sum(1 for r in requests if lo <= r["end"] < hi and r["status"] == 200)
            lat = [r["end"] - r["start"] for r in requests if lo <= r["start"] < hi and r["status"] == 200]
            out.append({"phase": i + 1, "clients": clients, "replicas": running, "from_s": round(lo, 1),
                        "to_s": round(hi, 1), "images_per_s": answered * num_images / (hi - lo),
                        "p50_ms": 1e3 * float(np.percentile(lat, 50)) if lat else float("nan")})
    return out


def summarize(requests: list[dict[str, Any]], samples: list[dict[str, Any]], starts: list[float],
              load: list[tuple[int, float]], num_images: int) -> dict[str, Any]:
    """Per phase (requests sent in it: served, failed, latency; images/s answered in it; replicas running), the
    running count's changes, and the requests in flight while replicas were added or removed."""
    phases = []
    for i, (clients, _) in enumerate(load):
        a, b = starts[i], starts[i + 1]
        sent = [r for r in requests if a <= r["start"] < b]
        ok = [r for r in sent if r["status"] == 200]
        answered = sum(1 for r in requests if a <= r["end"] < b and r["status"] == 200)
        lat = np.array([r["end"] - r["start"] for r in ok]) if ok else np.array([np.nan])
        running = [s["running"] for s in samples if a <= s["t"] < b and "running" in s]
        phases.append({"clients": clients, "seconds": round(b - a, 1), "requests": len(sent), "ok": len(ok),
                       "errors": len(sent) - len(ok), "images_per_s": answered * num_images / (b - a),
                       "p50_ms": 1e3 * float(np.percentile(lat, 50)), "p99_ms": 1e3 * float(np.percentile(lat, 99)),
                       "replicas_min": min(running, default=0), "replicas_max": max(running, default=0)})
    events, windows = changes(samples)
    during = [r for r in requests if any(r["start"] <= b and r["end"] >= a for a, b in windows)]
    failed = [r for r in during if r["status"] != 200]
    statuses = sorted({r["status"] for r in failed})
    all_failed = [r for r in requests if r["status"] != 200]
    if not windows:
        verdict = "The replica count never changed: nothing was added or removed under this load."
    elif not failed:
        verdict = (f"No request failed while replicas were added or removed: {len(during)} requests were in flight "
                   f"during the {len(windows)} window(s) of change, all answered 200.")
    else:
        verdict = (f"{len(failed)} of the {len(during)} requests in flight while replicas were added or removed "
                   f"failed (statuses {statuses}; first: {failed[0].get('error') or 'no message'}).")
    return {"phases": phases, "segments": segments(requests, samples, starts, load, num_images), "events": events,
            "windows": [list(w) for w in windows],
            "requests_during_changes": len(during), "failed_during_changes": len(failed),
            "failed_statuses": statuses, "requests_total": len(requests), "errors_total": len(all_failed),
            "verdict": verdict}


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# ddim-serve autoscaling under a step in load ({env['cpu']}, {env['cores']} cores, Ray {env['ray']})",
             ""]
    for r in rows:
        lines += [f"`{r['command']}`", "",
                  f"ddim-serve --autoscale {r['autoscale']} (target {r['target_ongoing_requests']:g} requests in "
                  f"flight per replica, up after {r['upscale_delay_s']:g} s, down after {r['downscale_delay_s']:g} "
                  f"s), --max-batch {r['max_batch']}{' --batching ' + r['batching'] if 'batching' in r else ''}, "
                  f"{r['num_images']} image(s) x {r['steps']} steps per request; "
                  f"start to ready {r['ready_s']:.1f} s; shutdown rc {r['shutdown_rc']}; load average (1, 5, 15 min) "
                  f"{r.get('loadavg_before', '?')} before, {r.get('loadavg_after', '?')} after.", "",
                  "| phase | clients | seconds | requests sent | errors | images/s answered | p50 ms | p99 ms | "
                  "replicas running |", "|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for i, p in enumerate(r["phases"], 1):
            span = str(p["replicas_min"]) if p["replicas_min"] == p["replicas_max"] else \
                f"{p['replicas_min']}-{p['replicas_max']}"
            lines.append(f"| {i} | {p['clients']} | {p['seconds']:.0f} | {p['requests']} | {p['errors']} | "
                         f"{p['images_per_s']:.2f} | {p['p50_ms']:.0f} | {p['p99_ms']:.0f} | {span} |")
        lines += ["", "Each phase cut where the running count changed (images/s answered in the segment, p50 of the "
                      "requests sent in it):", "",
                  "| phase | clients | replicas running | from s | to s | images/s | p50 ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {g['phase']} | {g['clients']} | {g['replicas']} | {g['from_s']:.0f} | {g['to_s']:.0f} | "
                  f"{g['images_per_s']:.2f} | {g['p50_ms']:.0f} |" for g in r.get("segments", [])]
        moves = ", ".join(f"{e['from']} -> {e['to']} at {e['t']:.0f} s" for e in r["events"]) or "none"
        lines += ["", f"Running replicas changed: {moves} (phases start at "
                      f"{', '.join(f'{t:.0f}' for t in r['phase_starts'][:-1])} s).", "",
                  f"**{r['verdict']}** Requests in all: {r['requests_total']}, errors in all: {r['errors_total']}.",
                  "", f"ddim-serve's stderr: {len(r.get('server_log', []))} lines, "
                      f"{sum('Traceback' in line for line in r.get('server_log', []))} tracebacks; its autoscaling "
                      f"lines: {'; '.join(x for x in r.get('server_log', []) if 'autoscaling:' in x) or 'none'}.", ""]
    return "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(2 * len(rows), 1, figsize=(11, 6 * len(rows)), sharex=False, squeeze=False)
    for k, r in enumerate(rows):
        ax, ax_l = axes[2 * k][0], axes[2 * k + 1][0]
        t = [s["t"] for s in r["replicas"] if "running" in s]
        for state, color in (("running", "tab:blue"), ("starting", "tab:green"), ("stopping", "tab:red")):
            ax.step(t, [s.get(state, 0) for s in r["replicas"] if "running" in s], where="post", color=color,
                    label=f"replicas {state}")
        ax.set(title=f"ddim-serve --autoscale {r['autoscale']}", ylabel="replicas", xlabel="s")
        ax.set_ylim(-0.1, max(max((s.get("running", 0) for s in r["replicas"]), default=1), 1) + 0.5)
        twin = ax.twinx()
        twin.step([s["t"] for s in r["replicas"]], [s["clients"] for s in r["replicas"]], where="post",
                  color="gray", linestyle="--", label="clients")
        twin.set_ylabel("clients")
        for a, b in r["windows"]:
            ax.axvspan(a, b, color="orange", alpha=0.15)
        ax.legend(loc="upper left", fontsize=8)
        twin.legend(loc="upper right", fontsize=8)
        ok = [q for q in r["requests"] if q["status"] == 200]
        bad = [q for q in r["requests"] if q["status"] != 200]
        ax_l.scatter([q["start"] for q in ok], [q["end"] - q["start"] for q in ok], s=4, label="answered 200")
        if bad:
            ax_l.scatter([q["start"] for q in bad], [q["end"] - q["start"] for q in bad], s=16, marker="x",
                         color="red", label="failed")
        for a, b in r["windows"]:
            ax_l.axvspan(a, b, color="orange", alpha=0.15)
        ax_l.set(title="each request's latency by the time it was sent (orange: replicas being added or removed)",
                 xlabel="s", ylabel="latency s")
        ax_l.legend(fontsize=8)
        for a in (ax, ax_l):
            a.grid(alpha=0.3)
    save_figure(fig, path)
