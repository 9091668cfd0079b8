"""CIFAR-10 and Oxford Flowers 102 through their real archive formats, made locally."""

from __future__ import annotations

import io
import os
import pickle
import tarfile

import numpy as np
import pytest

from conftest import write_cifar_tarball, write_flowers_tgz
from runtime.config import KerasUNetConfig
from trainer.config import DataConfig
from trainer.data import load_images
from trainer.data.cifar10 import load_cifar10, read_batch
from trainer.data.flowers import ensure_flowers
from trainer.errors import DatasetError


def test_cifar10_tarball_loads_train_and_test(tmp_path):
    tarball = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    images, labels = load_cifar10(tmp_path, "train")  # the folder holding the tarball
    assert images.shape == (40, 3, 32, 32) and labels.shape == (40,)
    assert load_cifar10(tarball, "test")[0].shape == (8, 3, 32, 32)
    model = KerasUNetConfig(image_size=16, channels=3, widths=(8, 16))
    resized = load_images(DataConfig(source="cifar10", split="all"), model, tarball, "cifar10-64")
    assert resized.shape == (48, 3, 16, 16) and resized.dtype == np.uint8


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    raw = pickle.dumps({b"data": Evil(), b"labels": []}, protocol=2)
    with pytest.raises(DatasetError, match="refusing to load"):
        read_batch(raw, "evil")
    assert not (tmp_path / "pwned").exists()


def test_cifar10_bad_archives(tmp_path):
    with pytest.raises(DatasetError, match="no CIFAR-10 tarball"):
        load_cifar10(tmp_path, "train")
    bad = tmp_path / "cifar-10-python.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(DatasetError, match="cannot read CIFAR-10 tarball"):
        load_cifar10(bad, "train")
    with tarfile.open(bad, "w:gz") as tar:
        info = tarfile.TarInfo("something/else")
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(DatasetError, match="lacks cifar-10-batches-py/data_batch_1"):
        load_cifar10(bad, "train")


def test_flowers_archive_is_extracted_safely_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "cache" / "oxford-flowers-102"
    folder.mkdir(parents=True)
    write_flowers_tgz(folder / "102flowers.tgz")  # as if downloaded: fetch() finds it and skips the network
    jpgs = ensure_flowers()
    assert jpgs == folder / "jpg"
    assert sorted(p.name for p in jpgs.iterdir()) == [f"image_{i:05d}.jpg" for i in range(12)]
    assert not (tmp_path / "cache" / "escape.jpg").exists() and not (folder / "escape.jpg").exists()
    model = KerasUNetConfig(image_size=16, channels=3, widths=(8, 16))
    train = load_images(DataConfig(source="oxford-flowers", split="train"), model, None, "keras-flowers", False)
    val = load_images(DataConfig(source="oxford-flowers", split="val"), model, None, "keras-flowers", False)
    assert len(train) == 10 and len(val) == 2  # seeded random 80/20 split


def test_flowers_archive_without_images_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path))
    folder = tmp_path / "oxford-flowers-102"
    folder.mkdir()
    with tarfile.open(folder / "102flowers.tgz", "w:gz") as tar:
        tar.addfile(tarfile.TarInfo("readme.txt"), io.BytesIO(b""))
    with pytest.raises(DatasetError, match="holds no jpg"):
        ensure_flowers()
    assert not (folder / "jpg").exists()
