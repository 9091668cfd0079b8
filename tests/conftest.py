"""Shared fixtures: small local datasets in the real formats, and tiny run configs."""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.config import DDPMUNetConfig, KerasUNetConfig, ScheduleConfig
from trainer.config import DataConfig, RunConfig, TrainConfig

# Every `--int8` export in the tests would also gate OpenVINO int8/bf16/fp32 (seconds each): only the tests of those
# gates turn them on (tests/test_engine_gates.py); the others see them recorded as skipped.
os.environ.setdefault("DDIM_DEPLOY_ENGINE_GATES", "0")


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> Path:
    """An IDX file of unsigned bytes, as Fashion-MNIST publishes them."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def write_fashion(folder: Path, train: int = 96, test: int = 32) -> Path:
    """A Fashion-MNIST folder of ``train`` and ``test`` items (blobs of varying brightness)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("t10k", test)):
        images = np.zeros((n, 28, 28), dtype=np.uint8)
        for i in range(n):
            y, x = rng.integers(4, 16, size=2)
            images[i, y : y + 10, x : x + 8] = rng.integers(80, 255)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", rng.integers(0, 10, n, dtype=np.uint8))
    return folder


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    """A Fashion-MNIST folder of 96 train and 32 test items."""
    return write_fashion(tmp_path / "fmnist")


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """A nested folder of 20 small RGB images of mixed formats and aspect ratios."""
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    for i in range(20):
        sub = root / f"class{i % 3}"
        sub.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(20, 40)), int(rng.integers(20, 40))
        arr = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        ext = (".jpg", ".png", ".webp", ".JPEG")[i % 4]
        Image.fromarray(arr).save(sub / f"img{i}{ext}")
    return root


def tiny_config(**train: object) -> RunConfig:
    """A fashion-mnist-shaped run small enough to train in a second or two."""
    base = TrainConfig(batch_size=8, steps=6, sample_every=3, sample_steps=3, num_samples=4,
                       checkpoint_every=2, keep_checkpoints=2, log_every=1)
    return RunConfig(
        preset="fashion-mnist",
        model=KerasUNetConfig(image_size=32, channels=1, widths=(8, 16), block_depth=1, embedding_dims=8),
        schedule=ScheduleConfig(name="cosine-angle"),
        data=DataConfig(source="fashion-mnist"),
        train=dataclasses.replace(base, **train),
    )


