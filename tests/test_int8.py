"""INT8 export: calibration across the schedule, what stays float32, the quality gate, the runtime."""

from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
import pytest
from conftest import LOOSE
from test_export import cli, one_line_error

from export.int8 import (KEEP_FLOAT, GateOptions, Int8Options, calibration_batches, data_pairs, float_nodes,
                         quality_gate, stratified_steps)
from export.io_spec import input_names_of
from export.onnx_graph import embedding_nodes
from runtime.exportdir import REPORT
from runtime.api import load
from runtime.backends import precision
from runtime.config import ScheduleConfig
from runtime.schedule import build_schedule, noise_variance
from trainer.data import model_split_images
from trainer.rundir import read_spec

def test_int8_file_is_quantized_except_what_is_kept_float(int8_export):
    out, log = int8_export
    graph = onnx.load(str(out / "model.int8.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    meta = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(meta["ddim_deploy.config"])["export"]["precision"] == "int8"
    nodes = {n.name: n for n in graph.graph.node}
    dq_outputs = {o for n in graph.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    q_inputs = {i for n in graph.graph.node if n.op_type == "QuantizeLinear" for i in n.input}
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    reads_int8 = [c for c in convs if any(i in dq_outputs for i in c.input[1:])]  # int8 weights
    assert len(reads_int8) == len(convs) - 2  # all but the first and the last
    assert not any(i in dq_outputs for i in convs[0].input[1:]) and not any(i in dq_outputs for i in convs[-1].input[1:])
    fp32 = onnx.load(str(out / "model.onnx"))
    for name in embedding_nodes(fp32.graph):  # the angles never pass through 8 bits
        assert not any(i in dq_outputs for i in nodes[name].input), name
        assert not any(o in q_inputs for o in nodes[name].output if nodes[name].op_type == "Mul"), name
    report = json.loads((out / REPORT).read_text())["int8"]
    assert [k.split(" ")[0] for k in report["kept_float32"]] == ["embedding", "first", "last"]
    assert report["gate"]["passed"] and report["gate"]["n"] == 4
    assert "INT8 quality gate on 4 images x 50 steps" in log and "kept in float32 in the INT8 graph" in log


def test_runtime_runs_int8_close_to_float32(int8_export):
    out, _ = int8_export
    fp32 = load(out, "onnxruntime", "cpu", "fp32").sample(4, steps=5, seed=3)
    int8 = load(out, "onnxruntime", "cpu", "int8")
    assert int8.backend.model_path.name == "model.int8.onnx"
    got = int8.sample(4, steps=5, seed=3)
    assert got.images.shape == fp32.images.shape and np.isfinite(got.samples).all()
    # Quantized, not identical, but tracking the float32 model (outputs are of unit scale).
    err = np.abs(got.samples - fp32.samples).mean() / np.abs(fp32.samples).mean()
    assert 0 < err < 0.5


def test_gate_failure_writes_nothing(run_dir, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    proc = cli(str(run_dir), "--out", str(out), "--int8", "--data", str(run_dir.parent / "fmnist"),
               "--int8-gate-images", "4", "--int8-calibration-size", "16", "--int8-min-psnr", "300")
    one_line_error(proc, r"INT8 quality gate failed: same-noise PSNR .* < 300 dB; nothing was written")
    assert not out.exists()


def test_a_named_gate_classifier_that_cannot_load_stops_the_export(run_dir, tmp_path):  # noqa: F811
    (tmp_path / "cls").mkdir()  # no classifier in it: the FD half of the gate is not skipped silently
    out = tmp_path / "out"
    proc = cli(str(run_dir), "--out", str(out), "--int8", "--data", str(run_dir.parent / "fmnist"), *LOOSE,
               "--int8-classifier", str(tmp_path / "cls"))
    one_line_error(proc, r"no Fashion-MNIST classifier in .*cls")
    assert not out.exists()


def test_calibration_spans_the_schedule():
    spec_schedule = ScheduleConfig(name="linear", num_timesteps=1000)
    rng = np.random.default_rng(0)

    class Spec:
        schedule = spec_schedule

    t = stratified_steps(Spec, 64, rng)  # type: ignore[arg-type]
    assert t.dtype.kind == "i"
    v = np.sort(noise_variance(build_schedule(spec_schedule), t))
    full = noise_variance(build_schedule(spec_schedule), np.arange(1000))
    # One draw per stratum of 1000/64 steps: from the cleanest to the noisiest end.
    assert v[0] <= full[16] and v[-1] >= full[1000 - 16]
    assert np.all(np.diff(v) > 0)


def test_data_pairs_noise_real_images(run_dir):  # noqa: F811
    spec = read_spec(run_dir)
    images = np.full((5, 1, 32, 32), 255, np.uint8)
    pairs = list(data_pairs(spec, images, 40, np.random.default_rng(0)))
    assert len(pairs) == 40 and pairs[0][0].shape == (1, 32, 32)
    x0 = (1.0 - spec.normalization.mean[0]) / spec.normalization.std[0]
    schedule = build_schedule(spec.schedule)
    for x, v, t in pairs:  # the clean part of x_t is sqrt(1 - v) * x0; the rest is unit Gaussian noise of variance v
        step = np.array([t]).astype(np.int64 if schedule.discrete else np.float64)
        assert v == pytest.approx(float(noise_variance(schedule, step)[0]), rel=1e-6)
        resid = x - np.sqrt(1 - v) * x0
        assert abs(resid.std() - np.sqrt(v)) < 0.1


def test_calibration_mixes_data_and_sampler_trajectories(int8_export, run_dir):  # noqa: F811
    out, _ = int8_export
    spec = read_spec(run_dir)
    images = np.zeros((8, 1, 32, 32), np.uint8)
    feeds = calibration_batches(out / "model.onnx", spec, lambda: images,
                                Int8Options(calibration="both", calibration_size=40, calibration_steps=5, batch=16))
    assert [len(f["noisy_images"]) for f in feeds] == [16, 16, 8]
    cond = input_names_of(spec.model)[1]  # noise variances, or timesteps for the ddpm run
    values = np.concatenate([f[cond].ravel() for f in feeds])
    assert len(np.unique(values)) < 40  # trajectories share their steps; data pairs do not


def test_float_nodes_refuses_unknown_parts(int8_export):
    out, _ = int8_export
    graph = onnx.load(str(out / "model.onnx")).graph
    assert float_nodes(graph, ())[0] == []
    assert len(float_nodes(graph, KEEP_FLOAT)[1]) == 3
    with pytest.raises(ValueError, match="cannot keep attention"):
        float_nodes(graph, ("attention",))


def test_quantizer_asks_for_pre_processing_at_most_once(int8_export):
    _, log = int8_export
    # ONNX Runtime's quantizer logs "Please consider (to run) pre-processing before quantization" twice per
    # call unless the model went through its pre-processing.
    assert log.count("pre-processing before quantization") <= 1, log


def test_gate_shows_progress_unless_told_not_to(int8_export, run_dir, capsys):  # noqa: F811
    out, log = int8_export
    assert "INT8 quality gate: 100%" in log and "100/100" in log  # the export's default: 2 files x 50 steps x 1 batch
    spec = read_spec(run_dir)
    images = lambda: model_split_images(spec, "train", run_dir.parent / "fmnist")  # noqa: E731
    for progress in (False, True):
        gate = quality_gate(out / "model.onnx", out / "model.int8.onnx", spec, images,
                            GateOptions(images=2, steps=3, reference_images=16), progress)
        err = capsys.readouterr().err
        assert gate.n == 2 and ("INT8 quality gate" in err and "6/6" in err) == progress, err



# ---- precision auto: model.int8.onnx where it passed its gate and is faster on this CPU ----------------------
def test_export_records_int8_timing_and_says_it_in_one_line(int8_export):
    out, log = int8_export
    int8 = json.loads((out / REPORT).read_text())["int8"]
    timing = int8["timing"]
    assert sorted(timing["batch"], key=int) == ["1", "16"] and timing["speedup_batch"] == 16
    for row in timing["batch"].values():
        assert row["fp32_ms"] > 0 and row["int8_ms"] > 0 and row["repeats"] >= 3
        assert row["speedup"] == pytest.approx(row["fp32_ms"] / row["int8_ms"], rel=1e-3)
    assert timing["speedup"] == timing["batch"]["16"]["speedup"]
    assert timing["host"] == precision.host_fingerprint()
    assert int8["sha256"] == {name: precision.sha256_file(out / name) for name in precision.FILES}
    (line,) = [line for line in log.splitlines() if line.startswith("INT8 is ")]
    faster = f"INT8 is {timing['speedup']:.2f}x faster than float32 on this CPU (batch 16: "
    slower = f"INT8 is not faster here ({timing['speedup']:.2f}x; batch 16: "
    assert line.startswith(faster if timing["speedup"] > 1 else slower), line
    assert line.endswith("model.int8.onnx" if timing["speedup"] > 1 else "ddim-run on this CPU will use model.onnx")


@pytest.fixture
def timings(tmp_path, monkeypatch) -> list[Any]:
    """A private, empty cache; the process's cache state clean; every timing of both files recorded."""
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path / "cache"))
    for name in precision.VERDICT_SWITCHES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(precision, "_unwritable", set())
    calls: list[Any] = []
    real = precision.time_forwards

    def counted(*args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(real(*args, **kwargs))
        return calls[-1]

    monkeypatch.setattr(precision, "time_forwards", counted)
    return calls


def copy_export(out: Path, dest: Path, edit: Callable[[dict], Any] | None = None,
                files: tuple[str, ...] = precision.FILES) -> Path:
    """``out``'s model files and report in ``dest``; ``edit`` changes the report (or returns its new text)."""
    dest.mkdir()
    for name in files:
        shutil.copy2(out / name, dest / name)
    report = json.loads((out / REPORT).read_text())
    text = edit(report) if edit else None
    (dest / REPORT).write_text(text if isinstance(text, str) else json.dumps(report))
    return dest


def recorded(speedup: float) -> Callable[[dict], None]:
    return lambda r: r["int8"]["timing"].update(speedup=speedup)


def cpu(folder: Path, prec: Any = None) -> Any:
    return load(folder, "onnxruntime", "cpu", prec)


@pytest.mark.parametrize("speedup", [1.5, 0.5])
def test_auto_takes_the_export_timing_on_the_same_host(int8_export, tmp_path, timings, speedup):
    folder = copy_export(int8_export[0], tmp_path / "x", recorded(speedup))
    for prec in (None, "auto"):  # auto is the default
        sampler = cpu(folder, prec)
        if speedup > 1:
            assert sampler.backend.model_path.name == "model.int8.onnx"
            assert "precision auto: int8, 1.50x faster than fp32 on this CPU, measured at export" in sampler.why
        else:
            assert sampler.backend.model_path.name == "model.onnx"
            assert "precision auto: fp32, INT8 0.50x here, measured at export" in sampler.why
    assert timings == []


def test_auto_measures_on_another_host_and_caches_the_verdict(int8_export, tmp_path, timings, monkeypatch, caplog):
    folder = copy_export(int8_export[0], tmp_path / "x", recorded(100.0))  # recorded on "another CPU": ignored
    host = {**precision.host_fingerprint(), "cpu": "another CPU"}
    monkeypatch.setattr(precision, "host_fingerprint", lambda threads=None: host)
    first = cpu(folder)
    assert len(timings) == 1 and timings[0]["host"] == host and "measured now" in first.why
    measured = timings[0]["speedup"]
    want = "model.int8.onnx" if measured > 1 else "model.onnx"
    assert first.backend.model_path.name == want and f"{measured:.2f}x" in first.why
    second = cpu(folder)
    assert len(timings) == 1 and second.backend.model_path.name == want
    assert "measured earlier on this CPU" in second.why
    (verdict,) = (tmp_path / "cache").rglob("*.json")  # the only file written
    assert verdict.parent == tmp_path / "cache" / "int8-verdicts" and re.fullmatch(r"[0-9a-f]{32}\.json", verdict.name)
    assert not list(verdict.parent.glob(".*.tmp"))  # written by atomic rename: no temporary file left
    body = json.loads(verdict.read_text())
    foreign = {k: v for k, v in body.items() if k != "checksum"} | {"host": {**host, "cpu": "a third CPU"}}
    foreign["checksum"] = precision._checksum(foreign)  # whole and self-consistent, for another host
    for broken in ("{torn", json.dumps({**body, "timing": {**body["timing"], "speedup": 1 / measured}}),
                   json.dumps(foreign)):
        verdict.write_text(broken)  # torn, edited (its checksum no longer matches) or foreign: timed again, rewritten
        with caplog.at_level(logging.WARNING):
            again = cpu(folder)
        assert "measured now" in again.why and again.backend.model_path.name == (
            "model.int8.onnx" if timings[-1]["speedup"] > 1 else "model.onnx")
        assert "cannot be used" in caplog.text
        caplog.clear()
    assert len(timings) == 4 and "measured earlier" in cpu(folder).why and len(timings) == 4


@pytest.mark.parametrize("edit, why", [
    (lambda r: "{torn", "export_report.json does not record its quality gate (JSONDecodeError)"),
    (lambda r: r["int8"]["gate"].update(passed=False), "export_report.json does not record a passed quality gate"),
    (lambda r: r.update(int8={}), "export_report.json does not record its quality gate (KeyError)"),
    (lambda r: r["int8"]["sha256"].update({"model.int8.onnx": "0" * 64}),
     "model.onnx or model.int8.onnx changed since the export gated them"),
])
def test_auto_never_takes_an_ungated_file(int8_export, tmp_path, timings, edit, why):
    folder = copy_export(int8_export[0], tmp_path / "x", lambda r: recorded(9.0)(r) or edit(r))
    sampler = cpu(folder)
    assert sampler.backend.model_path.name == "model.onnx" and f"precision auto: fp32, INT8 not used: {why}" in \
        sampler.why
    assert timings == []
    assert cpu(folder, "int8").backend.model_path.name == "model.int8.onnx"  # asked for: always taken


@pytest.mark.parametrize("timing", ["fast", {"speedup": "fast"}, {"speedup": float("nan")}, None])
def test_auto_measures_when_the_recorded_timing_is_unusable(int8_export, tmp_path, timings, timing):
    folder = copy_export(int8_export[0], tmp_path / "x", lambda r: r["int8"].update(timing=timing))
    sampler = cpu(folder)
    assert len(timings) == 1 and "measured now" in sampler.why
    assert (sampler.backend.model_path.name == "model.int8.onnx") == (timings[0]["speedup"] > 1)


def test_auto_without_an_int8_file_reads_nothing(int8_export, tmp_path, timings, monkeypatch):
    folder = copy_export(int8_export[0], tmp_path / "x", files=("model.onnx",))

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("read")

    for name in ("read_capped", "sha256_file", "host_fingerprint"):
        monkeypatch.setattr(precision, name, refuse)
    sampler = cpu(folder)
    assert sampler.backend.model_path.name == "model.onnx" and "precision auto" not in sampler.why
    assert timings == []


def test_explicit_precision_wins(int8_export, tmp_path, timings):
    folder = copy_export(int8_export[0], tmp_path / "x", recorded(0.5))
    assert cpu(folder, "int8").backend.model_path.name == "model.int8.onnx"
    folder = copy_export(int8_export[0], tmp_path / "y", recorded(2.0))
    assert cpu(folder, "fp32").backend.model_path.name == "model.onnx"
    assert timings == []


def test_verdicts_follow_the_cache_switches(int8_export, tmp_path, timings, monkeypatch, caplog):
    folder = copy_export(int8_export[0], tmp_path / "x", lambda r: r["int8"].pop("timing"))  # an older export
    monkeypatch.setenv("DDIM_DEPLOY_INT8_CACHE", "0")
    cpu(folder)
    cpu(folder)
    assert len(timings) == 2 and not (tmp_path / "cache").exists()
    monkeypatch.delenv("DDIM_DEPLOY_INT8_CACHE")
    for name in ("DDIM_DEPLOY_INT8_CACHE", "DDIM_DEPLOY_ORT_CACHE"):  # the older name still turns verdicts off
        for value, on in (("off", False), (" No ", False), ("1", True), ("", True)):
            monkeypatch.setenv(name, value)
            assert precision.verdicts_enabled() is on, (name, value)
        monkeypatch.delenv(name)

    def read_only(*args: Any, **kwargs: Any) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(precision, "atomic_write_text", read_only)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            assert "measured now" in cpu(folder).why
    assert len(timings) == 4
    (line,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert re.match(r"INT8 timing verdicts not cached for this process: cannot write to .*int8-verdicts "
                    r"\(Permission denied\)", line), line
