"""Training images as one in-memory ``(N, C, H, W)`` uint8 array, and their normalisation."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from runtime.config import ModelConfig, NormalizationConfig
from trainer.config import DataConfig
from trainer.data.download import cache_dir
from trainer.data.fashion_mnist import load_fashion_mnist
from trainer.data.folder import list_images, load_folder, split_files
from trainer.errors import DatasetError

log = logging.getLogger(__name__)


def default_folder(preset: str) -> Path:
    """Where a folder-based preset looks when no ``--data`` is given."""
    return cache_dir() / preset


def fit_idx_images(images: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    """28x28 digits/items to ``size``: zero-pad centred when larger (28 -> 32), else antialiased resize."""
    h = images.shape[-1]
    if size >= h:
        lo = (size - h) // 2
        hi = size - h - lo
        return np.pad(images, ((0, 0), (lo, hi), (lo, hi)))
    return np.stack([np.asarray(Image.fromarray(im).resize((size, size), Image.Resampling.BILINEAR)) for im in images])


def load_images(data: DataConfig, model: ModelConfig, path: Path | None, preset: str,
                progress: bool = True) -> NDArray[np.uint8]:
    """The training images a data config selects, as ``(N, C, H, W)`` uint8."""
    size, channels = model.image_size, model.channels
    if data.source == "fashion-mnist":
        if channels != 1:
            raise DatasetError(f"Fashion-MNIST is greyscale: the model must have 1 channel, not {channels}")
        splits = {"train": ["train"], "val": ["test"], "all": ["train", "test"]}[data.split]
        images = np.concatenate([load_fashion_mnist(path, s)[0] for s in splits])
        return fit_idx_images(images, size)[:, None]
    root = path if path is not None else default_folder(preset)
    if path is None and not root.exists():
        raise DatasetError(
            f"preset {preset!r} reads a folder of images: pass --data PATH "
            f"(e.g. the extracted Oxford Flowers 102 jpg/ folder) or put the images in {root}"
        )
    files = split_files(list_images(root), data.split, data.val_fraction, data.split_seed)
    log.info("%d images from %s (%s split)", len(files), root, data.split)
    return load_folder(files, size, channels, progress)


def compute_normalization(images: NDArray[np.uint8], how: str) -> NormalizationConfig:
    """Per-channel statistics of images in [0, 1] (the Keras example's Normalization layer), or [-1, 1]."""
    channels = images.shape[1]
    if how == "minus-one-one":
        return NormalizationConfig(mean=(0.5,) * channels, std=(0.5,) * channels)
    mean = np.zeros(channels)
    sq = np.zeros(channels)
    for start in range(0, len(images), 4096):  # float64 accumulation in chunks: bounded memory
        chunk = images[start : start + 4096].astype(np.float64) / 255.0
        mean += chunk.sum(axis=(0, 2, 3))
        sq += (chunk**2).sum(axis=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean /= count
    std = np.sqrt(np.maximum(sq / count - mean**2, 1e-6))
    return NormalizationConfig(mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std))
