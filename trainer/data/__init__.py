"""Training images as one in-memory ``(N, C, H, W)`` uint8 array, and their normalisation."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from runtime.config import ModelConfig, ModelSpec, NormalizationConfig
from runtime.common.files import cache_dir
from trainer.config import DataConfig, RunConfig, Split
from trainer.data.cifar10 import load_cifar10
from trainer.data.fashion_mnist import load_fashion_mnist
from trainer.data.flowers import ensure_flowers
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
    return resize_images(images[:, None], size)[:, 0]


def resize_images(images: NDArray[np.uint8], size: int) -> NDArray[np.uint8]:
    """``(N, C, H, W)`` uint8 square images to ``size`` (antialiased bilinear); unchanged when equal."""
    if images.shape[-1] == size:
        return images
    out = np.empty(images.shape[:2] + (size, size), dtype=np.uint8)
    for i, im in enumerate(images):
        for c, plane in enumerate(im):
            out[i, c] = np.asarray(Image.fromarray(plane).resize((size, size), Image.Resampling.BILINEAR))
    return out


OFFICIAL_SPLITS = {"train": ["train"], "val": ["test"], "all": ["train", "test"]}


def _need_channels(source: str, want: int, have: int) -> None:
    if want != have:
        raise DatasetError(f"{source} images have {have} channel(s): the model must have {have}, not {want}")


def load_images(data: DataConfig, model: ModelConfig, path: Path | None, preset: str,
                progress: bool = True) -> NDArray[np.uint8]:
    """The training images a data config selects, as ``(N, C, H, W)`` uint8."""
    size, channels = model.image_size, model.channels
    if data.source == "fashion-mnist":
        _need_channels("Fashion-MNIST", channels, 1)
        images = np.concatenate([load_fashion_mnist(path, s)[0] for s in OFFICIAL_SPLITS[data.split]])
        return fit_idx_images(images, size)[:, None]
    if data.source == "cifar10":
        _need_channels("CIFAR-10", channels, 3)
        split = {"train": "train", "val": "test", "all": "all"}[data.split]
        return resize_images(load_cifar10(path, split)[0], size)
    if data.source == "oxford-flowers":
        root = path if path is not None else ensure_flowers()
    else:
        root = path if path is not None else default_folder(preset)
    if path is None and not root.exists():
        raise DatasetError(
            f"preset {preset!r} reads a folder of images: pass --data PATH or put the images in {root}"
        )
    files = split_files(list_images(root), data.split, data.val_fraction, data.split_seed)
    log.info("%d images from %s (%s split)", len(files), root, data.split)
    return load_folder(files, size, channels, progress)


def model_split_images(spec: ModelSpec, split: Split, path: Path | None) -> NDArray[np.uint8]:
    """A split of the dataset a trained model's config names, unaugmented, as ``(N, C, H, W)`` uint8:
    the reference set for calibration and quality scores."""
    cfg = RunConfig.from_spec(spec)
    data = dataclasses.replace(cfg.data, split=split, random_flip=False)
    return load_images(data, cfg.model, path, cfg.preset, progress=False)


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
