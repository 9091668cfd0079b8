"""Which engine and precision ``--backend auto`` runs on the CPU: the fastest pair that passed its gate, on this host.

The pairs (``ENGINE/PRECISION`` labels):

- ``onnxruntime/fp32`` (``model.onnx``): always a candidate (its parity gate is the export's own).
- ``onnxruntime/int8`` (``model.int8.onnx``): where ``int8.gate.passed`` and the files are those it gated
  (:func:`runtime.backends.precision.gated_problem`).
- ``openvino/fp32``, ``openvino/bf16``, ``openvino/int8``: where OpenVINO is installed, ``engine_gates[label]`` of
  ``export_report.json`` says ``passed: true`` and its ``sha256`` is the file's now (``ddim-export --int8`` measures
  them, export/engine_gates.py); bf16 only where this CPU lists BF16 now (an export gated on an AMX host may be
  copied to one without it).

A precision asked for (``--precision int8`` with ``--backend auto``) narrows the pairs to it; the ONNX Runtime pair of
that precision is then a candidate whatever its gate (asked for, as ``--backend onnxruntime --precision int8`` is).

**Fastest, timed fairly.** Every candidate runs the same batch of :data:`DECIDE_BATCH` (ddim-run's default) in rounds,
the order rotating each round, so a change in the machine's load lands on all of them alike (a single timing on a
loaded machine once printed "INT8 is 2.12x faster, batch 1: 6.71x"); the warm-up calls (OpenVINO compiles there) are
not counted. Per pair: p10/p50/p90 ms per forward; per round, its speed-up over ``onnxruntime/fp32`` in that same
round, whose p10..p90 is the spread the backend line prints. The pair that would finish ddim-run's default job
first wins (:func:`job_ms`: its first call, where OpenVINO compiles, plus the other forwards at its median).

Where the timing comes from, first that applies:

1. ``cpu_timing`` of ``export_report.json`` (timed by ``ddim-export --int8`` after its gates, every gated pair)
   where its host fingerprint (:func:`host_fingerprint`) is this machine's and it timed every candidate;
2. a verdict timed earlier on this host, cached beside the INT8 verdicts (``$DDIM_DEPLOY_CACHE/int8-verdicts/``,
   same rules: checksummed, atomic, ``DDIM_DEPLOY_INT8_CACHE=0`` turns it off, an unwritable folder costs the timing
   only);
3. timed now (about 2 s and OpenVINO's compiles, once per host and files) and cached.

Where only ONNX Runtime pairs are candidates (OpenVINO not installed, no OpenVINO gate passed), the choice is ONNX
Runtime's own fp32-or-int8 one (:func:`runtime.backends.precision.choose`), as before OpenVINO was an engine here.
Nothing here raises: what cannot be read means fewer candidates, never an ungated pair.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from runtime.backends import precision as ort_precision
from runtime.common.files import sha256_file
from runtime.exportdir import FP32_ONNX, INT8_ONNX, REPORT, read_report

log = logging.getLogger(__name__)

BASELINE = "onnxruntime/fp32"
PAIRS = ("onnxruntime/fp32", "onnxruntime/int8", "openvino/fp32", "openvino/bf16", "openvino/int8")
FILES = {"fp32": FP32_ONNX, "bf16": FP32_ONNX, "int8": INT8_ONNX}
DECIDE_BATCH = ort_precision.SPEEDUP_BATCH  # ddim-run's default batch: the speed that decides
EXPORT_BATCHES = (1, DECIDE_BATCH)
EXPORT_BUDGET_S = 6.0  # timed rounds at export, all batches (warm-up and compiles come on top)
JOB_FORWARDS = 4 * 50  # ddim-run's default job: 64 images at batch 16, 50 steps
LOAD_BUDGET_S = 2.0  # timed rounds at load where neither the export's timing nor a verdict applies
REPORT_KEY = "cpu_timing"
VERDICT_KIND = "engines"
VERDICT_SCHEMA = 2


def split(label: str) -> tuple[str, str]:
    engine, _, prec = label.partition("/")
    return engine, prec


@dataclass(frozen=True)
class Choice:
    """The pair ``auto`` runs (``engine``, ``precision``), why (one clause for the backend line; empty: nothing to
    say), and the fastest ONNX Runtime candidate (what runs where the OpenVINO pair cannot open)."""

    engine: str
    precision: str
    why: str
    fallback: str = "fp32"  # ONNX Runtime's precision


def openvino_version() -> str | None:
    """The installed OpenVINO's version (read from its metadata: nothing is imported), or None."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openvino")
    except PackageNotFoundError:
        return None


