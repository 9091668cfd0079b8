"""The benchmark scripts run end to end (tiny settings) and write their reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def script(name: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], capture_output=True, text=True,
                          env=env, timeout=600)


def test_latency_quick_writes_json_markdown_and_plot(tmp_path):
    proc = script("latency.py", "--quick", "--model", "fashion-mnist", "--batch", "1", "--batch", "2",
                  "--sample-batch", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = tmp_path.glob("latency-*.json")
    data = json.loads(report.read_text())
    rows = data["results"]
    backends = {r["backend"] for r in rows}
    assert {"eager fp32 (cpu)", "onnxruntime cpu fp32"} <= backends
    assert {r["kind"] for r in rows} == {"forward", "sample 10 steps"}
    eager = [r for r in rows if r["backend"] == "eager fp32 (cpu)"]
    assert all(abs(r["speedup_vs_eager_fp32"] - 1.0) < 1e-9 for r in eager)
    assert all(r["median_s"] > 0 and r["p90_s"] >= r["median_s"] for r in rows)
    assert data["environment"]["matmul_peak_gflop_s"] > 0
    assert report.with_suffix(".md").read_text().count("| fashion-mnist |") == len(rows)
    assert report.with_suffix(".png").stat().st_size > 10_000


def test_train_throughput_writes_its_report(tmp_path):
    proc = script("train_throughput.py", "--preset", "fashion-mnist", "--batch-size", "4", "--steps", "1",
                  "--warmup", "0", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = tmp_path.glob("train-throughput-*.json")
    (row,) = json.loads(report.read_text())["results"]
    assert row["preset"] == "fashion-mnist" and row["images_per_s"] > 0 and row["parameters"] == 818_785
