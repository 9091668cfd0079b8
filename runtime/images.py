"""From model-space arrays to pixels: de-normalisation, uint8 conversion, and grids as PNG, JPEG or WebP."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from runtime.config import NormalizationConfig
from runtime.common.files import atomic_write_bytes


def to_uint8(x: NDArray[np.floating], norm: NormalizationConfig) -> NDArray[np.uint8]:
    """Model-space ``(N, C, H, W)`` to ``(N, H, W, C)`` uint8: de-normalise, clip to [0, 1], round."""
    if x.ndim != 4 or x.shape[1] != len(norm.mean):
        raise ValueError(f"expected (N, {len(norm.mean)}, H, W) images, got shape {tuple(x.shape)}")
    mean = np.asarray(norm.mean, dtype=np.float64).reshape(1, -1, 1, 1)
    std = np.asarray(norm.std, dtype=np.float64).reshape(1, -1, 1, 1)
    pixels = np.clip(x.astype(np.float64) * std + mean, 0.0, 1.0)
    return np.rint(pixels * 255.0).astype(np.uint8).transpose(0, 2, 3, 1)


def make_grid(images: NDArray[np.uint8], ncols: int | None = None, pad: int = 2) -> NDArray[np.uint8]:
    """Tile ``(N, H, W, C)`` uint8 images into one ``(H', W', C)`` image with white padding."""
    if images.ndim != 4 or images.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, H, W, C) batch, got shape {images.shape}")
    n, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = images[i]
    return grid


def grid_scale(image_size: int, n: int, target: int = 512) -> int:
    """Integer enlargement that makes a grid of ``n`` small images about ``target`` pixels wide."""
    return max(1, target // (image_size * math.ceil(math.sqrt(n))))


# File suffix -> Pillow format. PNG and WebP are written lossless; JPEG at quality 95 without chroma
# subsampling (small grey images survive it; colour edges blur less).
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def image_format(path: str | Path) -> str:
    """The Pillow format a file name asks for by its suffix; ValueError naming the allowed ones."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{path}: unknown image type {suffix or '(no suffix)'!r}; "
                         f"allowed: {', '.join(IMAGE_FORMATS)}")
    fmt = IMAGE_FORMATS[suffix]
    from PIL import features

    if fmt == "WEBP" and not features.check("webp"):
        raise ValueError(f"{path}: this Pillow was built without WebP support; use .png or .jpg")
    return fmt


def image_bytes(image: NDArray[np.uint8], fmt: str = "PNG") -> bytes:
    """Encode an ``(H, W, C)`` uint8 image (C = 1 or 3) as ``fmt`` (PNG, JPEG or WEBP)."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    options = {"JPEG": {"quality": 95, "subsampling": 0}, "WEBP": {"lossless": True}}.get(fmt, {})
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **options)
    return buf.getvalue()


def png_bytes(image: NDArray[np.uint8]) -> bytes:
    """Encode an ``(H, W, C)`` uint8 image (C = 1 or 3) as PNG."""
    return image_bytes(image, "PNG")


def grid_bytes(images: NDArray[np.uint8], ncols: int | None = None, scale: int = 1, fmt: str = "PNG") -> bytes:
    """A grid of ``(N, H, W, C)`` uint8 images encoded as ``fmt``; ``scale`` enlarges small images."""
    grid = make_grid(images, ncols)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return image_bytes(grid, fmt)


def grid_png(images: NDArray[np.uint8], ncols: int | None = None, scale: int = 1) -> bytes:
    """The PNG bytes of a grid of ``(N, H, W, C)`` uint8 images; ``scale`` enlarges small images."""
    return grid_bytes(images, ncols, scale, "PNG")


def save_grid(path: str | Path, images: NDArray[np.uint8], ncols: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of ``(N, H, W, C)`` uint8 images atomically; ``scale`` enlarges small images."""
    path = Path(path)
    atomic_write_bytes(path, grid_png(images, ncols, scale))
    return path