def host_fingerprint(threads: int | None = None, openvino: bool = True) -> dict[str, Any]:
    """What the timing of the pairs depends on: ONNX Runtime's fingerprint (CPU, features, cores, threads, version)
    and, where OpenVINO pairs are timed, OpenVINO's version."""
    host = ort_precision.host_fingerprint(threads)
    return {**host, "openvino": openvino_version()} if openvino else host


def cpu_has_bf16() -> bool:
    """Whether OpenVINO lists BF16 among this CPU's optimisation capabilities (imports OpenVINO)."""
    try:
        from runtime.backends.openvino_backend import cpu_capabilities, ov

        return "BF16" in cpu_capabilities(ov.Core())
    except Exception:  # noqa: BLE001 - OpenVINO that cannot start here: no bf16
        return False


def candidates(folder: Path, asked: str | None = None, engine: str | None = None) -> tuple[list[str], list[str]]:
    """The pairs ``auto`` may run for export folder ``folder`` (``asked``: a precision asked for; ``engine``: only
    that engine's pairs), and notes on gated pairs left out here (OpenVINO missing, no BF16 now)."""
    notes: list[str] = []
    if not (folder / FP32_ONNX).is_file():
        return [], notes
    out: list[str] = []
    if engine in (None, "onnxruntime"):
        out.append(BASELINE)
        if (folder / INT8_ONNX).is_file():
            _, problem = ort_precision.gated_problem(folder)
            if not problem or asked == "int8":
                out.append("onnxruntime/int8")
    if engine in (None, "openvino"):
        out += _openvino_pairs(folder, asked, notes)
    if asked is not None:
        out = [p for p in out if split(p)[1] == asked]
    return out, notes


def _openvino_pairs(folder: Path, asked: str | None, notes: list[str]) -> list[str]:
    try:
        gates = read_report(folder).get("engine_gates")
    except (OSError, ValueError):
        gates = None
    gates = {k: v for k, v in gates.items() if isinstance(v, dict)} if isinstance(gates, dict) else {}
    passed = [label for label in PAIRS if label.startswith("openvino/") and gates.get(label, {}).get("passed") is True]
    if asked == "bf16" and "openvino/bf16" not in passed:
        passed.append("openvino/bf16")  # asked for: bf16 runs on OpenVINO alone
    if not passed:
        return []
    if openvino_version() is None:
        from runtime.common.extras import install_hint

        notes.append(f"OpenVINO not installed ({install_hint('openvino')}): its gated pairs not considered")
        return []
    shas: dict[str, str | None] = {}
    out = []
    for label in passed:
        prec = split(label)[1]
        name = FILES[prec]
        if name not in shas:
            shas[name] = sha256_file(folder / name) if (folder / name).is_file() else None
        recorded = gates.get(label, {}).get("sha256")
        if not (asked == "bf16" and prec == "bf16") and (shas[name] is None or recorded != shas[name]):
            notes.append(f"{label} not considered: {name} changed since its gate")
            continue
        if prec == "bf16" and asked != "bf16" and not cpu_has_bf16():  # asked for: OpenVINO refuses in one line
            notes.append(f"{label} not considered: this CPU has no bfloat16 instructions")
            continue
        out.append(label)
    return out


# --------------------------------------------------------------------------- timing


