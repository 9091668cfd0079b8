"""Gates per (engine, precision) at ddim-export --int8: OpenVINO int8 / bf16 through the INT8 quality gate, OpenVINO
fp32 by parity with ONNX Runtime float32, recorded under engine_gates of export_report.json, never fatal."""

from __future__ import annotations

import json
import sys

import pytest

import quality
from export import engine_gates
from export.int8 import GateOptions, Int8Options
from export.parity import ParityResult
from export.pipeline import ExportOptions, export_run
from runtime.exportdir import REPORT
from runtime.common.files import sha256_file

KEYS = {"openvino/int8", "openvino/bf16", "openvino/fp32"}


@pytest.fixture(scope="module", autouse=True)
def gates_on():
    """The other tests turn the engine gates off (tests/conftest.py); these measure them."""
    import os

    before = os.environ.get(engine_gates.SWITCH)
    os.environ[engine_gates.SWITCH] = "1"
    yield
    if before is None:
        os.environ.pop(engine_gates.SWITCH, None)
    else:
        os.environ[engine_gates.SWITCH] = before
LOOSE_OPTIONS = dict(int8=True, int8_options=Int8Options(calibration_size=32),
                     int8_gate=GateOptions(images=4, min_psnr_db=0, max_fd_ratio=1000), progress=False)


def has_bf16() -> bool:
    from runtime.backends import openvino_backend

    return "BF16" in openvino_backend.cpu_capabilities(openvino_backend.ov.Core())


def export(run_dir, out, **kw):  # noqa: F811
    export_run(run_dir, out, ExportOptions(data_path=run_dir.parent / "fmnist", **LOOSE_OPTIONS, **kw))
    return json.loads((out / REPORT).read_text())


def test_export_records_engine_gates(int8_export):  # noqa: F811
    pytest.importorskip("openvino")
    out, log = int8_export
    report = json.loads((out / REPORT).read_text())
    gates = report["engine_gates"]
    assert set(gates) == KEYS
    assert report["int8"]["gate"]["passed"] is True  # the ONNX Runtime INT8 gate is where it was
    for name in ("openvino/int8", "openvino/bf16"):
        record = gates[name]
        if name == "openvino/bf16" and not has_bf16():
            assert record["status"] == "skipped" and "bfloat16" in record["why"] and record["passed"] is False
            continue
        assert record["status"] == "measured", record
        assert set(report["int8"]["gate"]) <= set(record)  # the figures the INT8 gate records
        assert isinstance(record["passed"], bool) and record["passed"] == (not record["failures"])
        assert record["n"] == 4 and record["psnr_db"] > 0
        assert record["file"] == ("model.int8.onnx" if name.endswith("int8") else "model.onnx")
        assert record["sha256"] == sha256_file(out / record["file"])
        assert record["parity"]["max_rel"] >= 0
    fp32 = gates["openvino/fp32"]
    assert fp32["status"] == "measured" and fp32["file"] == "model.onnx"
    assert fp32["passed"] is True and fp32["parity"]["max_rel"] < fp32["parity"]["tolerance"] == 1e-4
    assert "openvino/fp32 gate:" in log and "openvino/int8 gate:" in log


@pytest.mark.parametrize("run_dir", ["keras"], indirect=True)
def test_without_openvino_the_gates_are_recorded_as_skipped(run_dir, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    gates = export(run_dir, tmp_path / "out")["engine_gates"]
    assert set(gates) == KEYS
    for record in gates.values():
        assert record["status"] == "skipped" and "OpenVINO is not installed" in record["why"]
        assert record["passed"] is False


@pytest.mark.parametrize("run_dir", ["keras"], indirect=True)
def test_a_failing_openvino_gate_never_fails_the_export(run_dir, tmp_path, monkeypatch):  # noqa: F811
    pytest.importorskip("openvino")
    real_psnr, calls = quality.psnr, []

    def psnr(a, b):  # the ONNX Runtime INT8 gate measures first; every later (OpenVINO) PSNR is made bad
        calls.append(1)
        return real_psnr(a, b) if len(calls) == 1 else -1.0

    def compare(*args, **kwargs):  # OpenVINO fp32 measured far from ONNX Runtime float32
        return ParityResult(args[2], args[4], 0.5, 0.5, args[5], 3)

    monkeypatch.setattr(quality, "psnr", psnr)
    monkeypatch.setattr(engine_gates, "compare", compare)
    report = export(run_dir, tmp_path / "out")
    assert (tmp_path / "out" / "model.int8.onnx").is_file()
    assert report["int8"]["gate"]["passed"] is True
    gates = report["engine_gates"]
    assert gates["openvino/fp32"]["passed"] is False and gates["openvino/fp32"]["parity"]["max_rel"] == 0.5
    measured = ["openvino/int8"] + (["openvino/bf16"] if has_bf16() else [])
    for name in measured:
        assert gates[name]["passed"] is False and gates[name]["psnr_db"] == -1.0
        assert gates[name]["failures"] == ["same-noise PSNR -1.0 dB < 0 dB"]


def test_an_engine_that_cannot_run_is_recorded_not_fatal(int8_export, run_dir, monkeypatch):  # noqa: F811
    pytest.importorskip("openvino")
    from export.int8 import SameNoiseGate
    from runtime.backends.openvino_backend import OpenVinoBackend
    from trainer.rundir import read_spec

    def broken(self, n):
        raise RuntimeError("Exception from src/x.cpp:1:\nno kernel for this node")

    monkeypatch.setattr(OpenVinoBackend, "_request", broken)
    out, _ = int8_export
    spec = read_spec(run_dir)
    gates = engine_gates.measure(out, spec, SameNoiseGate(out / "model.onnx", spec, None,
                                                          GateOptions(images=2, steps=2), progress=False))
    for name in ("openvino/int8", "openvino/fp32"):
        assert gates[name]["status"] == "error" and gates[name]["passed"] is False
        assert gates[name]["why"] == "no kernel for this node"
