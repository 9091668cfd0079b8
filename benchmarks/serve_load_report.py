"""The report of ``benchmarks/serve_load.py``: the Markdown table and its comparisons (batch size against batch
size, step- against request-level batching per workload, medians over ``--repeat`` runs, against the target) and
the plot. Pure functions of the rows the script measured (tests/test_benchmarks.py feeds them synthetic rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import pyplot, save_figure


def mode(row: dict[str, Any]) -> str:
    """The row's batching; rows from before step-level batching existed were request-level."""
    return row.get("batching", "request")


def workload(row: dict[str, Any]) -> tuple[Any, ...]:
    """What the clients sent: rows compare only within one workload."""
    return row["clients"], row["num_images"], str(row["steps"]), row.get("solver", "ddim")


def median_of(rows: list[dict[str, Any]], key: str) -> float:
    return float(np.median([r[key] for r in rows]))


def lower_or_higher(fraction: float) -> str:
    return f"{100 * fraction:.0f}% lower" if fraction >= 0 else f"{-100 * fraction:.0f}% higher"


def comparison(step: list[dict[str, Any]], request: list[dict[str, Any]]) -> str:
    """Step- against request-level batching at one max batch and workload (medians over the runs of each), and
    whether the target is met: p50 latency at least 20% lower at equal or higher images/s, judged on the figures as
    shown (whole percent, ratio to 2 decimals)."""
    s50, r50 = median_of(step, "p50_ms"), median_of(request, "p50_ms")
    s_ips, r_ips = median_of(step, "images_per_s"), median_of(request, "images_per_s")
    lower, ratio = 1 - s50 / r50, s_ips / r_ips
    met = round(100 * lower) >= 20 and round(ratio, 2) >= 1.0
    direction = lower_or_higher(lower)
    runs = f", medians of {len(step)} and {len(request)} runs" if len(step) > 1 or len(request) > 1 else ""
    per_run = ""
    if len(step) == len(request) > 1:
        pairs = [f"{lower_or_higher(1 - a['p50_ms'] / b['p50_ms'])} at {a['images_per_s'] / b['images_per_s']:.2f}x"
                 for a, b in zip(step, request)]
        per_run = f" Run by run: {', '.join(pairs)}."
    alone = ""
    if all("alone_p50_ms" in r for r in step + request):
        a_lower = 1 - median_of(step, "alone_p50_ms") / median_of(request, "alone_p50_ms")
        a_ratio = median_of(step, "alone_images_per_s") / median_of(request, "alone_images_per_s")
        alone = (f" On the replica alone (no HTTP, no Ray competing for the cores): p50 {lower_or_higher(a_lower)} "
                 f"({median_of(step, 'alone_p50_ms'):.0f} ms vs {median_of(request, 'alone_p50_ms'):.0f} ms) at "
                 f"{a_ratio:.2f}x the images/s.")
    steps = step[0]["steps"]
    solver = step[0].get("solver", "ddim")
    return (f"At --max-batch {step[0]['max_batch']}, steps {steps} ({solver}), step-level batching: p50 latency "
            f"{direction} than request-level ({s50:.0f} ms vs {r50:.0f} ms{runs}) at {ratio:.2f}x its "
            f"images/s ({s_ips:.2f} vs {r_ips:.2f}); target (p50 at least 20% lower at equal or higher images/s) "
            f"{'met' if met else 'not met'}.{per_run}{alone}")