def open_pair(folder: Path, label: str, threads: int | None) -> Any:
    """The runtime's own backend for ``label`` (what ddim-run would run)."""
    engine, prec = split(label)
    if engine == "openvino":
        from runtime.backends.openvino_backend import OpenVinoBackend

        return OpenVinoBackend(folder, "cpu", prec, threads)
    from runtime.backends.ort_backend import OrtBackend

    return OrtBackend(folder, "cpu", prec, threads)


def _stats(values: list[float], scale: float = 1.0, digits: int = 4) -> dict[str, float]:
    p10, p50, p90 = (float(np.percentile(values, q)) * scale for q in (10, 50, 90))
    return {"p10": round(p10, digits), "p50": round(p50, digits), "p90": round(p90, digits)}


def time_pairs(folder: Path, labels: list[str], batches: tuple[int, ...] = (DECIDE_BATCH,),
               budget_s: float = LOAD_BUDGET_S, threads: int | None = None, warmup: int = 2, min_rounds: int = 5,
               max_rounds: int = 200, clock: Callable[[], float] = time.perf_counter,
               opener: Callable[[Path, str, int | None], Any] = open_pair) -> dict[str, Any]:
    """Forwards of every pair in ``labels`` (``onnxruntime/fp32`` added as the reference), interleaved in rounds
    whose order rotates, per batch: ``{"batch": {N: {label: {p10, p50, p90 (ms), first_ms}}}, "ratio": {N: {label:
    {p10, p50, p90}}}, "rounds": {N: n}, "pairs": [...], "host": ...}``. Each batch runs ``warmup`` uncounted calls
    per pair (the first one timed as ``first_ms``: compiles, allocation), then rounds until ``min_rounds`` and its
    share of ``budget_s`` (at most ``max_rounds``)."""
    labels = [BASELINE, *(p for p in labels if p != BASELINE)]
    backends = {p: opener(folder, p, threads) for p in labels}
    m = backends[BASELINE].spec.model
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {"batch": {}, "ratio": {}, "rounds": {}}
    for n in batches:
        x = rng.standard_normal((n, m.channels, m.image_size, m.image_size), dtype=np.float32)  # (N, C, H, W)
        first: dict[str, float] = {}
        for p, b in backends.items():
            t0 = clock()
            b.denoise(x, 0.5)
            first[p] = clock() - t0
            for _ in range(warmup - 1):
                b.denoise(x, 0.5)
        times: dict[str, list[float]] = {p: [] for p in labels}
        start = clock()
        r = 0
        while r < max_rounds:
            for i in range(len(labels)):
                p = labels[(r + i) % len(labels)]
                t0 = clock()
                backends[p].denoise(x, 0.5)
                times[p].append(clock() - t0)
            r += 1
            if r >= min_rounds and clock() - start >= budget_s / len(batches):
                break
        out["batch"][str(n)] = {p: {**_stats(times[p], 1e3), "first_ms": round(1e3 * first[p], 4)} for p in labels}
        out["ratio"][str(n)] = {p: _stats([f / t for f, t in zip(times[BASELINE], times[p])]) for p in labels}
        out["rounds"][str(n)] = r
    out["pairs"] = labels
    out["decide_batch"] = DECIDE_BATCH if DECIDE_BATCH in batches else max(batches)
    out["host"] = host_fingerprint(threads)
    return out


