"""ONNX Runtime sessions as a hostile world meets them, and metadata that lies about sizes.

Sessions are built from the model's bytes and optimised in memory: nothing is written to disk, so a full
or read-only cache folder changes nothing and warns about nothing. A broken model is named in one line. A
model whose metadata claims images its graph does not take is refused before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import resource
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from faults import ROOT, SHIPPED, cli, one_error_line, shipped_export, small_disk, snapshot
from runtime.backends import BackendError
from runtime.backends.ort_backend import OrtBackend, session_options
from runtime.metadata import METADATA_KEY

FAST = ("--steps", "2", "--num-images", "2", "--no-progress")


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return shipped_export(tmp_path / "exports" / "fm")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``DDIM_DEPLOY_CACHE`` of this test."""
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


X = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)


def reference(export: Path) -> np.ndarray:
    """The model's outputs from a plain session with the backend's options."""
    session = ort.InferenceSession((export / "model.onnx").read_bytes(), session_options(),
                                   providers=["CPUExecutionProvider"])
    v = np.full((2, 1, 1, 1), 0.5, dtype=np.float32)
    return session.run(["pred_noises"], {"noisy_images": X, "noise_variances": v})[0]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def with_metadata(src: Path, dest: Path, **model: object) -> Path:
    """``src`` with its metadata's ``model`` section updated by ``model``."""
    graph = onnx.load(str(src))
    for prop in graph.metadata_props:
        if prop.key == METADATA_KEY:
            data = json.loads(prop.value)
            data["model"].update(model)
            prop.value = json.dumps(data, sort_keys=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(dest))
    return dest


# ---- nothing written ------------------------------------------------------------------------------------------
def test_sessions_are_optimised_in_memory_and_write_nothing(export, cache, tmp_path, caplog):
    cache.mkdir()
    (cache / "notes.txt").write_text("mine")
    before = snapshot(tmp_path)
    with caplog.at_level(logging.WARNING):
        backends = [OrtBackend(export) for _ in range(2)]
    for backend in backends:
        options = backend.session.get_session_options()
        assert options.optimized_model_filepath == ""  # ONNX Runtime saves no optimised graph
        assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        np.testing.assert_allclose(backend.denoise(X, 0.5), reference(export), rtol=0, atol=1e-5)
    assert snapshot(tmp_path) == before and not warnings(caplog)


def test_ddim_run_on_a_full_cache_disk_exits_0_without_a_warning(export, tmp_path):
    def run(cache: Path, png: str) -> list[str]:
        proc = cli("runtime.cli", str(export), *FAST, "--out", str(tmp_path / png),
                   env={"DDIM_DEPLOY_CACHE": str(cache)}, timeout=120)
        assert proc.returncode == 0 and (tmp_path / png).is_file(), proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and "EP Error" not in proc.stdout + proc.stderr
        return [line.split(":")[0] for line in proc.stderr.splitlines()]

    disk = tmp_path / "full"
    with small_disk(disk, "1m"):
        full = run(disk, "a.png")
        assert not list(disk.iterdir())
    assert full == run(tmp_path / "roomy", "b.png")  # the same lines as with room to spare: no warning
    assert not (tmp_path / "roomy").exists()


