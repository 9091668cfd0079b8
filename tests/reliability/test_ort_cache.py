"""ONNX Runtime's optimised-graph cache as a hostile world meets it, and metadata that lies about sizes.

A full, read-only or tampered cache costs start-up time and one warning, never a sample: the session
is built from the source model and outputs equal an uncached session's. A model whose metadata
claims images its graph does not take is refused before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from faults import ROOT, SHIPPED, assert_kept, cli, one_error_line, read_only, shipped_export, small_disk, snapshot
from runtime.backends import BackendError, ort_cache
from runtime.backends.ort_backend import OrtBackend, session_options
from runtime.metadata import METADATA_KEY

FAST = ("--steps", "2", "--num-images", "2", "--no-progress")
OFF = "ONNX Runtime cache off for this process"
DROPPED = "dropped ONNX Runtime cache entry"


@pytest.fixture
def export(tmp_path: Path) -> Path:
    return shipped_export(tmp_path / "exports" / "fm")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``DDIM_DEPLOY_CACHE`` of this test; the process's cache state starts clean."""
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path / "cache"))
    for name in ("DDIM_DEPLOY_ORT_CACHE", "DDIM_DEPLOY_CACHE_MAX_MB"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(ort_cache, "_disabled", {}, raising=False)
    monkeypatch.setattr(ort_cache, "_warned", set(), raising=False)
    return tmp_path / "cache"


X = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)


def denoise(backend: OrtBackend) -> np.ndarray:
    return backend.denoise(X, 0.5)


def reference(export: Path) -> np.ndarray:
    """The model's outputs from a session that never touches the cache (the backend's options)."""
    session = ort.InferenceSession((export / "model.onnx").read_bytes(), session_options(None),
                                   providers=["CPUExecutionProvider"])
    v = np.full((2, 1, 1, 1), 0.5, dtype=np.float32)
    return session.run(["pred_noises"], {"noisy_images": X, "noise_variances": v})[0]


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp")) if folder.exists() else []


def entries(cache: Path) -> list[Path]:
    return sorted((cache / "onnxruntime").glob("*.onnx"))


def with_metadata(src: Path, dest: Path, **model: object) -> Path:
    """``src`` with its metadata's ``model`` section updated by ``model`` (a distinct file, same graph)."""
    graph = onnx.load(str(src))
    for prop in graph.metadata_props:
        if prop.key == METADATA_KEY:
            data = json.loads(prop.value)
            data["model"].update(model)
            data.setdefault("export", {})["note"] = dest.parent.name  # distinct bytes, distinct cache key
            prop.value = json.dumps(data, sort_keys=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(graph, str(dest))
    return dest


# ---- a cache that cannot be written ---------------------------------------------------------------------------
def test_full_cache_disk_samples_uncached_with_one_warning(export, cache, caplog):
    want = reference(export)
    before = snapshot(export)
    with small_disk(cache, "1m"):  # the ~4 MB optimised graph cannot fit
        with caplog.at_level(logging.WARNING):
            got = [denoise(OrtBackend(export)) for _ in range(2)]
        assert not temp_files(cache) and not entries(cache)
    (line,) = warnings(caplog)  # one per process, not one per session
    assert line.startswith(f"{OFF}: {cache / 'onnxruntime'} is full (") and "DDIM_DEPLOY_ORT_CACHE=0" in line, line
    for out in got:
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    assert_kept(before, export)


def test_disk_that_fills_while_onnx_runtime_saves_leaves_no_partial_file(export, cache, monkeypatch, caplog):
    # Another process takes the space between the check and ORT's write: ORT raises its own
    # "Protobuf serialization failed" after writing what fitted.
    real, calls = ort_cache._free_bytes, []

    def free_bytes(folder: Path) -> int | None:
        calls.append(folder)
        return 1 << 40 if len(calls) == 1 else real(folder)  # plenty at the check, the truth afterwards

    monkeypatch.setattr(ort_cache, "_free_bytes", free_bytes)
    want = reference(export)
    with small_disk(cache, "2m"):
        with caplog.at_level(logging.WARNING):
            got = denoise(OrtBackend(export))
        assert not temp_files(cache) and not entries(cache)
        assert shutil.disk_usage(cache).used < 256 * 1024  # the partial file's space was given back
    (line,) = warnings(caplog)
    assert line.startswith(f"{OFF}: {cache / 'onnxruntime'} is full ("), line
    assert "Protobuf" not in line
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_ddim_run_on_a_full_cache_disk_exits_0_with_one_warning_line(export, tmp_path):
    disk = tmp_path / "cache"
    with small_disk(disk, "1m"):
        proc = cli("runtime.cli", str(export), *FAST, "--out", str(tmp_path / "s.png"),
                   env={"DDIM_DEPLOY_CACHE": str(disk)}, timeout=120)
        assert not temp_files(disk)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "s.png").is_file()
    assert "Traceback" not in proc.stderr and "EP Error" not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "ONNX Runtime cache" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{OFF}: {disk / 'onnxruntime'} is full"), proc.stderr


