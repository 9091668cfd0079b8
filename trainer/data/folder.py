"""Any folder of images (recursive jpg/png/webp): Oxford Flowers 102, CelebA-HQ, your own."""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, UnidentifiedImageError

from runtime.common.progress import progress_bar
from trainer.errors import DatasetError

log = logging.getLogger(__name__)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted by path (a stable order for seeded splits)."""
    if not root.exists():
        raise DatasetError(f"image folder {root} does not exist")
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder of images")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise DatasetError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {root}")
    return files


def split_files(files: list[Path], split: str, val_fraction: float, seed: int) -> list[Path]:
    """A seeded random train / validation split ('all' keeps everything)."""
    if split == "all":
        return files
    order = np.random.default_rng(seed).permutation(len(files))
    n_val = int(round(len(files) * val_fraction))
    chosen = order[:n_val] if split == "val" else order[n_val:]
    if len(chosen) == 0:
        raise DatasetError(f"the {split} split of {len(files)} images with val_fraction {val_fraction} is empty")
    return [files[i] for i in sorted(chosen)]


def center_crop_resize(img: Image.Image, size: int) -> Image.Image:
    """Centre square crop, then antialiased bilinear resize (Pillow filters downscale with support)."""
    w, h = img.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return img if side == size else img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)


def load_image(path: Path, size: int, channels: int) -> NDArray[np.uint8]:
    """One image as ``(C, size, size)`` uint8."""
    mode = "L" if channels == 1 else "RGB"
    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            arr = np.asarray(center_crop_resize(img, size), dtype=np.uint8)
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def load_folder(files: list[Path], size: int, channels: int, progress: bool = True) -> NDArray[np.uint8]:
    """Decode, crop and resize every file into one ``(N, C, size, size)`` uint8 array."""
    out = np.empty((len(files), channels, size, size), dtype=np.uint8)
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:  # Pillow releases the GIL while decoding
        results = pool.map(lambda p: load_image(p, size, channels), files)
        for i, arr in enumerate(progress_bar(results, total=len(files), desc="loading images", unit="img",
                                             disable=not progress, leave=False)):
            out[i] = arr
    return out