def int8_timing(timing: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    """``int8.timing`` of the report (what ONNX Runtime's own precision auto reads) from a :func:`time_pairs` result
    that timed both ONNX Runtime files."""
    rows = {}
    for n, row in timing["batch"].items():
        fp32, int8 = row[BASELINE]["p50"], row["onnxruntime/int8"]["p50"]
        rows[n] = {"fp32_ms": fp32, "int8_ms": int8, "speedup": round(fp32 / int8, 4), "repeats": timing["rounds"][n]}
    key = str(timing["decide_batch"])
    return {"batch": rows, "speedup": rows[key]["speedup"], "speedup_batch": int(key),
            "host": ort_precision.host_fingerprint(threads)}


def timing_lines(timing: dict[str, Any]) -> list[str]:
    """The export log's lines: each pair's median ms and speed-up over ONNX Runtime fp32 with its spread."""
    n = str(timing["decide_batch"])
    rows, ratios = timing["batch"][n], timing["ratio"][n]
    order = sorted(rows, key=lambda p: job_ms(rows[p]))
    host = timing["host"]
    lines = [f"CPU engines at batch {n} ({host['cpu']}, {host['threads']} threads, {timing['rounds'][n]} interleaved "
             f"rounds): ddim-run --backend auto on this CPU will run {order[0]}"]
    for p in order:
        r = ratios[p]
        lines.append(f"  {p:17s} {rows[p]['p50']:8.2f} ms (p10-p90 {rows[p]['p10']:.2f}-{rows[p]['p90']:.2f}), "
                     f"{r['p50']:.2f}x onnxruntime/fp32 (p10-p90 {r['p10']:.2f}-{r['p90']:.2f}x), first call "
                     f"{rows[p]['first_ms']:.0f} ms")
    return lines


# --------------------------------------------------------------------------- the choice

_memo: dict[tuple[Any, ...], Choice] = {}  # one choice per folder state, threads and asked precision per process


def _state(folder: Path) -> tuple[Any, ...]:
    sig = []
    for name in (FP32_ONNX, INT8_ONNX, REPORT):
        try:
            st = (folder / name).stat()
            sig.append((name, st.st_size, st.st_mtime_ns))
        except OSError:
            sig.append((name, None, None))
    return tuple(sig)


def choose(folder: Path, threads: int | None = None, asked: str | None = None, engine: str | None = None) -> Choice:
    """The pair to run in ``folder`` (see the module docstring). Memoised per process: the OpenVINO row and the ONNX
    Runtime row of ``auto`` ask in turn, and a ddim-serve replica loads once."""
    key = (str(folder.resolve()), threads, asked, engine, _state(folder))
    if key not in _memo:
        _memo[key] = _choose(folder, threads, asked, engine)
    return _memo[key]


def _choose(folder: Path, threads: int | None, asked: str | None, engine: str | None) -> Choice:
    try:
        labels, notes = candidates(folder, asked, engine)
    except Exception as exc:  # noqa: BLE001 - an unreadable folder: ONNX Runtime float32, said why
        return Choice("onnxruntime", asked or "fp32", f"auto: onnxruntime/fp32 ({_first_line(exc)})")
    note = f"; {'; '.join(notes)}" if notes else ""
    if not any(p.startswith("openvino/") for p in labels):
        if asked is not None or engine == "openvino":
            return Choice(engine or "onnxruntime", asked or "fp32", note.lstrip("; "), asked or "fp32")
        prec, why = ort_precision.choose(folder, threads)  # ONNX Runtime's own fp32-or-int8 choice
        return Choice("onnxruntime", prec, (f"precision auto: {prec}, {why}" if why else "") + note, prec)
    fallback = "int8" if "onnxruntime/int8" in labels else ("fp32" if BASELINE in labels else asked or "fp32")
    if len(labels) == 1:
        e, p = split(labels[0])
        return Choice(e, p, f"auto: {labels[0]}, the only candidate{note}", fallback)
    try:
        timing, when = _timing(folder, labels, threads)
    except Exception as exc:  # noqa: BLE001 - a pair that cannot run here: ONNX Runtime's own choice
        prec, why = ort_precision.choose(folder, threads) if asked is None else (asked, "")
        return Choice("onnxruntime", prec, f"auto: engines not timed ({_first_line(exc)}); "
                      f"precision {prec}{', ' + why if why else ''}{note}", prec)
    n = str(timing["decide_batch"])
    rows, ratios = timing["batch"][n], timing["ratio"][n]
    order = sorted(labels, key=lambda p: job_ms(rows[p]))
    best = order[0]
    r = ratios[best]
    others = ", ".join(f"{p} {ratios[p]['p50']:.2f}x" for p in order[1:])
    why = (f"auto: fastest gated on this CPU, {r['p50']:.2f}x onnxruntime/fp32 (p10-p90 {r['p10']:.2f}-"
           f"{r['p90']:.2f}x, batch {n}, {when}){'; then ' + others if others else ''}{note}")
    ort = [p for p in order if p.startswith("onnxruntime/")]
    e, p = split(best)
    return Choice(e, p, why, split(ort[0])[1] if ort else fallback)


def job_ms(row: dict[str, float]) -> float:
    """What a pair costs for ddim-run's default job (:data:`JOB_FORWARDS` forwards at the deciding batch): its first
    call (OpenVINO compiles there: 0.2-1.2 s measured on the shipped model, more than a dozen forwards) and the rest at
    its median. Pairs whose medians are within a few percent are told apart by their compile times."""
    return row["first_ms"] + (JOB_FORWARDS - 1) * row["p50"]


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _usable(timing: Any, labels: list[str], host: dict[str, Any]) -> bool:
    """Whether a recorded timing is for this host and holds finite figures for every label."""
    try:
        if timing["host"] != host:
            return False
        n = str(timing["decide_batch"])
        for p in labels:
            row, ratio = timing["batch"][n][p], timing["ratio"][n][p]
            for v in (row["p10"], row["p50"], row["p90"], row["first_ms"], ratio["p10"], ratio["p50"], ratio["p90"]):
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                    return False
        return True
    except (KeyError, TypeError, AttributeError):
        return False


def _timing(folder: Path, labels: list[str], threads: int | None) -> tuple[dict[str, Any], str]:
    host = host_fingerprint(threads)
    try:
        recorded = read_report(folder).get(REPORT_KEY)
    except (OSError, ValueError):
        recorded = None
    if _usable(recorded, labels, host):
        return recorded, "measured at export"  # type: ignore[return-value]
    files = {name: sha256_file(folder / name) for name in sorted({FILES[split(p)[1]] for p in labels})}
    expect = {"kind": VERDICT_KIND, "schema_version": VERDICT_SCHEMA, "files": files, "pairs": sorted(labels),
              "host": host}
    key = hashlib.sha256(json.dumps(expect, sort_keys=True).encode()).hexdigest()[:32]
    path = ort_precision.verdict_folder() / f"engines-{key}.json"
    caching = ort_precision.verdicts_enabled()
    if caching:
        body = ort_precision.read_verdict(path, expect, "CPU engine timing verdict")
        if body is not None and _usable(body.get("timing"), labels, host):
            return body["timing"], "measured earlier on this CPU"
    log.info("timing %s on this CPU (once per host: no timing recorded for it)", ", ".join(labels))
    timing = time_pairs(folder, labels, threads=threads)
    if caching:
        ort_precision.write_verdict(path, {**expect, "timing": timing})
    return timing, "measured now"


def clear_memo() -> None:
    """Forget this process's choices (tests; a long-lived process whose host changed threads)."""
    _memo.clear()


def export_timing(folder: Path, gates: dict[str, Any], threads: int | None = None,
                  budget_s: float = EXPORT_BUDGET_S) -> dict[str, Any]:
    """``cpu_timing`` of the report for an export staged in ``folder``: every pair gated there (``gates``: its
    ``engine_gates``), timed at batches :data:`EXPORT_BATCHES`."""
    labels = ["onnxruntime/fp32", "onnxruntime/int8"]
    labels += [p for p in PAIRS if p.startswith("openvino/") and isinstance(gates.get(p), dict)
               and gates[p].get("passed") is True]
    return time_pairs(folder, labels, EXPORT_BATCHES, budget_s, threads)


__all__ = ["Choice", "choose", "candidates", "time_pairs", "export_timing", "int8_timing", "timing_lines",
           "host_fingerprint"]
