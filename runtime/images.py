"""From model-space arrays to pixels: de-normalisation, uint8 conversion and PNG grids."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image

from runtime.config import NormalizationConfig
from runtime.files import atomic_write_bytes


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


def png_bytes(image: NDArray[np.uint8]) -> bytes:
    """Encode an ``(H, W, C)`` uint8 image (C = 1 or 3) as PNG."""
    arr = image[..., 0] if image.shape[-1] == 1 else image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def grid_png(images: NDArray[np.uint8], ncols: int | None = None, scale: int = 1) -> bytes:
    """The PNG bytes of a grid of ``(N, H, W, C)`` uint8 images; ``scale`` enlarges small images."""
    grid = make_grid(images, ncols)
    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    return png_bytes(grid)


def save_grid(path: str | Path, images: NDArray[np.uint8], ncols: int | None = None, scale: int = 1) -> Path:
    """Write a PNG grid of ``(N, H, W, C)`` uint8 images atomically; ``scale`` enlarges small images."""
    path = Path(path)
    atomic_write_bytes(path, grid_png(images, ncols, scale))
    return path
