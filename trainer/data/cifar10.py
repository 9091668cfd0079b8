"""CIFAR-10 from the official python-pickle tarball, read without executing untrusted pickles.

The batches are Python pickles of dicts of numpy arrays. They are read with an unpickler that
resolves only the few globals numpy arrays need, so a tampered file cannot run code.
"""

from __future__ import annotations

import io
import logging
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from runtime.common.files import cache_dir
from trainer.data.download import RemoteFile, fetch
from trainer.errors import DatasetError

log = logging.getLogger(__name__)

ARCHIVE = RemoteFile(
    "cifar-10-python.tar.gz", ("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",),
    "c58f30108f718f92721af3b95e74349a",
)
TRAIN_BATCHES = tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6))
TEST_BATCHES = ("cifar-10-batches-py/test_batch",)
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArraysOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_batch(raw: bytes, name: str) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """One batch: images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)``."""
    try:
        batch = _ArraysOnly(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except (pickle.UnpicklingError, KeyError, TypeError, ValueError, EOFError) as exc:
        raise DatasetError(f"{name} is not a CIFAR-10 batch ({exc})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DatasetError(f"{name}: expected (N, 3072) images and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def locate(data_path: Path | None) -> Path:
    """The tarball: ``data_path`` (the file or its folder), else the cache folder, else downloaded."""
    if data_path is not None:
        path = data_path / ARCHIVE.filename if data_path.is_dir() else data_path
        if not path.is_file():
            raise DatasetError(f"no CIFAR-10 tarball at {path} (expected {ARCHIVE.filename})")
        return path
    return fetch(ARCHIVE, cache_dir() / "cifar10")


def load_cifar10(data_path: Path | None, split: str) -> tuple[NDArray[np.uint8], NDArray[np.int64]]:
    """Images and labels of 'train' (50,000), 'test' (10,000) or 'all'."""
    names = {"train": TRAIN_BATCHES, "test": TEST_BATCHES, "all": TRAIN_BATCHES + TEST_BATCHES}[split]
    path = locate(data_path)
    images, labels = [], []
    try:
        with tarfile.open(path, "r:gz") as tar:
            for name in names:
                try:
                    member = tar.extractfile(name)
                except KeyError:
                    member = None
                if member is None:
                    raise DatasetError(f"{path} lacks {name}: not the CIFAR-10 python tarball")
                x, y = read_batch(member.read(), f"{path}:{name}")
                images.append(x)
                labels.append(y)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DatasetError(f"cannot read CIFAR-10 tarball {path}: {exc}") from None
    log.info("CIFAR-10 %s split from %s", split, path)
    return np.concatenate(images), np.concatenate(labels)
