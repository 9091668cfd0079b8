"""Fashion-MNIST from its IDX files: the Debian package, a given folder, or the official download."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from runtime.common.files import cache_dir
from trainer.data.download import RemoteFile, fetch
from trainer.errors import DatasetError

log = logging.getLogger(__name__)

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")  # package dataset-fashion-mnist
MIRRORS = (
    "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
)
# The publisher's MD5 checksums (the Debian package recompresses, so its .gz bytes differ).
FILES = {
    ("train", "images"): ("train-images-idx3-ubyte.gz", "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
    ("train", "labels"): ("train-labels-idx1-ubyte.gz", "25c81989df183df01b3e8a0aad5dffbe"),
    ("test", "images"): ("t10k-images-idx3-ubyte.gz", "bef4ecab320f06d8554ea6380940ec79"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte.gz", "bb300cfdad3c16e7a12a480ee83cd310"),
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_IDX_DTYPES = {0x08: np.uint8}


def read_idx(path: Path) -> NDArray[np.uint8]:
    """Parse an IDX file (gzip-compressed or not) of unsigned bytes into an array."""
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise DatasetError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(shape))
    if len(raw) != expected:
        raise DatasetError(f"{path}: IDX data has {len(raw) - header} bytes, its header promises {expected - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(folder: Path, filename: str) -> Path | None:
    for name in (filename, filename.removesuffix(".gz")):
        if (folder / name).is_file():
            return folder / name
    return None


def locate(data_dir: Path | None, split: str, download: bool = True) -> dict[str, Path]:
    """Paths of the images and labels files of ``split`` ('train' or 'test').

    Looks in ``data_dir`` when given (and only there), else the Debian package's folder, then the
    cache folder, and finally downloads into the cache folder.
    """
    names = {kind: FILES[(split, kind)] for kind in ("images", "labels")}
    if data_dir is not None:
        if not data_dir.is_dir():
            raise DatasetError(f"Fashion-MNIST folder {data_dir} does not exist")
        found = {k: _find(data_dir, fn) for k, (fn, _) in names.items()}
        missing = [names[k][0] for k, p in found.items() if p is None]
        if missing:
            raise DatasetError(f"{data_dir} lacks {', '.join(missing)} (Fashion-MNIST IDX files)")
        return {k: p for k, p in found.items() if p is not None}
    cache = cache_dir() / "fashion-mnist"
    for folder in (DEBIAN_DIR, cache):
        found = {k: _find(folder, fn) for k, (fn, _) in names.items()}
        if all(found.values()):
            log.info("Fashion-MNIST %s split from %s", split, folder)
            return {k: p for k, p in found.items() if p is not None}
    if not download:
        raise DatasetError(f"Fashion-MNIST not found in {DEBIAN_DIR} or {cache}")
    return {k: fetch(RemoteFile(fn, tuple(m + fn for m in MIRRORS), md5), cache) for k, (fn, md5) in names.items()}


def load_fashion_mnist(data_dir: Path | None, split: str) -> tuple[NDArray[np.uint8], NDArray[np.uint8]]:
    """Images ``(N, 28, 28)`` and labels ``(N,)`` of the 'train' or 'test' split."""
    paths = locate(data_dir, split)
    images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(
            f"Fashion-MNIST files disagree: images {images.shape} in {paths['images']}, labels {labels.shape}"
        )
    if len(images) == 0:
        raise DatasetError(f"{paths['images']} holds no images")
    return images, labels