def alone_cell(r: dict[str, Any]) -> str:
    if "alone_p50_ms" not in r:
        return "-"
    return f"{r['alone_images_per_s']:.2f}, {r['alone_p50_ms']:.0f}, {r['alone_ttfs_p50_ms']:.0f}"


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    def ms(r: dict[str, Any], key: str) -> str:
        return f"{r[key]:.0f}" if key in r else "-"

    lines = [f"# ddim-serve load test ({env['cpu']}, {env['cores']} cores, float32 matmul peak "
             f"{env.get('matmul_peak_gflop_s', '?')} GFLOP/s, Ray {env['ray']})", "",
             "Closed-loop clients on the same machine as the service (they share its CPU), 1 replica. Latency: "
             "client wall time per request. TTFS: time to first step, from the replica admitting a request to its "
             "first network step (X-Queue-Seconds). Batches formed: the server's network batches by size (count); "
             "step-level batching counts every network call, request-level a batch that runs all its steps. Steps "
             "a/b/c: mixed requests, request n taking item n modulo the list.", "",
             "| max batch | batching | run | clients | images/request | steps | requests | errors | requests/s "
             "| images/s | p50 ms | p90 ms | p99 ms | TTFS p50 ms | TTFS p90 ms | batches formed (size: count) "
             "| start to ready s | runtime alone at this batch, images/s "
             "| replica alone: images/s, p50 ms, TTFS p50 ms |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in rows:
        batches = ", ".join(f"{k}: {v}" for k, v in sorted(r["batches"].items(), key=lambda kv: int(kv[0])))
        lines.append(f"| {r['max_batch']} | {mode(r)} | {r.get('run', 1)} | {r['clients']} | {r['num_images']} | "
                     f"{r['steps']} | {r['requests']} | {r['errors']} | {r['requests_per_s']:.2f} | "
                     f"{r['images_per_s']:.2f} | {r['p50_ms']:.0f} | {r['p90_ms']:.0f} | {r['p99_ms']:.0f} | "
                     f"{ms(r, 'ttfs_p50_ms')} | {ms(r, 'ttfs_p90_ms')} | {batches} | {r['ready_s']:.1f} | "
                     f"{r['direct_images_per_s']:.2f} | {alone_cell(r)} |")
    for w in dict.fromkeys(workload(r) for r in rows):
        group = [r for r in rows if workload(r) == w]
        base = min(group, key=lambda r: (r["max_batch"], mode(r) != "request"))
        for r in group:
            if r["max_batch"] != base["max_batch"] and mode(r) == mode(base) and r.get("run", 1) == base.get("run", 1):
                gain = r["images_per_s"] / base["images_per_s"]
                lines += ["", f"Batching: --max-batch {r['max_batch']} (steps {r['steps']}) gives {gain:.2f}x the "
                              f"images/s of --max-batch {base['max_batch']} ({mode(r)}-level); the runtime alone (no "
                              f"server, same machine) gains "
                              f"{r['direct_images_per_s'] / base['direct_images_per_s']:.2f}x "
                              f"from batch {base['max_batch']} to batch {r['max_batch']}: the most batching can give "
                              "where the network is the bottleneck."]
        for max_batch in sorted({r["max_batch"] for r in group}):
            by_mode = {m: [r for r in group if r["max_batch"] == max_batch and mode(r) == m]
                       for m in ("request", "step")}
            if by_mode["request"] and by_mode["step"]:
                lines += ["", comparison(by_mode["step"], by_mode["request"])]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """One bar per setting and workload (medians over its runs), with the runtime alone as a mark."""
    plt = pyplot()
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((*workload(r), r["max_batch"], mode(r)), []).append(r)
    labels = [f"batch {g[0]['max_batch']}, {mode(g[0])}\n"
              + ("mixed steps" if "/" in str(g[0]["steps"]) else f"{g[0]['steps']} steps")
              + (f" ({len(g)} runs)" if len(g) > 1 else "") for g in groups.values()]
    med = [{k: median_of(g, k) for k in ("images_per_s", "direct_images_per_s", "p50_ms", "p90_ms", "p99_ms")}
           | {"ttfs_p50_ms": median_of(g, "ttfs_p50_ms") if all("ttfs_p50_ms" in r for r in g) else np.nan}
           for g in groups.values()]
    fig, (ax_t, ax_l, ax_b) = plt.subplots(1, 3, figsize=(16, 5))
    x = np.arange(len(labels))
    ax_t.bar(x, [m["images_per_s"] for m in med], color="tab:blue", label="served (median)")
    ax_t.scatter(x, [m["direct_images_per_s"] for m in med], marker="_", s=2000, color="black", zorder=3,
                 label="runtime alone at that batch")
    ax_t.set(title="throughput", ylabel="images/s", xticks=x, xticklabels=labels)
    ax_t.legend(fontsize=8, loc="lower right")
    keys = (("p50_ms", "p50"), ("p90_ms", "p90"), ("p99_ms", "p99"), ("ttfs_p50_ms", "time to first step p50"))
    for i, (key, name) in enumerate(keys):
        ax_l.bar(x + (i - 1.5) * 0.2, [m[key] for m in med], width=0.2, label=name)
    ax_l.set(title="request latency (medians over runs)", ylabel="ms", xticks=x, xticklabels=labels)
    ax_l.legend(fontsize=8)
    for ax in (ax_t, ax_l):
        ax.tick_params(axis="x", labelsize=7)
    for g, label in zip(groups.values(), labels):
        sizes: dict[int, int] = {}
        for r in g:
            for k, v in r["batches"].items():
                sizes[int(k)] = sizes.get(int(k), 0) + v
        total = sum(s * v for s, v in sizes.items()) or 1
        share = [sum(s * v for s, v in sizes.items() if s <= b) / total for b in range(1, max(sizes) + 1)]
        ax_b.step(range(1, len(share) + 1), share, where="post", label=label.replace("\n", ", "))
    ax_b.set(title="images in network calls of at most this size", xlabel="network batch size",
             ylabel="cumulative share (step-level: image-steps)")
    ax_b.legend(fontsize=7)
    for ax in (ax_t, ax_l, ax_b):
        ax.grid(alpha=0.3, axis="y")
    save_figure(fig, path)
