"""Facts about the host the runtime tunes itself to: physical cores, CPU model and features."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path


def physical_cores() -> int:
    """Physical cores (hyper-threads share a core's FMA units, so ONNX Runtime gains nothing from them)."""
    pairs = set()
    for topo in Path("/sys/devices/system/cpu").glob("cpu[0-9]*/topology"):
        try:
            pairs.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            continue
    return len(pairs) or os.cpu_count() or 1


def check_threads(threads: int | None) -> int:
    """The CPU threads a backend uses: ``threads``, or one per physical core when None.

    More threads than cores oversubscribes them: under contention eager torch was measured 16x slower
    per step with its default threads than with one (see docs/sampling.md).
    """
    if threads is None:
        return physical_cores()
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
    return threads


def threads_label(threads: int) -> str:
    return f"{threads} thread{'s' if threads != 1 else ''}"


def cpu_flags() -> str:
    """The CPU's feature flags (``/proc/cpuinfo``), or the platform's processor string elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string elsewhere."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_fingerprint() -> str:
    """A short hash of the CPU features: an optimised ONNX graph may use kernels only this CPU has."""
    return hashlib.sha256(cpu_flags().encode()).hexdigest()[:12]