def write_cifar_tarball(path: Path, n_per_batch: int = 8) -> Path:
    """A CIFAR-10 python tarball: pickled dicts of byte keys, as the official batches are."""
    import io
    import pickle
    import tarfile

    rng = np.random.default_rng(2)
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            batch = {b"batch_label": b"x", b"labels": [int(v) for v in rng.integers(0, 10, n_per_batch)],
                     b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)}
            raw = pickle.dumps(batch, protocol=2)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def write_flowers_tgz(path: Path, n: int = 12) -> Path:
    """An Oxford-Flowers-like tgz: jpg/image_XXXXX.jpg, plus members that must not be extracted."""
    import io
    import tarfile

    rng = np.random.default_rng(3)
    with tarfile.open(path, "w:gz") as tar:
        for i in range(n):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8)).save(buf, format="JPEG")
            info = tarfile.TarInfo(f"jpg/image_{i:05d}.jpg")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
        evil = tarfile.TarInfo("../escape.jpg")
        evil.size = 3
        tar.addfile(evil, io.BytesIO(b"bad"))
        link = tarfile.TarInfo("jpg/link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    return path


def assert_onnx_matches_eager(model, image_shape: tuple[int, int, int]) -> None:
    """Export with a dynamic batch at opset 18, run the full checker, compare ORT with eager at batch 5."""
    import io

    import torch

    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    buf = io.BytesIO()
    torch.onnx.export(
        model, (torch.randn(2, *image_shape), torch.rand(2, 1, 1, 1)), buf,
        input_names=["noisy_images", "noise_variances"], output_names=["pred_noises"],
        dynamic_axes={k: {0: "batch"} for k in ("noisy_images", "noise_variances", "pred_noises")},
        opset_version=18, dynamo=False,
    )
    onnx.checker.check_model(onnx.load_from_string(buf.getvalue()), full_check=True)
    session = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    x, v = torch.randn(5, *image_shape), torch.rand(5, 1, 1, 1)
    (got,) = session.run(None, {"noisy_images": x.numpy(), "noise_variances": v.numpy()})
    with torch.no_grad():
        expected = model(x, v).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


# Tests whose subject does not depend on the U-Net (command-line refusals, commit logic, the INT8 gate's and the
# precision cache's bookkeeping): the keras variant runs by default, the ddpm one with -m slow (suite time).
ARCH_INDEPENDENT = {
    "test_export.py::test_cli_bad_inputs",
    "test_export.py::test_cli_refuses_a_non_empty_out_and_requires_engine_when_asked",
    "test_export.py::test_cli_defaults_to_the_latest_run",
    "test_export.py::test_interrupted_export_keeps_the_previous_export",
    "test_int8.py::test_gate_failure_writes_nothing",
    "test_int8.py::test_a_named_gate_classifier_that_cannot_load_stops_the_export",
    "test_int8.py::test_verdicts_follow_the_cache_switches",
    "test_int8.py::test_auto_measures_on_another_host_and_caches_the_verdict",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if f"{item.path.name}::{getattr(item, 'originalname', item.name)}" in ARCH_INDEPENDENT \
                and "ddpm" in item.name.partition("[")[2]:
            item.add_marker(pytest.mark.slow)



# The DDPM-style run is conditioned on timesteps over a linear schedule (as the DDPM presets are); the Keras
# run on noise variances over the continuous schedule: both graph I/O conventions go through every test.
DDPM_TINY = DDPMUNetConfig(image_size=32, channels=1, base_width=8, channel_mults=(1, 2), num_res_blocks=1,
                           attention_resolutions=(16,), num_groups=4, dropout=0.0, conditioning="timestep")
ROOT = Path(__file__).resolve().parents[1]
# The INT8 options of the tiny exports: any quality passes (the gates' logic is tested on its own).
LOOSE = ("--int8-min-psnr", "0", "--int8-max-fd-ratio", "1000", "--int8-gate-images", "4",
         "--int8-calibration-size", "32")


def randomise_weights(run_dir: Path) -> None:
    """Give the zero-initialised layers of a 1-step run (still ~lr from zero) real weights, so every
    path shows in the outputs and the gate compares outputs of unit scale."""
    import torch
    from safetensors.torch import load_file, save_file

    path = run_dir / "model.safetensors"
    tensors = load_file(path)
    gen = torch.Generator().manual_seed(0)
    for key, value in tensors.items():
        if value.is_floating_point() and value.dim() > 1 and value.abs().max() < 1e-2:
            tensors[key] = torch.randn(value.shape, generator=gen) * 0.05
    path.unlink()  # a hard link to the checkpoint: replace, never write through it
    save_file(tensors, path)


def tiny_fashion(tmp: Path) -> Path:
    """16 random Fashion-MNIST-shaped training images (the tiny runs' data and calibration set)."""
    rng = np.random.default_rng(0)
    folder = tmp / "fmnist"
    folder.mkdir()
    write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (16, 28, 28), dtype=np.uint8))
    write_idx(folder / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 16, dtype=np.uint8))
    return folder


def export_cli(*args: str, cwd: Path = ROOT, env: dict | None = None) -> subprocess.CompletedProcess:
    """`ddim-export ARGS` in a child process (as a user types it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "export.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd, timeout=300)


# Session-wide (read-only for the tests: they copy before they change anything): the tiny runs and their --int8
# exports were rebuilt by every module that used them.
@pytest.fixture(scope="session", params=["keras", "ddpm"])
def run_dir(request, tmp_path_factory):
    """A 1-step tiny run of each U-Net with randomised weights, beside its fmnist/ data."""
    from trainer.train import fit

    tmp = tmp_path_factory.mktemp(request.param)
    data = tiny_fashion(tmp)
    cfg = tiny_config(steps=1, sample_every=1, checkpoint_every=1)
    if request.param == "ddpm":
        cfg = dataclasses.replace(cfg, model=DDPM_TINY, schedule=ScheduleConfig(name="linear"))
    fit(cfg, tmp / "run", data, progress=False)
    randomise_weights(tmp / "run")
    return tmp / "run"


@pytest.fixture(scope="session")
def int8_export(run_dir, tmp_path_factory):
    """`ddim-export --int8` of each tiny run, with the OpenVINO engine gates on (tests/test_engine_gates.py reads
    them): (export folder, stderr)."""
    out = tmp_path_factory.mktemp("int8") / "out"
    proc = export_cli(str(run_dir), "--out", str(out), "--int8", "--data", str(run_dir.parent / "fmnist"), *LOOSE,
                      env={"DDIM_DEPLOY_ENGINE_GATES": "1"})
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def externalize_largest_initializer(model_in: Path, model_out: Path, data_path: Path, location: str) -> int:
    """Write ``model_in`` to ``model_out`` with its largest initializer moved out as ONNX external data: its bytes
    written to ``data_path``, the graph pointing at ``location`` (relative to the model's folder, or absolute: what a
    hostile file may claim). Returns the initializer's size in bytes."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(model_in))
    init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    size = len(init.raw_data)
    data_path.write_bytes(numpy_helper.to_array(init).tobytes())
    init.ClearField("raw_data")
    init.data_location = onnx.TensorProto.EXTERNAL
    entry = init.external_data.add()
    entry.key, entry.value = "location", location
    onnx.save(model, str(model_out))
    return size