@pytest.mark.parametrize("ro", ["cache", "cache/onnxruntime"])
def test_read_only_cache_samples_uncached_with_one_warning(export, cache, tmp_path, caplog, ro):
    want = reference(export)
    (tmp_path / ro).mkdir(parents=True)
    (tmp_path / ro / "notes.txt").write_text("mine")
    before = snapshot(cache)
    with read_only(tmp_path / ro):
        with caplog.at_level(logging.WARNING):
            got = [denoise(OrtBackend(export)) for _ in range(2)]
    (line,) = warnings(caplog)
    assert line.startswith(f"{OFF}: cannot write to {cache / 'onnxruntime'} (") and "DDIM_DEPLOY_CACHE" in line, line
    for out in got:
        np.testing.assert_allclose(out, want, rtol=0, atol=1e-5)
    assert snapshot(cache) == before


def test_read_only_cache_with_a_good_entry_serves_it_silently(export, cache, caplog):
    OrtBackend(export)
    before = snapshot(cache)
    with read_only(cache / "onnxruntime"), caplog.at_level(logging.WARNING):
        got = denoise(OrtBackend(export))
    assert not warnings(caplog) and snapshot(cache) == before
    np.testing.assert_allclose(got, reference(export), rtol=0, atol=1e-5)


def test_a_broken_model_is_not_hidden_behind_the_cache(tmp_path, cache, caplog):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.onnx").write_bytes(SHIPPED.joinpath("model.onnx").read_bytes()[:100_000])
    for _ in range(2):  # with a writable cache, then with the cache off after a failure
        with pytest.raises(BackendError, match=f"^cannot load {re.escape(str(bad / 'model.onnx'))}: "), \
                caplog.at_level(logging.WARNING):
            OrtBackend(bad)
    assert not warnings(caplog) and not temp_files(cache) and not entries(cache)


def test_the_cache_can_be_turned_off(export, cache, monkeypatch, caplog):
    monkeypatch.setenv("DDIM_DEPLOY_ORT_CACHE", "0")
    with caplog.at_level(logging.WARNING):
        OrtBackend(export)
    assert not cache.exists() and not warnings(caplog)


# ---- entries that cannot be trusted ----------------------------------------------------------------------------
def test_truncated_entry_is_dropped_and_rebuilt(export, cache, caplog):
    want = reference(export)
    OrtBackend(export)
    (entry,) = entries(cache)
    data = entry.read_bytes()
    entry.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING):
        got = denoise(OrtBackend(export))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    (line,) = warnings(caplog)
    assert line == (f"{DROPPED} {entry}: it is truncated or changed ({len(data) // 2} bytes, the record says "
                    f"{len(data)}); rebuilding it from {export / 'model.onnx'}"), line
    record = json.loads(entry.with_suffix(".json").read_text())  # a whole, recorded entry again
    assert entry.stat().st_size == record["size"] and not temp_files(cache)
    assert record["source_sha256"] == ort_cache.hashlib.sha256((export / "model.onnx").read_bytes()).hexdigest()


def tiny_model(path: Path, metadata: dict[str, str]) -> Path:
    """A valid ONNX model with the denoiser's I/O and metadata that returns its input: not the denoiser."""
    images = helper.make_tensor_value_info("noisy_images", TensorProto.FLOAT, ["batch", 1, 32, 32])
    variances = helper.make_tensor_value_info("noise_variances", TensorProto.FLOAT, ["batch", 1, 1, 1])
    out = helper.make_tensor_value_info("pred_noises", TensorProto.FLOAT, ["batch", 1, 32, 32])
    graph = helper.make_graph([helper.make_node("Identity", ["noisy_images"], ["pred_noises"])], "foreign",
                              [images, variances], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    helper.set_model_props(model, metadata)
    onnx.save(model, str(path))
    return path


def test_foreign_entry_is_not_used(export, cache, tmp_path, caplog):
    want = reference(export)
    OrtBackend(export)
    (entry,) = entries(cache)
    meta = {p.key: p.value for p in onnx.load(str(SHIPPED / "model.onnx"), load_external_data=False).metadata_props}
    foreign = tiny_model(tmp_path / "foreign.onnx", meta)
    shutil.copy2(foreign, entry)  # a valid model with our I/O and metadata, under the entry's name
    with caplog.at_level(logging.WARNING):
        got = denoise(OrtBackend(export))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)  # the foreign model would return its input
    (line,) = warnings(caplog)
    assert line.startswith(f"{DROPPED} {entry}: it is truncated or changed (") and "rebuilding it from" in line, line
    assert entry.read_bytes() != foreign.read_bytes()


