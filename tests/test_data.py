"""Datasets from small local files in the real formats: IDX, image folders, downloads."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_idx
from runtime.config import KerasUNetConfig
from trainer.config import DataConfig
from trainer.data import compute_normalization, fit_idx_images, load_images
from trainer.data.download import RemoteFile, fetch
from trainer.data.fashion_mnist import load_fashion_mnist, locate, read_idx
from trainer.data.folder import center_crop_resize, list_images, split_files
from trainer.errors import DatasetError, DownloadError


def test_idx_round_trip_gzipped_and_plain(tmp_path):
    arr = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a.gz", arr)), arr)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b", arr, compress=False)), arr)


@pytest.mark.parametrize(
    "payload,message",
    [
        (b"\x00\x00\x0d\x03" + b"\x00" * 12, "bad magic"),
        (b"\x00\x00\x08\x03\x00\x00", "truncated"),
        (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "promises"),
    ],
)
def test_corrupt_idx_files_are_named(tmp_path, payload, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(gzip.compress(payload))
    with pytest.raises(DatasetError, match=message):
        read_idx(path)
    (tmp_path / "trunc.gz").write_bytes(gzip.compress(b"\x00" * 64)[:20])
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(tmp_path / "trunc.gz")


def test_fashion_mnist_folder_loads_both_splits(fashion_dir):
    images, labels = load_fashion_mnist(fashion_dir, "train")
    assert images.shape == (96, 28, 28) and labels.shape == (96,)
    assert load_fashion_mnist(fashion_dir, "test")[0].shape == (32, 28, 28)
    model = KerasUNetConfig(image_size=32, channels=1, widths=(8, 16))
    both = load_images(DataConfig(source="fashion-mnist", split="all"), model, fashion_dir, "fashion-mnist")
    assert both.shape == (128, 1, 32, 32) and both.dtype == np.uint8
    # 28 -> 32 is a centred zero pad: the original pixels are untouched.
    np.testing.assert_array_equal(both[:96, 0, 2:30, 2:30], images)


def test_fashion_mnist_missing_files_are_listed(tmp_path):
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DatasetError, match="lacks train-labels-idx1-ubyte.gz"):
        locate(tmp_path, "train")
    with pytest.raises(DatasetError, match="does not exist"):
        locate(tmp_path / "nope", "train")


def test_fashion_mnist_needs_one_channel(fashion_dir):
    with pytest.raises(DatasetError, match=r"1 channel\(s\): the model must have 1, not 3"):
        load_images(DataConfig(), KerasUNetConfig(32, 3, widths=(8, 16)), fashion_dir, "fashion-mnist")


def test_idx_resize_below_native_size():
    images = np.full((2, 28, 28), 200, dtype=np.uint8)
    assert fit_idx_images(images, 16).shape == (2, 16, 16)


def test_image_folder_recursive_crop_resize_and_split(image_folder):
    files = list_images(image_folder)
    assert len(files) == 20  # .jpg .png .webp .JPEG, nested
    train = split_files(files, "train", 0.2, seed=0)
    val = split_files(files, "val", 0.2, seed=0)
    assert len(train) == 16 and len(val) == 4 and not set(train) & set(val)
    assert train == split_files(files, "train", 0.2, seed=0)
    assert train != split_files(files, "train", 0.2, seed=1)
    model = KerasUNetConfig(image_size=16, channels=3, widths=(8, 16))
    arr = load_images(DataConfig(source="folder"), model, image_folder, "keras-flowers", progress=False)
    assert arr.shape == (16, 3, 16, 16) and arr.dtype == np.uint8


def test_center_crop_takes_the_middle_square():
    img = np.zeros((10, 30, 3), dtype=np.uint8)
    img[:, 10:20] = 255  # the centre square is white, the sides black
    out = np.asarray(center_crop_resize(Image.fromarray(img), 5))
    assert out.shape == (5, 5, 3) and out.min() == 255


def test_image_folder_errors(tmp_path, image_folder):
    with pytest.raises(DatasetError, match="does not exist"):
        list_images(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        list_images(tmp_path / "empty")
    bad = image_folder / "class0" / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    model = KerasUNetConfig(image_size=16, channels=3, widths=(8, 16))
    with pytest.raises(DatasetError, match="cannot read image .*broken.png"):
        load_images(DataConfig(source="folder", split="all"), model, image_folder, "keras-flowers", progress=False)


def test_folder_preset_without_data_explains_what_to_pass(tmp_path, monkeypatch):
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path))
    model = KerasUNetConfig(image_size=16, channels=3, widths=(8, 16))
    with pytest.raises(DatasetError, match="--data PATH"):
        load_images(DataConfig(source="folder"), model, None, "celebahq-64")


def test_normalisation_statistics():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 3, 8, 8), dtype=np.uint8)
    norm = compute_normalization(images, "dataset-stats")
    x = images.astype(np.float64) / 255
    assert norm.mean == pytest.approx(tuple(x.mean(axis=(0, 2, 3))))
    assert norm.std == pytest.approx(tuple(x.std(axis=(0, 2, 3))))
    assert compute_normalization(images, "minus-one-one").std == (0.5, 0.5, 0.5)


def _served(tmp_path: Path, payload: bytes) -> tuple[str, str]:
    src = tmp_path / "served" / "train-images-idx3-ubyte.gz"
    src.parent.mkdir(exist_ok=True)
    src.write_bytes(payload)
    return src.as_uri(), hashlib.md5(payload).hexdigest()


def test_download_verifies_checksum_and_writes_atomically(tmp_path):
    payload = gzip.compress(b"\x00\x00\x08\x01\x00\x00\x00\x03abc")
    url, md5 = _served(tmp_path, payload)
    dest = tmp_path / "cache"
    path = fetch(RemoteFile("train-images-idx3-ubyte.gz", (url,), md5), dest, progress=False)
    assert path.read_bytes() == payload
    assert read_idx(path).tolist() == list(b"abc")
    assert [p.name for p in dest.iterdir()] == [path.name]  # no temporary left behind
    # Present already: not fetched again, even from a dead URL.
    assert fetch(RemoteFile(path.name, ("file:///nonexistent",), md5), dest, progress=False) == path


def test_download_checksum_mismatch_leaves_nothing(tmp_path):
    url, _ = _served(tmp_path, b"tampered")
    dest = tmp_path / "cache"
    with pytest.raises(DownloadError, match="checksum mismatch"):
        fetch(RemoteFile("f.gz", (url,), "0" * 32), dest, progress=False)
    assert list(dest.iterdir()) == []


def test_offline_download_names_url_and_destination(tmp_path):
    remote = RemoteFile("t10k-images-idx3-ubyte.gz", ("http://127.0.0.1:9/t10k-images-idx3-ubyte.gz",), "0" * 32)
    with pytest.raises(DownloadError) as err:
        fetch(remote, tmp_path / "cache", progress=False)
    msg = str(err.value)
    assert "http://127.0.0.1:9/t10k-images-idx3-ubyte.gz" in msg
    assert f"save it as {tmp_path / 'cache' / 't10k-images-idx3-ubyte.gz'}" in msg
    assert "\n" not in msg


@pytest.mark.skipif(not Path("/usr/share/datasets/fashion-mnist").is_dir(), reason="Debian dataset-fashion-mnist absent")
def test_debian_fashion_mnist_is_found_without_a_path():
    images, labels = load_fashion_mnist(None, "test")
    assert images.shape == (10000, 28, 28) and set(np.unique(labels)) == set(range(10))
