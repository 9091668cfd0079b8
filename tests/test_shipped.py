"""The models shipped in models/: they load, agree with their ONNX file, and every card command
falls back to them when there is nothing newer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from export.parity import FP32_TOLERANCE, check_file
from runtime.common.files import sha256_file
from runtime.metadata import METADATA_KEY
from runtime.common.shipped import SHIPPED_CLASSIFIER, SHIPPED_MODEL
from trainer.rundir import load_model
from trainer.models import count_parameters

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_shipped_model_is_the_fashion_mnist_preset_with_ema_weights_only():
    model, spec = load_model(SHIPPED_MODEL)
    assert spec.extra["preset"] == "fashion-mnist" and count_parameters(model) == 818_785
    from trainer.rundir import load_weights

    assert all(k.startswith("ema.") for k in load_weights(SHIPPED_MODEL / "model.safetensors"))
    size = sum(p.stat().st_size for p in SHIPPED_MODEL.iterdir()) + sum(p.stat().st_size for p in
                                                                         SHIPPED_CLASSIFIER.iterdir())
    assert size < 12e6  # small enough for the repository
    for name in ("config.json", "model.onnx", "samples.png", "loss.csv", "loss.png", "train.log", "README.md"):
        assert (SHIPPED_MODEL / name).is_file(), name


def test_shipped_onnx_is_the_shipped_weights():
    import onnx

    model, spec = load_model(SHIPPED_MODEL)
    data = (SHIPPED_MODEL / "model.onnx").read_bytes()
    meta = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert json.loads(meta[METADATA_KEY])["export"]["weights_sha256"] == sha256_file(SHIPPED_MODEL / "model.safetensors")
    result = check_file(model, data, "model.onnx", spec, "CPUExecutionProvider", FP32_TOLERANCE)
    assert result.passed, result.line()


def test_shipped_int8_file_and_its_gates_are_for_these_files():
    """The shipped folder carries model.int8.onnx and the report of its gates (scripts/ship_model.py --int8), so the
    default ddim-run picks among gated engines and precisions; every recorded sha256 is the file's now."""
    report = json.loads((SHIPPED_MODEL / "export_report.json").read_text())
    assert report["int8"]["gate"]["passed"] is True
    assert report["int8"]["sha256"] == {name: sha256_file(SHIPPED_MODEL / name) for name in ("model.onnx",
                                                                                              "model.int8.onnx")}
    for label, gate in report["engine_gates"].items():
        assert gate["status"] in ("measured", "skipped"), label
        if gate["passed"]:
            assert gate["sha256"] == sha256_file(SHIPPED_MODEL / gate["file"]), label
    assert report["engine_gates"]["openvino/int8"]["passed"] is True  # the pair auto picked on the shipping host
    assert sorted(report["files"]) == ["export_report.json", "model.int8.onnx", "model.onnx"]
    assert report["source"]["folder"] == "fashion-mnist"  # no path of the shipping machine
    timing = report["cpu_timing"]
    assert "onnxruntime/fp32" in timing["pairs"] and "openvino/int8" in timing["pairs"]
    from runtime.backends.registry import open_backend

    backend, _ = open_backend(SHIPPED_MODEL, "onnxruntime", "cpu", "int8")
    assert backend.model_path == SHIPPED_MODEL / "model.int8.onnx"


def test_ddim_run_and_ddim_export_fall_back_to_the_shipped_model(tmp_path):
    proc = run("-m", "runtime.cli", "--num-images", "2", "--steps", "3", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == f"ddim-run: {SHIPPED_MODEL} (the shipped model: no export under exports/)"
    assert (tmp_path / "samples.png").is_file()
    proc = run("-m", "export.cli", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    first = proc.stderr.splitlines()[0]
    assert first == f"ddim-export: {SHIPPED_MODEL} (the shipped model: no run under runs/) -> exports/fashion-mnist (fp32)"
    assert (tmp_path / "exports" / "fashion-mnist" / "model.onnx").is_file()
    # Now an export exists: ddim-run takes it.
    proc = run("-m", "runtime.cli", "--num-images", "2", "--steps", "3", "--no-progress", cwd=tmp_path)
    assert proc.stderr.splitlines()[0] == "ddim-run: exports/fashion-mnist (the latest export under exports/)"


def test_latency_defaults_to_the_shipped_model():
    sys.path.insert(0, str(ROOT))
    from benchmarks.latency import load_subject

    assert load_subject(str(SHIPPED_MODEL)).name == "models/fashion-mnist"


def test_shipped_classifier_accuracy_holds():
    from quality.classifier import load_classifier, predict
    from trainer.data import fit_idx_images
    from trainer.data.fashion_mnist import load_fashion_mnist, locate
    from trainer.errors import DatasetError

    model, info = load_classifier(SHIPPED_CLASSIFIER)
    assert info.test_accuracy > 0.9
    try:
        locate(None, "test", download=False)
    except DatasetError as exc:
        pytest.skip(f"Fashion-MNIST not installed (no download in tests): {exc}")
    images, labels = load_fashion_mnist(None, "test")
    pick = np.random.default_rng(0).choice(len(images), 2000, replace=False)
    accuracy = (predict(model, fit_idx_images(images[pick], 32)) == labels[pick]).mean()
    assert accuracy == pytest.approx(info.test_accuracy, abs=0.02)
