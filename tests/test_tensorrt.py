"""The TensorRT build, the engine runner and the TensorRT backend, on CPU, through a strict double of the
real TensorRT 10.x and 11.x Python APIs (tests/doubles/tensorrt.py) and a CuPy double (tests/doubles/cupy.py).

A name that a TensorRT version lacks, a wrong argument name or type, or a read-only property that is
set fails here just as it fails on a GPU. The ``-m gpu`` tests in test_export.py / test_runtime.py run
the same paths on real TensorRT.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from conftest import tiny_config
from doubles import cupy as cupy_double
from doubles.tensorrt import VERSIONS, TensorRTDouble
from export.io_spec import BatchProfile
from export.parity import gate_inputs
from export.pipeline import ExportOptions, export_run
from export.tensorrt_build import build_engine, engine_runner, timing_cache_path, unavailable_reason
from runtime.exportdir import REPORT
from runtime.api import load
from runtime.backends import BackendError
from runtime.backends.tensorrt_backend import TensorRTBackend, import_tensorrt
from runtime.config import ModelSpec
from conftest import randomise_weights, tiny_fashion
from trainer.train import fit

ROOT = Path(__file__).resolve().parents[1]
REMOVED_IN_11 = {"BuilderFlag": ["FP16", "OBEY_PRECISION_CONSTRAINTS", "PREFER_PRECISION_CONSTRAINTS"],
                 "ILayer": ["precision", "set_output_type", "reset_precision", "precision_is_set"]}


def test_both_major_versions_have_a_surface():
    assert {v.split(".")[0] for v in VERSIONS} >= {"10", "11"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("trt")
    fit(tiny_config(steps=1, sample_every=1, checkpoint_every=1), tmp / "run", tiny_fashion(tmp), progress=False)
    randomise_weights(tmp / "run")
    return tmp / "run"


@pytest.fixture(params=VERSIONS)
def trt(request, monkeypatch, tmp_path):
    """The double of one TensorRT version as ``tensorrt``, the CuPy double as ``cupy``, a private cache."""
    double = TensorRTDouble(request.param)
    monkeypatch.setitem(sys.modules, "tensorrt", double.module)
    monkeypatch.setitem(sys.modules, "cupy", cupy_double)
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path / "cache"))
    return double


@pytest.fixture
def exported(run_dir, trt, tmp_path):
    """ddim-export --fp16 with the engine built and gated through the double (dynamic batch 1..8)."""
    assert unavailable_reason() is None
    out = tmp_path / "export"
    report = export_run(run_dir, out, ExportOptions(fp16=True, profile=BatchProfile(1, 4, 8)))
    return out, report


def test_engine_is_strongly_typed_from_the_fp16_graph(exported, trt):
    out, report = exported
    major = int(trt.version.split(".")[0])
    (flags,) = [c["flags"] for c in trt.called("Builder.create_network")]
    # TensorRT 10 needs the STRONGLY_TYPED flag; 11 is always strongly typed and has deprecated it.
    assert flags == (1 << int(trt.module.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major == 10 else 0)
    assert not trt.called("IBuilderConfig.set_flag")  # no precision flags: the graph's types decide
    (parsed,) = [c["model"] for c in trt.called("OnnxParser.parse_from_file")]
    assert Path(parsed).name == "model.fp16.onnx"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["precision"] == "fp16" and manifest["onnx_file"] == "model.fp16.onnx"
    assert manifest["tensorrt_version"] == trt.version and manifest["compute_capability"] == "9.0"
    assert manifest["strongly_typed"] is True and manifest["gpu"] == "Fake GPU (CPU stand-in)"
    # The built engine was loaded and its I/O checked before the manifest was written.
    assert {c["name"] for c in trt.called("ICudaEngine.get_tensor_dtype")} == {"noisy_images", "noise_variances",
                                                                            "pred_noises"}
    (engine_gate,) = [r for r in report.parity if r.file == "model.plan"]
    assert engine_gate.provider == "TensorRT" and engine_gate.passed and engine_gate.worst_batch in (1, 4, 8)


def test_export_names_the_trtexec_and_polygraphy_commands(exported):
    out, report = exported
    summary = json.loads((out / REPORT).read_text())
    commands = summary["tensorrt_commands"]
    assert commands == report.tensorrt_commands
    assert commands["trtexec"].startswith("trtexec --onnx=model.fp16.onnx --saveEngine=model.plan --stronglyTyped ")
    assert "--minShapes=noisy_images:1x1x32x32,noise_variances:1x1x1x1" in commands["trtexec"]
    assert "--maxShapes=noisy_images:8x1x32x32,noise_variances:8x1x1x1" in commands["trtexec"]
    assert "--optShapes=noisy_images:4x1x32x32" in commands["trtexec"]
    assert commands["polygraphy"].startswith("polygraphy run model.fp16.onnx --trt --onnxrt --strongly-typed ")
    assert "--trt-min-shapes 'noisy_images:[1,1,32,32]' 'noise_variances:[1,1,1,1]'" in commands["polygraphy"]
    for flag in ("--fp16", "--best", "--int8"):  # weak-typing flags: gone from trtexec 11
        assert flag not in commands["trtexec"].split()


def test_engine_runner_runs_the_engine_on_device_buffers(exported, trt, run_dir):
    out, _ = exported
    spec = ModelSpec.load(run_dir / "config.json")
    run = engine_runner(out / "model.plan", spec)
    reference = ort.InferenceSession(str(out / "model.fp16.onnx"), providers=["CPUExecutionProvider"])
    for feed in gate_inputs(spec, (1, 3, 8)):
        np.testing.assert_array_equal(run(feed), reference.run(["pred_noises"], feed)[0])
    assert all(made == read for _, made, read in trt.stream_log)


def test_tensorrt_backend_samples_as_onnx_runtime_runs_the_same_graph(exported, trt):
    out, _ = exported
    sampler = load(out, backend="tensorrt", device="cuda")
    assert isinstance(sampler.backend, TensorRTBackend) and sampler.backend.precision == "fp16"
    assert sampler.backend.provider == f"TensorRT {trt.version} fp16 engine"
    got = sampler.sample(6, steps=10, seed=2, batch_size=3, clip_x0=True, eta=0.5)
    ref = load(out, backend="onnxruntime", device="cpu", precision="fp16").sample(6, steps=10, seed=2, batch_size=3,
                                                                                   clip_x0=True, eta=0.5)
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1
    # The stream rule: every buffer the engine read was made on the stream the engine ran on.
    assert trt.stream_log and all(made == read for _, made, read in trt.stream_log), trt.stream_log[:4]


def test_one_off_forward_outside_the_loop_uses_the_backends_stream(exported, trt):
    """benchmarks/latency.py times single forwards from host arrays, outside any sampling loop."""
    out, _ = exported
    b = load(out, backend="tensorrt", device="cuda").backend
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32), dtype=np.float32)
    eps = b.to_host(b.denoise(b.from_host(x), 0.3))  # no `with b.context()` around it
    assert np.isfinite(eps).all()
    assert all(made == read for _, made, read in trt.stream_log), trt.stream_log


def test_auto_respects_the_precision_asked_for(exported):
    out, _ = exported
    assert load(out).backend.name == "tensorrt"  # no precision asked: the engine's
    assert load(out, precision="fp16").backend.name == "tensorrt"
    sampler = load(out, precision="fp32")
    assert sampler.backend.name == "onnxruntime" and sampler.backend.model_path.name == "model.onnx"
    assert "TensorRT skipped: the engine is fp16 and --precision fp32 was asked" in sampler.why
    with pytest.raises(BackendError, match="model.plan is a fp16 engine and --precision fp32 was asked"):
        load(out, backend="tensorrt", precision="fp32")
    with pytest.raises(BackendError, match="no model at .*model.int8.onnx"):  # int8 goes to ONNX Runtime, not TensorRT
        load(out, precision="int8")


def test_startup_errors_fall_back_with_a_reason(exported):
    out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["profile"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    sampler = load(out)
    assert sampler.backend.name == "onnxruntime"
    assert "TensorRT skipped: the TensorRT backend could not start: KeyError: 'profile'" in sampler.why
    with pytest.raises(BackendError, match="could not start: KeyError"):
        load(out, backend="tensorrt")


def test_a_plan_from_another_tensorrt_is_refused(exported, trt):
    out, _ = exported
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "tensorrt_version": "10.0.0.1"}))
    with pytest.raises(BackendError, match=f"built for TensorRT version 10.0.0.1, this machine has {trt.version}"):
        load(out, backend="tensorrt")


def test_static_engine_replays_a_captured_graph(run_dir, trt, tmp_path):
    out = tmp_path / "static"
    export_run(run_dir, out, ExportOptions(fp16=True, profile=BatchProfile.static(4)))
    sampler = load(out, backend="tensorrt", device="cuda")
    before = len(trt.called("IExecutionContext.execute_async_v3"))
    got = sampler.sample(4, steps=8, seed=1, batch_size=4)
    runs = len(trt.called("IExecutionContext.execute_async_v3")) - before
    assert runs == 2  # one warm-up enqueue and the captured one; the 8 steps are graph launches
    assert sampler.backend._graph is not None
    ref = load(out, backend="onnxruntime", device="cpu", precision="fp16").sample(4, steps=8, seed=1, batch_size=4)
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1


def test_a_failed_capture_falls_back_without_replaying_garbage(run_dir, trt, tmp_path, caplog):
    out = tmp_path / "static"
    export_run(run_dir, out, ExportOptions(fp16=True, profile=BatchProfile.static(4)))
    trt.fail_capture = True  # execute_async_v3 returns False inside the capture
    sampler = load(out, backend="tensorrt", device="cuda")
    with caplog.at_level(logging.WARNING):
        got = sampler.sample(4, steps=8, seed=1, batch_size=4)
    assert "CUDA-graph capture of the TensorRT engine failed" in caplog.text
    assert sampler.backend._graph is None and not sampler.backend.arrays.stream.capturing  # capture was ended
    ref = load(out, backend="onnxruntime", device="cpu", precision="fp16").sample(4, steps=8, seed=1, batch_size=4)
    assert np.abs(got.images.astype(int) - ref.images.astype(int)).max() <= 1


def test_timing_cache_is_keyed_by_version_and_gpu_and_a_stale_one_is_replaced(exported, trt, run_dir, tmp_path,
                                                                               caplog):
    default = timing_cache_path(trt.version, "9.0")
    assert default.is_file() and f"trt{trt.version}-sm90" in default.name  # written by the export above
    assert all(c["ignore_mismatch"] is False for c in trt.called("IBuilderConfig.set_timing_cache"))
    stale = tmp_path / "stale.cache"
    stale.write_bytes(b"timing cache of another TensorRT on another GPU")
    spec = ModelSpec.load(run_dir / "config.json")
    out, _ = exported
    calls = len(trt.called("IBuilderConfig.set_timing_cache"))
    with caplog.at_level(logging.WARNING):
        build_engine(out / "model.fp16.onnx", tmp_path / "model.plan", spec, BatchProfile(1, 2, 4), stale)
    assert "does not match TensorRT" in caplog.text
    assert len(trt.called("IBuilderConfig.set_timing_cache")) == calls + 2  # refused, then a fresh one
    assert stale.read_bytes() == default.read_bytes()  # replaced by this TensorRT/GPU's cache


def test_engine_io_must_be_float32(exported, trt, run_dir, tmp_path):
    out, _ = exported
    graph = onnx.load(str(out / "model.fp16.onnx"))
    graph.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    onnx.save(graph, str(tmp_path / "half_io.onnx"))
    spec = ModelSpec.load(run_dir / "config.json")
    with pytest.raises(BackendError, match=r"non-float32 I/O \{'noisy_images': 'DataType.HALF'\}"):
        build_engine(tmp_path / "half_io.onnx", tmp_path / "model.plan", spec, BatchProfile(1, 2, 4))


def test_tensorrt_older_than_10_is_refused_by_name(monkeypatch):
    old = TensorRTDouble(VERSIONS[0]).module
    old.__version__ = "8.6.1"
    monkeypatch.setitem(sys.modules, "tensorrt", old)
    with pytest.raises(BackendError, match="TensorRT 8.6.1 is installed; ddim-deploy needs TensorRT 10 or 11"):
        import_tensorrt()
    assert "TensorRT 8.6.1 is installed" in unavailable_reason()


@pytest.mark.parametrize("version", VERSIONS)
def test_the_double_refuses_what_a_version_lacks(version):
    d = TensorRTDouble(version)
    trt = d.module
    layer = d.default("ILayer")
    major = int(version.split(".")[0])
    for enum, names in REMOVED_IN_11.items():
        for name in names:
            owner = getattr(trt, enum) if enum == "BuilderFlag" else layer
            if major == 10:
                getattr(owner, name)  # present in 10.x
            else:
                with pytest.raises(AttributeError, match=f"'{name}'"):
                    getattr(owner, name)
    if major == 11:
        with pytest.raises(AttributeError, match="no attribute 'precision'"):
            layer.precision = trt.float32
    config = d.default("IBuilderConfig")
    with pytest.raises(TypeError, match="incompatible function arguments"):
        config.set_timing_cache(d.default("ITimingCache"), ignore_mismatches=False)  # a misspelt keyword
    with pytest.raises(TypeError, match="incompatible function arguments"):
        config.set_flag(trt.DataType.FLOAT)  # an enum of the wrong type
    with pytest.raises(AttributeError, match="has no setter"):
        d.default("ICudaEngine").num_io_tensors = 3  # read-only


def test_project_names_only_tensorrt_attributes_both_versions_have():
    """A static complement to the double: every ``trt.X`` / ``trt.X.Y`` in the project's code exists in
    TensorRT 10 and 11 (the double only sees the paths the tests run)."""
    sources = [p for d in ("runtime", "export", "benchmarks", "trainer") for p in (ROOT / d).rglob("*.py")]
    used = set()
    for path in sources:
        used |= set(re.findall(r"\btrt\.(\w+)(?:\.(\w+))?", path.read_text()))
    assert ("NetworkDefinitionCreationFlag", "STRONGLY_TYPED") in used
    for version in VERSIONS:
        d = TensorRTDouble(version)
        for name, attr in used:
            obj = getattr(d.module, name)  # AttributeError names the version
            if attr:
                getattr(obj, attr)


def test_step_batching_pads_a_static_engine_and_keeps_the_stream_rule(run_dir, trt, tmp_path):
    """A static batch-4 engine runs a step batch of 3, then 2, images at different steps (padded with copies of the
    last row, the padding's outputs dropped); every image equals the same graph's at batch 1 (ONNX Runtime fp16),
    and every array the engine read was made on its stream."""
    from runtime.settings import SamplingSettings
    from runtime.stepping import StepBatch

    out = tmp_path / "static"
    export_run(run_dir, out, ExportOptions(fp16=True, profile=BatchProfile.static(4)))
    sampler = load(out, backend="tensorrt", device="cuda")
    batch = StepBatch(sampler, 16)
    assert batch.capacity == 4
    jobs = [(1, 0, SamplingSettings(steps=3)), (2, 1, SamplingSettings(steps=5, eta=0.5, clip_x0=True)),
            (3, 0, SamplingSettings(steps=4, solver="dpmpp-2m"))]
    batch.add(jobs[0], *jobs[0])
    batch.step()
    for job in jobs[1:]:
        batch.add(job, *job)
    got = {}
    while len(batch):
        for f in batch.step():
            assert f.error is None, f.error
            got[f.lane.key] = f.sample
    ref = load(out, backend="onnxruntime", device="cpu", precision="fp16")
    for job in jobs:
        np.testing.assert_array_equal(got[job], ref.sample_images([job[:2]], job[2]).samples[0])
    assert trt.stream_log and all(made == read for _, made, read in trt.stream_log), trt.stream_log[:4]
