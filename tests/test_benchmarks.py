"""The benchmark scripts run end to end (tiny settings) and write their reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    absent = {r["backend"]: r["absent"] for r in rows if r["kind"] == "absent"}
    rows_timed = [r for r in rows if r["kind"] != "absent"]
    backends = {r["backend"] for r in rows_timed}
    assert {"eager fp32 (cpu)", "onnxruntime cpu fp32", "onnxruntime cpu int8", "openvino cpu fp32",
            "openvino cpu int8"} <= backends
    assert ("openvino cpu bf16" in backends) != ("openvino cpu bf16" in absent)  # timed, or absent saying why
    assert "torch.compile (cpu)" in absent  # --quick does not compile, and the report says so
    assert {r["kind"] for r in rows_timed} == {"forward", "sample 10 steps"}
    eager = [r for r in rows_timed if r["backend"] == "eager fp32 (cpu)"]
    assert all(abs(r["speedup_vs_eager_fp32"] - 1.0) < 1e-9 for r in eager)
    assert all(0 < r["p10_s"] <= r["median_s"] == r["p50_s"] <= r["p90_s"] for r in rows_timed)
    assert all(r["warmup"] >= 3 for r in rows_timed if r["kind"] == "forward")
    env = data["environment"]
    assert env["matmul_peak_gflop_s"] > 0 and env["isa_peak_gflop_s"] > 0 and "assumed" in env["isa_peak_formula"]
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
                  "--extractor", "classifier", "--num-images", "6", "--steps", "2", "--steps", "3", "--batch-size", "4", "--out", str(out),
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
    # FD along training, on the same run's checkpoints: scored once, then reused when the script follows the run.
    args = ("fd_by_step.py", str(run), "--data", str(fashion_dir), "--classifier", str(tmp_path / "cls"),
            "--num-images", "6", "--steps", "2", "--batch-size", "4", "--out", str(out))
    proc = script(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]
    scored = json.loads((out / "fd_by_step.json").read_text())
    steps = [r["step"] for r in scored["results"]]
    assert steps and steps == sorted(steps) and steps[-1] == 2
    assert all(r["fd_data"] > 0 for r in scored["results"]) and scored["meta"]["n"] == 6
    assert "| 2 |" in (out / "fd_by_step.md").read_text() and (out / "fd_by_step.png").stat().st_size > 5_000
    again = script(*args)
    assert again.returncode == 0 and f"({0} to score)" in again.stderr
    assert json.loads((out / "fd_by_step.json").read_text())["results"] == scored["results"]
    bad = script("fd_by_step.py", str(run), str(run / "model.safetensors"), "--out", str(out))
    assert bad.returncode != 0 and "no training step in its name" in bad.stderr and "Traceback" not in bad.stderr


def test_fid_is_the_default_score_with_fd_classifier_beside_it(tmp_path, fashion_dir, monkeypatch):
    """In process, with a cheap stand-in for the Fréchet distance: scipy's sqrtm of 2048x2048 matrices (20-40 s
    each here) is tested in tests/test_fid.py; this checks which scores, references and rows the report holds."""
    from click.testing import CliRunner

    from benchmarks import fid as bf
    from quality.classifier import save_classifier, train_classifier
    from tests.conftest import tiny_config
    from trainer.data import fit_idx_images
    from trainer.data.fashion_mnist import load_fashion_mnist
    from trainer.train import fit

    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(bf, "frechet_distance",
                        lambda a, b: calls.append(len(a.mu)) or float(np.abs(a.mu - b.mu).sum()))
    run = tmp_path / "run"
    fit(tiny_config(steps=2), run, fashion_dir, progress=False)
    split = {s: load_fashion_mnist(fashion_dir, s) for s in ("train", "test")}
    model, info = train_classifier(*((fit_idx_images(x, 32), y) for x, y in split.values()), epochs=1, width=8,
                                   progress=False)
    save_classifier(model, info, tmp_path / "cls")
    out = tmp_path / "out"
    result = CliRunner().invoke(bf.main, ["--model", str(run), "--data", str(fashion_dir), "--classifier",
                                          str(tmp_path / "cls"), "--num-images", "4", "--steps", "2",
                                          "--batch-size", "4", "--backend", "onnxruntime", "--out", str(out)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.stderr[-2000:]
    assert "inception + classifier features" in result.stderr
    assert "reference: 32 images of the fashion-mnist val split; features: FID (InceptionV3 pool3" in result.stderr
    (report,) = out.glob("fid-*.json")
    rows = {(r["backend"], r["steps"]): r for r in json.loads(report.read_text())["results"]}
    assert set(rows) == {("real (train split)", 0), ("eager fp32", 2), ("onnxruntime cpu fp32", 2)}
    assert all(r["extractor"] == "FID" and r["reference"] == "val" and r["reference_n"] == 32 for r in rows.values())
    assert all("classifier_fd_data" in r and "kid" in r for r in rows.values())
    ort = rows["onnxruntime cpu fp32", 2]
    assert ort["delta_vs_eager"] == pytest.approx(ort["fd_data"] - rows["eager fp32", 2]["fd_data"])
    assert "classifier_fd_vs_eager" in ort and "fd_vs_eager" not in ort  # FID vs eager only with --fid-vs-eager
    assert 2048 in calls and 128 in calls
    md = report.with_suffix(".md").read_text()
    assert "| FD-classifier vs data | FD-classifier vs eager |" in md
    assert "| FID | onnxruntime cpu fp32 | ddim | 2 | 4 |" in md


def test_inception_speed_quick_writes_its_report(tmp_path):
    proc = script("inception_speed.py", "--quick", "--threads", "1", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = tmp_path.glob("inception-speed-*.json")
    data = json.loads(report.read_text())
    assert [r["engine"] for r in data["results"]] == ["onnxruntime", "torchscript"]
    assert all(r["images_per_s"] > 0 and r["batch"] == 2 for r in data["results"])
    assert data["environment"]["matmul_peak_gflop_s"] > 0
    assert "| torchscript | 2 |" in report.with_suffix(".md").read_text()


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


def serve_load_rows() -> tuple[dict, list[dict]]:
    env = {"cpu": "CPU", "cores": 2, "ray": "2.60.0", "matmul_peak_gflop_s": 100.0}
    base = {"model": "m", "clients": 16, "num_images": 1, "steps": 20, "requests": 200, "errors": 0, "p50_ms": 1.0,
            "p90_ms": 2.0, "p99_ms": 3.0, "ttfs_p50_ms": 0.4, "ttfs_p90_ms": 0.6, "ttfs_p99_ms": 0.9, "ready_s": 12.0}
    return env, [{**base, "max_batch": 1, "batching": "request", "requests_per_s": 5.0, "images_per_s": 5.0,
                  "batches": {"1": 200}, "direct_images_per_s": 6.0},
                 {**base, "max_batch": 16, "batching": "request", "requests_per_s": 8.0, "images_per_s": 8.0,
                  "batches": {"16": 12, "8": 1}, "direct_images_per_s": 9.0}]


def test_serve_load_report_names_the_ceiling():
    from benchmarks.serve_load_report import markdown

    env, rows = serve_load_rows()
    md = markdown(env, rows)
    assert "| 16 | request | 1 | 16 | 1 | 20 | 200 | 0 | 8.00 | 8.00 | 1 | 2 | 3 | 0 | 1 | 8: 1, 16: 12 | 12.0 | 9.00 | - |" \
        in md
    assert "--max-batch 16 (steps 20) gives 1.60x the images/s of --max-batch 1 (request-level)" in md and "gains 1.50x" in md
    assert "step-level batching: p50" not in md  # no step row to compare with
    old = {k: v for k, v in rows[0].items() if not k.startswith("ttfs") and k != "batching"}  # before --batching
    assert "| 1 | request | 1 | 16 | 1 | 20 | 200 | 0 | 5.00 | 5.00 | 1 | 2 | 3 | - | - | 1: 200 |" in markdown(env, [old])


def test_serve_load_report_compares_step_with_request_batching():
    from benchmarks.serve_load_report import markdown

    env, rows = serve_load_rows()
    step = {**rows[1], "batching": "step", "p50_ms": 600.0, "images_per_s": 8.4, "batches": {"16": 240}}
    slower = {**step, "images_per_s": 7.0}
    rows[1]["p50_ms"] = 1000.0
    md = markdown(env, [*rows, step])
    assert ("At --max-batch 16, steps 20 (ddim), step-level batching: p50 latency 40% lower than request-level (600 ms "
            "vs 1000 ms) at 1.05x its images/s (8.40 vs 8.00); target (p50 at least 20% lower at equal or higher "
            "images/s) met." in md)
    assert md.count("Batching: --max-batch") == 1  # max batch 1 against 16, request-level only
    assert "at 0.88x its images/s (7.00 vs 8.00); target (p50 at least 20% lower at equal or higher images/s) not met" \
        in markdown(env, [*rows, slower])
    assert "p50 latency 20% higher" in markdown(env, [*rows, {**step, "p50_ms": 1200.0}])
    # Repeated runs compare medians and list each pair; a mixed workload is compared only with itself.
    runs = [{**rows[1], "run": 2, "p50_ms": 900.0}, {**step, "run": 2, "p50_ms": 800.0, "images_per_s": 8.0},
            {**rows[1], "run": 3, "p50_ms": 1100.0}, {**step, "run": 3, "p50_ms": 700.0, "images_per_s": 8.8}]
    mixed = [{**rows[1], "steps": "10/50", "p50_ms": 2000.0}, {**step, "steps": "10/50", "p50_ms": 1900.0}]
    md = markdown(env, [*rows, step, *runs, *mixed])
    assert ("steps 20 (ddim), step-level batching: p50 latency 30% lower than request-level (700 ms vs 1000 ms, "
            "medians of 3 and 3 runs) at 1.05x its images/s (8.40 vs 8.00); target (p50 at least 20% lower at equal "
            "or higher images/s) met. Run by run: 40% lower at 1.05x, 11% lower at 1.00x, 36% lower at 1.10x." in md)
    assert "steps 10/50 (ddim), step-level batching: p50 latency 5% lower" in md
    alone = {"alone_images_per_s": 10.0, "alone_p50_ms": 1200.0, "alone_ttfs_p50_ms": 3.0}
    md = markdown(env, [rows[0], {**rows[1], **alone, "alone_p50_ms": 990.0}, {**step, **alone}])
    assert ("On the replica alone (no HTTP, no Ray competing for the cores): p50 21% higher (1200 ms vs 990 ms) at "
            "1.00x the images/s." in md)
    assert "| 10.00, 1200, 3 |" in md


def test_serve_load_settings():
    from benchmarks.serve_load import settings

    assert settings((), ()) == [(1, "request"), (16, "request"), (16, "step")]
    assert settings((), ("step", "request")) == [(16, "request"), (16, "step")]
    assert settings((4, 1, 4), ()) == [(1, "step"), (4, "step")]
    assert settings((8, 2), ("request",)) == [(2, "request"), (8, "request")]


@pytest.mark.slow
def test_serve_load_end_to_end(tmp_path):
    proc = script("serve_load.py", "--requests", "12", "--clients", "4", "--warmup", "2", "--steps", "2",
                  "--max-batch", "1", "--max-batch", "4", "--batching", "request", "--batching", "step",
                  "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = tmp_path.glob("serve-load-*.json")
    rows = json.loads(report.read_text())["results"]
    assert [(r["max_batch"], r["batching"]) for r in rows] == [(1, "request"), (1, "step"), (4, "request"),
                                                               (4, "step")]
    assert all(r["run"] == 1 for r in rows)
    assert all(r["errors"] == 0 and r["ok"] == 12 and r["shutdown_rc"] == 0 for r in rows)
    assert all(0 <= r["ttfs_p50_ms"] <= r["ttfs_p90_ms"] <= r["p50_ms"] + r["p90_ms"] for r in rows)
    assert sum(int(k) * v for k, v in rows[2]["batches"].items()) == 12  # request-level: a batch per image group
    assert sum(int(k) * v for k, v in rows[3]["batches"].items()) >= 12  # step-level: one per network call
    assert "step-level batching: p50 latency" in Path(str(report)[:-4] + "md").read_text()


def test_serve_hostile_report_marks_each_target():
    from benchmarks.serve_hostile import markdown

    env = {"date": "d", "cpu": "CPU", "cores": 2, "model": "m", "command": "c"}
    row = {"ready_s": 12.0, "timeout_s": 10.0, "alone_s": 0.1, "ray_left": 0,
           "stalled": {"stalled": 300, "half_heads": 50, "normal_requests": 9, "normal_max_s": 0.4,
                       "normal_median_s": 0.2, "stalled_408": 300, "half_heads_408": 50, "trickle": 408,
                       "all_cut_within_s": 10.5, "served_after": 200},
           "large": {"large": "64 x 1000", "large_status": 200, "large_images": 64, "large_s": 250.0,
                     "small_max_s": 12.0, "small_median_s": 0.5, "smalls": 10, "total_s": 260.0,
                     "second_large": {"status": 503, "retry_after": "190", "json": True}},
           "inputs": {"tried": 29, "wrong": [{"body": "{}", "want": 422, "got": 400, "text": "x"}]},
           "shutdown": {"exit_code": 0, "exit_s": 4.0, "client_status": 503, "client_json_or_images": True}}
    md = markdown(env, [row])
    assert "| max 0.40 s of 9 | < 5 s | ok |" in md
    assert "| max 12.00 s of 10 (median 0.50) | < 10 s | MISSED |" in md  # over the target: said, not hidden
    assert "| 503, Retry-After 190 | 503 + Retry-After | ok |" in md
    assert "28/29 with the documented status" in md and "want 422, got 400" in md


@pytest.mark.slow
def test_serve_hostile_end_to_end(tmp_path):
    proc = script("serve_hostile.py", "--stalled", "20", "--timeout", "2", "--large-images", "4", "--large-steps",
                  "100", "--smalls", "2", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = tmp_path.glob("serve-hostile-*.json")
    (row,) = json.loads(report.read_text())["results"]
    assert row["stalled"]["stalled_408"] == 20 and not row["inputs"]["wrong"] and row["ray_left"] == 0
    assert row["shutdown"]["exit_code"] == 0 and row["large"]["large_status"] == 200


def test_reconstruct_quick_writes_its_report(tmp_path, fashion_dir):
    proc = script("reconstruct.py", "--backend", "eager", "--backend", "onnxruntime", "--num-images", "3",
                  "--steps", "2", "--steps", "5", "--batch-size", "2", "--data", str(fashion_dir), "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    (report,) = tmp_path.glob("reconstruct-*.json")
    rows = json.loads(report.read_text())["results"]
    assert [(r["backend"], r["steps"]) for r in rows] == [
        ("eager fp32", 2), ("eager fp32", 5), ("onnxruntime cpu fp32", 2), ("onnxruntime cpu fp32", 5)]
    assert all(r["n"] == 3 and 0 < r["mse"] < 4 and 0 < r["mae_grey"] < 255 for r in rows)
    eager, ort = rows[1], rows[3]
    assert abs(eager["mae_grey"] - ort["mae_grey"]) < 0.5  # the same encoder and decoder on two engines
    stem = str(report)[:-len(".json")]
    assert "| onnxruntime cpu fp32 | 5 |" in Path(stem + ".md").read_text()
    for suffix in (".png", "-grid.png", "-interpolation.png"):
        assert Path(stem + suffix).stat().st_size > 1_000, suffix


def _latency_module():
    sys.path.insert(0, str(ROOT))
    from benchmarks import latency

    return latency


def test_latency_round_robin_with_a_fake_clock_keeps_a_cold_call_out_of_the_median():
    from benchmarks.common import round_robin, summarize

    now = [0.0]
    order: list[str] = []
    costs = {"a": iter([100.0] + [1.0] * 20), "b": iter([2.0] * 21)}  # a's first (cold) call takes 100 s

    def call(name):
        def run():
            order.append(name)
            now[0] += next(costs[name])
        return run

    samples = round_robin({"a": call("a"), "b": call("b")}, rounds=8, clock=lambda: now[0])
    assert order[:4] == ["a", "b", "b", "a"]  # interleaved, the first one rotating each round
    assert samples["a"][0] == 100.0 and len(samples["a"]) == len(samples["b"]) == 8
    kept = summarize(samples["a"], warmup=3)
    assert kept == {"p10_s": 1.0, "p50_s": 1.0, "p90_s": 1.0, "n": 5}
    assert summarize(samples["a"])["p50_s"] == 1.0  # even undiscarded, one outlier cannot move the median
    assert summarize(samples["a"])["p90_s"] > 1.0  # it shows in the spread instead
    assert summarize(samples["b"], warmup=3)["p50_s"] == 2.0
    with pytest.raises(ValueError):
        summarize([1.0, 2.0], warmup=2)
    latency = _latency_module()
    assert 1 <= latency.QUICK_WARMUP and latency.QUICK_REPEATS >= 3  # --quick discards cold calls too


def test_latency_share_above_100_percent_is_flagged_invalid():
    from benchmarks.common import share_label

    assert share_label(0.93) == "93%"
    assert share_label(1.0) == "100%"
    assert share_label(1.6) == "invalid (160% > 100%)"
    latency = _latency_module()
    env = {"cpu": "x", "threads": 2, "torch": "t", "onnxruntime": "o", "openvino": "v", "device": "cpu", "gpu": None,
           "matmul_peak_gflop_s": 100.0, "matmul_peak_source": "torch.matmul", "isa_peak_gflop_s": 200.0,
           "isa_peak_formula": "f", "isa_flags": ["avx512f"]}
    row = {"model": "m", "backend": "b", "kind": "forward", "batch": 1, "p10_s": 0.001, "p50_s": 0.001,
           "median_s": 0.001, "p90_s": 0.002, "images_per_s": 1000.0, "speedup_vs_eager_fp32": 1.0, "gflop_s": 160.0}
    absent = {"model": "m", "backend": "openvino cpu bf16", "kind": "absent", "batch": 0, "absent": "no BF16"}
    md = latency.markdown(env, [row, absent])
    assert "| 80% | invalid (160% > 100%) |" in md and "| 160% |" not in md
    assert "| openvino cpu bf16 | absent: no BF16 |" in md


def test_latency_theoretical_peak_from_cpuinfo():
    from benchmarks.common import theoretical_peak

    avx512 = "processor : 0\nflags : fpu sse2 avx avx2 fma avx512f amx_bf16\ncpu MHz : 2000.000\n"
    peak = theoretical_peak(avx512, cores=2)
    assert peak["gflop_s"] == 2 * 2 * 16 * 2 * 2.0 and peak["lanes_fp32"] == 16 and peak["fma_units_assumed"]
    assert "assumed" in peak["formula"] and "amx_bf16" in peak["isa_flags"]
    avx2 = "flags : sse2 avx avx2 fma\ncpu MHz : 3000.0\nflags : sse2\ncpu MHz : 2900.0\n"
    assert theoretical_peak(avx2, cores=4)["gflop_s"] == 4 * 2 * 8 * 2 * 3.0
    assert theoretical_peak("", cores=2)["gflop_s"] == 0.0  # no clock known: no peak, not a made-up one


def test_latency_measured_peak_never_falls_back_to_numpy_under_openblas_coretype(monkeypatch):
    latency = _latency_module()
    gflops, source = latency.matmul_peak("cpu", size=128, n=3)
    assert gflops > 0 and source.startswith("torch.matmul")

    def broken(*a, **k):
        raise RuntimeError("no torch matmul")

    monkeypatch.setattr(latency.torch, "randn", broken)
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    gflops, source = latency.matmul_peak("cpu", size=128, n=3)
    assert gflops > 0 and source.startswith("numpy")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    gflops, source = latency.matmul_peak("cpu", size=128, n=3)
    assert gflops == 0.0 and "OPENBLAS_CORETYPE" in source


def test_cpu_engines_verdicts_and_report(tmp_path):
    from benchmarks.cpu_engines import eager_verdict, explicit_verdict, markdown, plot

    stats = {"auto": {"p50_s": 2.10}, "onnxruntime/fp32": {"p50_s": 4.0}, "openvino/bf16": {"p50_s": 2.0}}
    assert explicit_verdict(stats, 20) == ("auto vs the fastest explicit pair (openvino/bf16) at 20 steps: 1.050x its "
                                          "time (within 5%)")
    stats["openvino/bf16"]["p50_s"] = 1.9
    assert "1.105x its time (NOT within 5%)" in explicit_verdict(stats, 20)
    eager = {"auto": {"p50_s": 2.0}, "eager torch": {"p50_s": 9.0}}
    assert eager_verdict(eager, 50, vnni=True) == "auto vs eager PyTorch at 50 steps: 4.50x faster (target 5x on a VNNI CPU: NOT met)"
    assert "does not apply" in eager_verdict(eager, 50, vnni=False)
    env = {"cpu": "CPU", "python": "Python 3.11", "onnxruntime": "1", "openvino": "2", "isa_flags": ["avx2"],
           "vnni": False, "repeats": 3, "model": "m", "first_run_s": 3.0}
    rows = [{"check": "auto-vs-explicit", "steps": 20, "config": name, "backend": "line", "p10_s": 1.0, "p50_s": 2.0,
             "p90_s": 3.0, "vs_auto": 1.0} for name in ("auto", "onnxruntime/fp32")]
    md = markdown(env, rows)
    assert "| auto-vs-explicit | 20 | auto | line | 2.00 | 1.00-3.00 | 1.00x |" in md and "VNNI: no" in md
    assert "auto vs the fastest explicit pair (onnxruntime/fp32) at 20 steps: 1.000x its time (within 5%)" in md
    plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
