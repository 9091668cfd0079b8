"""The benchmark scripts run end to end (tiny settings) and write their reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_fid_scores_each_backend_against_data_and_eager(tmp_path, fashion_dir):
    from tests.conftest import tiny_config
    from quality.classifier import save_classifier, train_classifier
    from trainer.data import fit_idx_images
    from trainer.data.fashion_mnist import load_fashion_mnist
    from trainer.train import fit

    run = tmp_path / "run"
    fit(tiny_config(steps=2), run, fashion_dir, progress=False)
    split = {s: load_fashion_mnist(fashion_dir, s) for s in ("train", "test")}
    model, info = train_classifier(*((fit_idx_images(x, 32), y) for x, y in split.values()), epochs=1, width=8,
                                   progress=False)
    save_classifier(model, info, tmp_path / "cls")
    out = tmp_path / "out"
    proc = script("fid.py", "--model", str(run), "--data", str(fashion_dir), "--classifier", str(tmp_path / "cls"),
                  "--num-images", "6", "--steps", "2", "--steps", "3", "--batch-size", "4", "--out", str(out),
                  "--backend", "onnxruntime", "--backend", "onnxruntime-int8",
                  "--solver", "ddim", "--solver", "dpmpp-2m")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.startswith(f"fid: {run}")
    (report,) = out.glob("fid-*.json")
    rows = json.loads(report.read_text())["results"]
    real = [r for r in rows if r["steps"] == 0]
    assert len(real) == 1 and real[0]["n"] == 6 and real[0]["extractor"] == "FD-classifier"
    both = {(r["backend"], r["solver"], r["steps"]): r for r in rows if r["steps"]}
    assert set(both) == {(b, solver, s) for b in ("eager fp32", "onnxruntime cpu fp32", "onnxruntime cpu int8")
                         for solver in ("ddim", "dpmpp-2m") for s in (2, 3)}
    assert both["eager fp32", "ddim", 3]["fd_data"] != both["eager fp32", "dpmpp-2m", 3]["fd_data"]
    sampled = {(b, s): r for (b, solver, s), r in both.items() if solver == "ddim"}
    assert all(0 < sampled[("onnxruntime cpu int8", s)]["psnr_vs_eager"] < float("inf") for s in (2, 3))
    for steps in (2, 3):
        ort = sampled[("onnxruntime cpu fp32", steps)]
        # Same noise, same weights: ONNX Runtime's images match eager's to a level or two.
        assert ort["max_abs_diff_vs_eager"] <= 2 and ort["psnr_vs_eager"] > 40
        assert abs(ort["fd_data"] - sampled[("eager fp32", steps)]["fd_data"]) < 0.05 * sampled[("eager fp32", steps)][
            "fd_data"] + 1e-3
        assert "psnr_vs_eager" not in sampled[("eager fp32", steps)]
    md = report.with_suffix(".md").read_text()
    assert "| FD-classifier | onnxruntime cpu fp32 | ddim | 3 | 6 |" in md
    assert "| FD-classifier | onnxruntime cpu fp32 | dpmpp-2m | 3 | 6 |" in md
    assert report.with_suffix(".png").stat().st_size > 10_000
    assert (out / f"{report.stem}-samples-3-steps.png").stat().st_size > 1_000


def test_fid_bad_model_is_one_line_error(tmp_path):
    proc = script("fid.py", "--model", str(tmp_path / "nope"), "--out", str(tmp_path))
    assert proc.returncode != 0
    assert proc.stderr.strip().startswith("error:") and "Traceback" not in proc.stderr


def test_int8_tradeoff_reports_speed_and_quality_per_option(tmp_path, fashion_dir):
    from tests.conftest import tiny_config
    from trainer.train import fit

    run = tmp_path / "run"
    fit(tiny_config(steps=2), run, fashion_dir, progress=False)
    out = tmp_path / "out"
    proc = script("int8_tradeoff.py", "--model", str(run), "--data", str(fashion_dir), "--num-images", "4",
                  "--steps", "2", "--batch", "1", "--repeats", "1", "--option", "7-bit weights, convolutions only", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = out.glob("int8-tradeoff-*.json")
    (row,) = json.loads(report.read_text())["results"]
    assert row["option"] == "7-bit weights, convolutions only" and row["speedup"] > 0 and row["fd_fp32"] > 0
    assert row["flowers_fp32_ms"] > 0 and row["psnr_vs_fp32"] > 0
    assert report.with_suffix(".png").stat().st_size > 10_000


@pytest.mark.gpu
def test_latency_gpu_rows(tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    proc = script("latency.py", "--quick", "--model", "fashion-mnist", "--batch", "8", "--sample-batch", "8",
                  "--device", "cuda", "--no-int8", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = tmp_path.glob("latency-*.json")
    backends = {r["backend"] for r in json.loads(report.read_text())["results"]}
    assert {"eager fp32 (cuda)", "eager fp16 (cuda)", "eager fp32 + CUDA graph (cuda)",
            "eager fp16 + CUDA graph (cuda)"} <= backends
    import onnxruntime as ort

    from export.tensorrt_build import unavailable_reason

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert {"onnxruntime cuda fp32", "onnxruntime cuda fp16"} <= backends
    if unavailable_reason() is None:
        assert {"tensorrt fp16", "tensorrt fp16 static-8 + CUDA graph"} <= backends
