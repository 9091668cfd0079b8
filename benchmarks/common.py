"""What the benchmark scripts share: the machine's description and the report files."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any, Callable

from runtime.common.hostinfo import cpu_name  # noqa: F401 (the scripts take it from here)

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def report_stem(kind: str) -> str:
    """``KIND-DATE-HOST``: one report per kind, day and machine."""
    return f"{kind}-{time.strftime('%Y-%m-%d')}-{socket.gethostname()}"


def write_json(path: Path, environment: dict[str, Any], rows: list[dict[str, Any]], key: tuple[str, ...],
               defaults: dict[str, Any] | None = None) -> list[dict]:
    """Write rows, keeping the same day's earlier rows for other ``key`` values; returns all rows. ``defaults``
    fills fields that earlier rows lack (a key field added since they were written)."""
    if path.is_file():
        fresh = {tuple(r[k] for k in key) for r in rows}
        earlier = [{**(defaults or {}), **r} for r in json.loads(path.read_text()).get("results", [])]
        old = [r for r in earlier if tuple(r[k] for k in key) not in fresh]
        rows = old + rows
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment, "results": rows}, indent=2) + "\n")
    return rows


def write_report(kind: str, out: Path, environment: dict[str, Any], rows: list[dict[str, Any]],
                 key: tuple[str, ...], markdown: Callable[[dict[str, Any], list[dict]], str],
                 plot: Callable[[list[dict], Path], None],
                 defaults: dict[str, Any] | None = None) -> tuple[list[dict], Path]:
    """``out/KIND-DATE-HOST.{json,md,png}`` (the same day's rows for other ``key`` values kept, see
    :func:`write_json` for ``defaults``), the Markdown echoed; returns all rows and the stem path."""
    import click

    stem = out / report_stem(kind)
    out.mkdir(parents=True, exist_ok=True)
    rows = write_json(Path(f"{stem}.json"), environment, rows, key, defaults)  # not with_suffix: host names hold dots
    Path(f"{stem}.md").write_text(markdown(environment, rows))
    plot(rows, Path(f"{stem}.png"))
    click.echo(markdown(environment, rows))
    return rows, stem


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend (benchmarks run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)


# --- timing statistics and the CPU's peak (pure functions: tests drive them with a fake clock and fake cpuinfo) ---

def summarize(samples: Any, warmup: int = 0) -> dict[str, float]:
    """p10, p50 and p90 (seconds) of ``samples`` after discarding the first ``warmup`` (cold calls: compilation,
    allocation, caches); ``n`` is how many were kept. A loaded machine shows as a wide p10..p90, not a lower median."""
    import numpy as np

    kept = np.asarray(list(samples)[warmup:], dtype=np.float64)
    if kept.size == 0:
        raise ValueError(f"no samples left after discarding {warmup} warm-up calls")
    p10, p50, p90 = (float(np.percentile(kept, q)) for q in (10, 50, 90))
    return {"p10_s": p10, "p50_s": p50, "p90_s": p90, "n": int(kept.size)}


def round_robin(fns: dict[str, Callable[[], Any]], rounds: int, clock: Callable[[], float] | None = None,
                sync: Callable[[], None] = lambda: None) -> dict[str, list[float]]:
    """Call every function once per round, interleaved (the starting one rotating each round), so a slowdown of the
    machine during the run lands on every backend alike instead of on whichever ran then; returns each one's
    seconds per call in call order (warm-up rounds included: :func:`summarize` discards them)."""
    clock = clock or time.perf_counter
    names = list(fns)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for i in range(len(names)):
            name = names[(r + i) % len(names)]
            t0 = clock()
            fns[name]()
            sync()
            out[name].append(clock() - t0)
    return out


def share_label(share: float) -> str:
    """A share of a peak as a percentage; above 100% the figure cannot be true (the peak or the FLOP count is
    wrong, or the work is not float32), so it is printed as invalid, never as a plain figure."""
    pct = 100 * share
    return f"invalid ({pct:.0f}% > 100%)" if share > 1.0 else f"{pct:.0f}%"


FMA_UNITS_ASSUMED = 2  # per core, for AVX2 / AVX-512 server cores: an assumption, not read from the CPU


def isa_lanes(flags: set[str]) -> tuple[int, str]:
    """float32 lanes of the widest FMA vector the CPU lists, and the ISA name."""
    if "avx512f" in flags:
        return 16, "AVX-512"
    if "avx2" in flags and "fma" in flags:
        return 8, "AVX2+FMA"
    if "avx" in flags:
        return 8, "AVX (no FMA)"
    if "sse2" in flags or "asimd" in flags:
        return 4, "SSE2/NEON"
    return 1, "scalar"


def theoretical_peak(cpuinfo: str, cores: int) -> dict[str, Any]:
    """float32 GFLOP/s from the ISA and the clock of ``/proc/cpuinfo`` text: cores x FMA units x lanes x 2 flops x
    GHz (the listed clock: a VM's nominal one, turbo and AVX-512 down-clocking not counted). FMA units per core are
    assumed (:data:`FMA_UNITS_ASSUMED` for AVX2/AVX-512, 1 below); the result says so."""
    flags: set[str] = set()
    mhz: list[float] = []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("flags", "Features") and not flags:
            flags = set(value.split())
        elif key == "cpu MHz":
            try:
                mhz.append(float(value))
            except ValueError:
                pass
    lanes, isa = isa_lanes(flags)
    fma = FMA_UNITS_ASSUMED if lanes >= 8 and ("fma" in flags or "avx512f" in flags) else 1
    ghz = max(mhz) / 1000 if mhz else 0.0
    gflops = cores * fma * lanes * 2 * ghz
    isa_flags = sorted(f for f in flags if f.startswith(("avx512", "amx")) or f in ("avx2", "fma", "avx_vnni"))
    return {"gflop_s": gflops, "cores": cores, "fma_units": fma, "fma_units_assumed": True, "lanes_fp32": lanes,
            "isa": isa, "ghz": ghz, "isa_flags": isa_flags,
            "formula": f"{cores} cores x {fma} FMA units (assumed) x {lanes} fp32 lanes ({isa}) x 2 flops x "
                       f"{ghz:.2f} GHz = {gflops:.1f} GFLOP/s"}
