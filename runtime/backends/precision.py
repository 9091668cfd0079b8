"""Which file ONNX Runtime runs on the CPU when no precision (or ``auto``) is asked: ``model.int8.onnx``
instead of ``model.onnx`` only where it passed its quality gate and is faster on this machine.

- **Gated**: ``export_report.json`` records ``int8.gate.passed`` (``ddim-export --int8`` commits an
  export only after its gate passed) and the sha256 of both files it gated; a report that cannot be read,
  a gate not recorded as passed, or files changed since mean ``model.onnx``, whatever the speed.
- **Faster**: float32 against INT8 forwards at batch :data:`SPEEDUP_BATCH` (the default sampling batch),
  runs interleaved, median of each. The export's own timing counts where its host fingerprint
  (:func:`host_fingerprint`) is this machine's; otherwise both files are timed now (1.5 s on a 2-core CPU) and
  the verdict is cached.

A verdict timed at load is cached (timing costs about three times a cold ``ddim-run``'s start, see
docs/export.md): one small JSON file in ``cache_dir()/int8-verdicts``, named by a hash of both files'
sha256 and the host fingerprint, written by atomic rename. It names the files and host it was measured
for and carries a checksum of its content: one that does not match (torn, edited, foreign) is measured
again and rewritten, with one warning. ``DDIM_DEPLOY_INT8_CACHE=0`` (or ``off``/``false``/``no``; the older
``DDIM_DEPLOY_ORT_CACHE=0`` too) turns it off: every such load times both files. A folder that cannot be
written costs the timing only: verdicts are not written for the rest of the process, with one warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import onnxruntime as ort

from runtime.exportdir import FP32_ONNX, INT8_ONNX, REPORT, read_report
from runtime.choices import Precision
from runtime.common.files import atomic_write_text, cache_dir, read_capped, sha256_file
from runtime.common.hostinfo import check_threads, cpu_fingerprint, cpu_name

log = logging.getLogger(__name__)

FILES = (FP32_ONNX, INT8_ONNX)  # float32, INT8
SPEEDUP_BATCH = 16  # the default batch of ddim-run and Sampler.sample: the speed that decides
EXPORT_BATCHES = (1, SPEEDUP_BATCH)
EXPORT_BUDGET_S = 3.0  # timing at export, both batches
RUNTIME_BUDGET_S = 1.0  # timing at load, where the export's does not apply
VERDICT_SCHEMA = 1
MAX_VERDICT_BYTES = 64 * 1024
VERDICT_SWITCHES = ("DDIM_DEPLOY_INT8_CACHE", "DDIM_DEPLOY_ORT_CACHE")  # either set to OFF_VALUES: no verdict cache
OFF_VALUES = ("0", "off", "false", "no")

_unwritable: set[str] = set()  # verdict folders that could not be written in this process (warned once each)


def verdict_folder() -> Path:
    """Where timings made at load are cached."""
    return cache_dir() / "int8-verdicts"


def verdicts_enabled() -> bool:
    """False when ``DDIM_DEPLOY_INT8_CACHE`` (or the older ``DDIM_DEPLOY_ORT_CACHE``) turns the cache off."""
    return all(os.environ.get(name, "1").strip().lower() not in OFF_VALUES for name in VERDICT_SWITCHES)


def host_fingerprint(threads: int | None = None) -> dict[str, Any]:
    """What a CPU timing depends on: CPU model and features, cores, ONNX Runtime version and the threads
    its sessions use (``threads``, default one per physical core)."""
    return {"cpu": cpu_name(), "cpu_features": cpu_fingerprint(), "logical_cores": os.cpu_count() or 1,
            "threads": check_threads(threads), "onnxruntime": ort.__version__}


def time_forwards(folder: Path, batches: tuple[int, ...] = (SPEEDUP_BATCH,), budget_s: float = RUNTIME_BUDGET_S,
                  warmup: int = 2, min_repeats: int = 3, max_repeats: int = 50,
                  threads: int | None = None) -> dict[str, Any]:
    """Median ms per forward of ``folder``'s float32 and INT8 files on ONNX Runtime CPU (the runtime's
    own sessions), per batch; ``speedup`` is float32 / INT8 at :data:`SPEEDUP_BATCH` (or the largest batch).

    The engine choice's interleaved timing of the two pairs (:func:`runtime.backends.engine_choice.time_pairs`:
    runs alternate, so a change in the machine's load hits both alike; each batch stops after ``max_repeats``
    rounds or its share of ``budget_s``, ``min_repeats`` at least), in ``int8.timing``'s shape.
    """
    from runtime.backends import engine_choice

    timing = engine_choice.time_pairs(folder, ["onnxruntime/int8"], batches, budget_s, threads, warmup=warmup,
                                      min_rounds=min_repeats, max_rounds=max_repeats)
    return engine_choice.int8_timing(timing, threads)


def timing_line(timing: dict[str, Any]) -> str:
    """One line for the export's log: how much faster INT8 is here, and what ddim-run will use."""
    n, s = timing["speedup_batch"], timing["speedup"]
    rows = timing["batch"]
    detail = "; ".join([f"batch {n}: {rows[str(n)]['int8_ms']:.2f} ms INT8, {rows[str(n)]['fp32_ms']:.2f} ms float32"]
                       + [f"batch {k}: {r['speedup']:.2f}x" for k, r in rows.items() if k != str(n)])
    host = timing["host"]
    where = f"{host['cpu']}, {host['threads']} threads, ONNX Runtime {host['onnxruntime']}"
    if s > 1:
        return (f"INT8 is {s:.2f}x faster than float32 on this CPU ({detail}; {where}): ddim-run on this CPU "
                "will use model.int8.onnx")
    return f"INT8 is not faster here ({s:.2f}x; {detail}; {where}): ddim-run on this CPU will use model.onnx"


