"""Shared fixtures: small local datasets in the real formats, and tiny run configs."""

from __future__ import annotations

import dataclasses
import gzip
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from runtime.config import KerasUNetConfig, ScheduleConfig
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