def test_a_broken_model_is_named_in_one_error(tmp_path, cache, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(SHIPPED.joinpath("model.onnx").read_bytes()[:100_000])
    with pytest.raises(BackendError, match=f"^cannot load {re.escape(str(bad / 'model.onnx'))}: "), \
            caplog.at_level(logging.WARNING):
        OrtBackend(bad)
    assert not warnings(caplog) and not cache.exists()


# ---- metadata that lies about the image size -------------------------------------------------------------------
def huge_export(tmp_path: Path) -> Path:
    out = shipped_export(tmp_path / "huge")
    with_metadata(SHIPPED / "model.onnx", out / "model.onnx", image_size=65536)
    return out


def test_metadata_larger_than_the_graph_is_refused_before_any_allocation(tmp_path, cache):
    from runtime.api import load

    model = huge_export(tmp_path) / "model.onnx"
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(BackendError) as err:
            load(model.parent, backend="onnxruntime", device="cpu")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert str(err.value) == (f"{model}: metadata says 1x65536x65536 images, the graph takes 1x32x32 (noisy_images); "
                              "not a model ddim-export wrote, or its metadata was changed")
    assert time.perf_counter() - start < 10 and peak < 64 * 2**20  # 1x65536x65536 float32 noise is 16 GiB


def test_ddim_run_refuses_lying_metadata_in_one_line(tmp_path):
    out = huge_export(tmp_path)
    cap = 4 * 2**30  # the old behaviour tried to allocate 32 GiB: make that fail fast, not swap

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))

    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDIM_DEPLOY_CACHE": str(tmp_path / "c")}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", str(out), *FAST, "--out", str(tmp_path / "s.png")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, preexec_fn=limited)
    line = one_error_line(proc)
    assert line == (f"error: {out / 'model.onnx'}: metadata says 1x65536x65536 images, the graph takes 1x32x32 "
                    "(noisy_images); not a model ddim-export wrote, or its metadata was changed"), line
    assert "MemoryError" not in proc.stderr and not (tmp_path / "s.png").exists()
    assert time.perf_counter() - start < 30


def test_symbolic_graph_sizes_are_taken_only_for_small_images(tmp_path, cache):
    spec = OrtBackend(shipped_export(tmp_path / "fm")).spec
    from runtime.backends.ort_backend import check_image_dims

    check_image_dims(["batch", 1, "h", "w"], spec, "noisy_images", "m.onnx")  # 32x32: taken
    huge = dataclasses.replace(spec, model=dataclasses.replace(spec.model, image_size=4096))
    with pytest.raises(BackendError, match=r"^m.onnx: metadata says 1x4096x4096 images, and the graph's noisy_images "
                                           r"does not fix its sizes \(\?x\?x\?\); refusing images over 1024"):
        check_image_dims(["batch", None, "h", "w"], huge, "noisy_images", "m.onnx")


@pytest.mark.parametrize("sizes", ["static", "symbolic"])
def test_tensorrt_engine_smaller_than_its_manifest_is_refused(tmp_path, cache, monkeypatch, sizes):
    from doubles import cupy as cupy_double
    from doubles.tensorrt import VERSIONS, TensorRTDouble

    from export.io_spec import BatchProfile
    from export.tensorrt_build import build_engine, write_manifest
    from runtime.backends.tensorrt_backend import TensorRTBackend

    double = TensorRTDouble(VERSIONS[-1])
    monkeypatch.setitem(sys.modules, "tensorrt", double.module)
    monkeypatch.setitem(sys.modules, "cupy", cupy_double)
    out = shipped_export(tmp_path / "trt")
    spec = OrtBackend(out).spec
    if sizes == "symbolic":  # H and W set at run time: the engine's profile pins them to 32
        graph = onnx.load(str(out / "model.onnx"))
        for value in (graph.graph.input[0], graph.graph.output[0]):
            for i, name in ((2, "h"), (3, "w")):
                value.type.tensor_type.shape.dim[i].dim_param = name
        onnx.save(graph, str(out / "model.onnx"))
    manifest = build_engine(out / "model.onnx", out / "model.plan", spec, BatchProfile(1, 2, 4))
    write_manifest(out / "manifest.json", manifest)
    TensorRTBackend(out, "cuda")  # the true sizes load
    manifest["config"]["model"]["image_size"] = 65536
    write_manifest(out / "manifest.json", manifest)
    with pytest.raises(BackendError) as err:
        TensorRTBackend(out, "cuda")
    assert str(err.value) == (f"{out / 'model.plan'}: manifest.json says 1x65536x65536 images, the engine takes "
                              "1x32x32 (noisy_images); not a model ddim-export wrote, or its manifest.json was changed")