def choose(folder: Path, threads: int | None = None) -> tuple[Precision, str]:
    """The file to run for precision ``auto`` on ONNX Runtime CPU in export folder ``folder`` with
    ``threads`` threads, and why (empty where there is no INT8 file to consider). Never raises: what cannot be read means float32
    or a new measurement, never an ungated file."""
    if not (folder / FILES[1]).is_file():
        return "fp32", ""
    try:
        gated, problem = _gated_files(folder)
        if problem:
            return "fp32", f"INT8 not used: {problem}"
        host = host_fingerprint(threads)
        timing = gated.get("timing")
        speedup = _speedup(timing) if isinstance(timing, dict) and timing.get("host") == host else None
        when = "measured at export"
        if speedup is None:
            speedup, when = _cached_or_measured(folder, gated["sha256"], host, threads)
    except Exception as exc:  # noqa: BLE001 - OSError, BackendError, ONNX Runtime's own types: float32 it is
        return "fp32", f"INT8 not used: {(str(exc).strip().splitlines() or [type(exc).__name__])[0]}"
    if speedup > 1:
        return "int8", f"{speedup:.2f}x faster than fp32 on this CPU, {when}"
    return "fp32", f"INT8 {speedup:.2f}x here, {when}"


def gated_problem(folder: Path) -> tuple[dict[str, Any], str]:
    """The report's INT8 section with both files' sha256, and why INT8 cannot be taken as gated (empty: it can)."""
    return _gated_files(folder)


def _gated_files(folder: Path) -> tuple[dict[str, Any], str]:
    """The report's INT8 section with the files' sha256 added, or why INT8 cannot be taken as gated."""
    try:
        section = read_report(folder)["int8"]
        passed = section["gate"]["passed"]
    except FileNotFoundError:
        return {}, f"no {REPORT} beside it to confirm its quality gate"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return {}, f"{REPORT} does not record its quality gate ({type(exc).__name__})"
    if passed is not True:
        return {}, f"{REPORT} does not record a passed quality gate"
    shas = {name: sha256_file(folder / name) for name in FILES}
    recorded = section.get("sha256")
    if recorded is not None and recorded != shas:  # older exports record none: their folder was committed gated
        return {}, f"{' or '.join(FILES)} changed since the export gated them"
    return {**section, "sha256": shas}, ""


def _speedup(timing: Any) -> float | None:
    """The recorded speed-up, where it is a finite positive number."""
    value = timing.get("speedup") if isinstance(timing, dict) else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    return None


def _cached_or_measured(folder: Path, shas: dict[str, str], host: dict[str, Any],
                        threads: int | None = None) -> tuple[float, str]:
    key = hashlib.sha256(json.dumps({"files": shas, "host": host}, sort_keys=True).encode()).hexdigest()[:32]
    path = verdict_folder() / f"{key}.json"
    caching = verdicts_enabled()
    if caching:
        speedup = _read_verdict(path, shas, host)
        if speedup is not None:
            return speedup, "measured earlier on this CPU"
    log.debug("timing %s against %s on this CPU (no timing recorded for it)", *(folder / f for f in FILES))
    timing = time_forwards(folder, threads=threads)
    if caching:
        write_verdict(path, {"schema_version": VERDICT_SCHEMA, "files": shas, "host": host, "timing": timing})
    return timing["speedup"], "measured now"


def _checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_verdict(path: Path, shas: dict[str, str], host: dict[str, Any]) -> float | None:
    """A verdict's speed-up, where it is intact and for these files and this host; None to measure again."""
    body = read_verdict(path, {"schema_version": VERDICT_SCHEMA, "files": shas, "host": host}, "INT8 timing verdict")
    if body is None:
        return None
    speedup = _speedup(body.get("timing"))
    if speedup is None:
        log.warning("INT8 timing verdict %s cannot be used (it records no speed-up); timing again", path)
    return speedup


def read_verdict(path: Path, expect: dict[str, Any], what: str) -> dict[str, Any] | None:
    """The body of the cached verdict ``path`` where it is intact (its checksum matches) and records ``expect``
    (files, host, schema...); None to measure again (with one warning where the file exists but cannot be used)."""
    try:
        body = json.loads(read_capped(path, MAX_VERDICT_BYTES, what))
        checksum = body.pop("checksum")
        if checksum != _checksum(body):
            raise ValueError("it does not match its checksum")
        if any(body.get(k) != v for k, v in expect.items()):
            raise ValueError("it was measured for other files or another host")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("%s %s cannot be used (%s); timing again", what, path, exc)
        return None
    return body  # type: ignore[no-any-return]


def write_verdict(path: Path, body: dict[str, Any]) -> None:
    """Cache a verdict (checksummed, atomic); a folder that cannot be written: one warning, never an error."""
    if str(path.parent) in _unwritable:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({**body, "checksum": _checksum(body)}, sort_keys=True) + "\n")
    except OSError as exc:  # read-only, not ours, full: the next load times again, never fails
        _unwritable.add(str(path.parent))
        log.warning("INT8 timing verdicts not cached for this process: cannot write to %s (%s); loads on this CPU "
                    "time both files again; point DDIM_DEPLOY_CACHE at a writable folder, or set "
                    "DDIM_DEPLOY_INT8_CACHE=0", path.parent, exc.strerror or exc)