def test_another_models_entry_and_record_under_this_key_are_not_used(export, cache, tmp_path, caplog):
    want = reference(export)
    other = with_metadata(export / "model.onnx", tmp_path / "other" / "model.onnx", embedding_max_frequency=10.0)
    OrtBackend(other.parent)
    (theirs,) = entries(cache)
    sha = ort_cache.hashlib.sha256((export / "model.onnx").read_bytes()).hexdigest()
    entry = theirs.with_name(f"{ort_cache.entry_key(sha, ['CPUExecutionProvider'])}.onnx")
    theirs.rename(entry)  # a whole, self-consistent pair, made from another model
    theirs.with_suffix(".json").rename(entry.with_suffix(".json"))
    with caplog.at_level(logging.WARNING):
        got = OrtBackend(export)
    np.testing.assert_allclose(denoise(got), want, rtol=0, atol=1e-5)
    assert got.spec.model.embedding_max_frequency != 10.0  # not the other model's metadata
    (line,) = warnings(caplog)
    assert line.startswith(f"{DROPPED} {entry}: its record names another source model; rebuilding it"), line


def test_entry_without_record_is_dropped_and_rebuilt(export, cache, caplog):
    OrtBackend(export)
    (entry,) = entries(cache)
    entry.with_suffix(".json").unlink()  # killed between the entry and its record, or an older version
    with caplog.at_level(logging.WARNING):
        got = denoise(OrtBackend(export))
    (line,) = warnings(caplog)
    assert line.startswith(f"{DROPPED} {entry}: it has no record"), line
    assert entry.with_suffix(".json").is_file()
    np.testing.assert_allclose(got, reference(export), rtol=0, atol=1e-5)


# ---- bounded, shared --------------------------------------------------------------------------------------------
def test_cache_is_trimmed_least_recently_used_first(export, cache, tmp_path, monkeypatch):
    monkeypatch.setenv("DDIM_DEPLOY_CACHE_MAX_MB", "9")  # two ~4 MB entries fit, three do not
    limit = 9 * 2**20
    models = [with_metadata(export / "model.onnx", tmp_path / f"m{i}" / "model.onnx") for i in range(4)]
    folder = cache / "onnxruntime"
    folder.mkdir(parents=True)
    key = ort_cache.entry_key("0" * 64, ["CPUExecutionProvider"])
    mine = {"notes.txt": b"mine", "backup.onnx": b"x" * 2**20, "other.tmp": b"not ours"}
    for name, data in mine.items():
        (folder / name).write_bytes(data)
    stale, fresh = folder / f".{key}.onnx.dead.tmp", folder / f".{key}.onnx.live.tmp"
    for path, age in ((stale, 7200), (fresh, 0)):  # a killed process's, and one being written now
        path.write_bytes(b"partial")
        os.utime(path, (time.time() - age, time.time() - age))

    def key_of(i: int) -> Path:
        sha = ort_cache.hashlib.sha256(models[i].read_bytes()).hexdigest()
        return folder / f"{ort_cache.entry_key(sha, ['CPUExecutionProvider'])}.onnx"

    for i in (0, 1, 2):
        OrtBackend(models[i].parent)
        time.sleep(0.01)
    assert not key_of(0).exists() and key_of(1).exists() and key_of(2).exists()
    OrtBackend(models[1].parent)  # a hit: 1 is now more recent than 2
    time.sleep(0.01)
    OrtBackend(models[3].parent)
    assert key_of(1).exists() and key_of(3).exists() and not key_of(2).exists()
    ours = [p for p in folder.iterdir() if ort_cache.ENTRY_RE.match(p.name)]
    assert sum(p.stat().st_size for p in ours) <= limit
    assert all((folder / n).read_bytes() == d for n, d in mine.items())  # not ours: never touched
    assert not stale.exists() and fresh.exists()


def test_two_processes_building_the_same_entry_both_work(export, cache):
    code = ("import sys; from pathlib import Path; from runtime.backends.ort_backend import OrtBackend; "
            "import numpy as np; b = OrtBackend(Path(sys.argv[1])); "
            "print(float(b.denoise(np.zeros((1, 1, 32, 32), np.float32), 0.5).sum()))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDIM_DEPLOY_CACHE": str(cache)}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(export)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-1000:] for _, err in results]
    assert all(not err.strip() for _, err in results), [err for _, err in results]  # no warnings either
    (entry,) = entries(cache)
    record = json.loads(entry.with_suffix(".json").read_text())
    assert entry.stat().st_size == record["size"] and not temp_files(cache)
    assert ort_cache.hashlib.sha256(entry.read_bytes()).hexdigest() == record["sha256"]


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
    import cupy_double
    from tensorrt_double import VERSIONS, TensorRTDouble

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
