"""CUDA code paths that can be checked without a GPU: what they ask ONNX Runtime for, what they refuse,
and the U-Nets' forward under CUDA-graph capture rules. The ``-m gpu`` tests run them on a GPU."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import onnxruntime as ort
import pytest
import torch

from conftest import tiny_config
from export.pipeline import ExportOptions, export_run
from runtime.backends import BackendError
from runtime.backends import ort_backend
from runtime.backends.ort_backend import OrtBackend, install_problem
from conftest import DDPM_TINY, randomise_weights, tiny_fashion as _fashion
from trainer.models import build_model
from trainer.train import fit

REAL_SESSION = ort.InferenceSession


class CpuOnlyCudaSession(REAL_SESSION):
    """onnxruntime-gpu without its CUDA libraries: CUDA is listed as available, the session falls back to CPU."""

    asked: list = []

    def __init__(self, model, sess_options=None, providers=None, **kwargs):
        CpuOnlyCudaSession.asked.append(providers)
        super().__init__(model, sess_options, providers=["CPUExecutionProvider"], **kwargs)


@pytest.fixture
def cuda_listed_but_broken(monkeypatch, tmp_path):
    CpuOnlyCudaSession.asked = []
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", CpuOnlyCudaSession)
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path / "cache"))
    return CpuOnlyCudaSession


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cuda-paths")
    fit(tiny_config(steps=1, sample_every=1, checkpoint_every=1), tmp / "run", _fashion(tmp), progress=False)
    randomise_weights(tmp / "run")
    export_run(tmp / "run", tmp / "export", ExportOptions(fp16=True))
    return tmp / "run", tmp / "export"


def test_cuda_session_that_fell_back_to_the_cpu_is_refused(export_dir, cuda_listed_but_broken):
    _, export = export_dir
    with pytest.raises(BackendError, match="CUDA provider did not start .*active: CPUExecutionProvider"):
        OrtBackend(export, "cuda", "fp32")
    # float32 on CUDA means float32: TF32 off; the fp16 file needs no such option.
    assert cuda_listed_but_broken.asked[-1] == [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"]
    with pytest.raises(BackendError, match="CUDA provider did not start"):
        OrtBackend(export, "cuda", "fp16")
    assert cuda_listed_but_broken.asked[-1] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_auto_falls_back_to_the_cpu_with_the_reason(export_dir, cuda_listed_but_broken):
    from runtime.api import load

    _, export = export_dir
    sampler = load(export)
    assert sampler.backend.device == "cpu" and sampler.backend.provider == "CPUExecutionProvider"
    assert "ONNX Runtime CUDA skipped: " in sampler.why and "CUDA provider did not start" in sampler.why
    with pytest.raises(BackendError, match="CUDA provider did not start"):
        load(export, device="cuda")


def test_parity_gate_never_labels_cpu_results_cuda(export_dir, cuda_listed_but_broken, tmp_path):
    run, _ = export_dir
    report = export_run(run, tmp_path / "out", ExportOptions())
    assert [r.provider for r in report.parity] == ["CPUExecutionProvider"]
    assert any("not checked on CUDAExecutionProvider" in n and "did not start" in n for n in report.notes)
    assert [("CUDAExecutionProvider", {"use_tf32": "0"}), "CPUExecutionProvider"] in cuda_listed_but_broken.asked


def test_both_onnxruntime_distributions_are_named(monkeypatch):
    import importlib.metadata as md

    versions = {"onnxruntime": "1.31.1", "onnxruntime-gpu": "1.31.1"}
    monkeypatch.setattr(md, "version", lambda dist: versions[dist])
    assert "both onnxruntime 1.31.1 and onnxruntime-gpu 1.31.1 are installed" in install_problem()
    monkeypatch.setattr(ort_backend, "cuda_available", lambda: False)
    with pytest.raises(BackendError, match="no CUDA provider .*both onnxruntime .* keep one"):
        OrtBackend(Path("unused"), "cuda")
    del versions["onnxruntime-gpu"]

    def missing(dist):
        if dist not in versions:
            raise md.PackageNotFoundError(dist)
        return versions[dist]

    monkeypatch.setattr(md, "version", missing)
    assert install_problem() is None


@pytest.mark.parametrize("arch", ["keras", "ddpm"])
def test_forward_makes_no_host_tensors_after_the_first_call(arch, monkeypatch):
    """CUDA-graph capture forbids host-to-device copies ("Cannot copy between CPU and CUDA tensors during
    CUDA graph capture"): after one warm-up call the forward must build no tensor from host data."""
    cfg = tiny_config().model if arch == "keras" else DDPM_TINY
    model = build_model(cfg).eval()
    x, v = torch.randn(2, 1, 32, 32), torch.rand(2, 1, 1, 1)
    with torch.no_grad():
        warm = model(x, v)

    def no_host_copies(*args, **kwargs):
        raise RuntimeError("Cannot copy between CPU and CUDA tensors during CUDA graph capture")

    for name in ("tensor", "as_tensor", "from_numpy"):
        monkeypatch.setattr(torch, name, no_host_copies)
    with torch.no_grad():
        torch.testing.assert_close(model(x, v), warm)


def test_embedding_speeds_stay_float32_in_a_half_model():
    model = build_model(dataclasses.replace(tiny_config().model, embedding_dims=16)).half()
    emb = model.embedding
    speeds = emb.speeds(torch.device("cpu"))
    assert speeds.dtype == torch.float32 and float(speeds.max()) == pytest.approx(emb.angular_speeds[-1], rel=1e-7)
    assert float(speeds.max()) > 2000  # 2 pi 1000 * ...: beyond float16's integer precision (2048)
