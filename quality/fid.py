"""``python -m quality fid A B``: the inputs it reads and the statistics files it writes.

An input is an image folder (its image files, not its subfolders), an ``.npz`` with ``images`` ``(N, H, W, C)``
uint8 (what ``ddim-run --npz`` writes; ``(N, H, W)`` reads as grey), or a statistics ``.npz`` with ``mu`` (D,) and
``sigma`` (D, D) (ours, or pytorch-fid's). Statistics files written here also hold ``n`` and ``extractor`` (the
weights and the resize filter they were computed with), and a file of another extractor is refused.
Every refusal is a :class:`QualityError` of one line.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from quality.errors import QualityError
from quality.metrics import Stats

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
_GREY, _RGB = ("1", "L"), ("RGB", "P", "CMYK", "YCbCr")


@dataclass(frozen=True)
class FidInput:
    """What one path gave: images ``(N, H, W, C)`` uint8, or statistics (with the extractor they name)."""

    path: Path
    images: NDArray[np.uint8] | None = None
    stats: Stats | None = None
    extractor: str | None = None

    def describe(self) -> str:
        if self.images is not None:
            n, h, w, c = self.images.shape
            return f"{n} images {h}x{w} {'grey' if c == 1 else 'RGB'}"
        assert self.stats is not None
        return f"statistics of {self.stats.n or '?'} images, {len(self.stats.mu)} features"


def read_input(path: Path) -> FidInput:
    """An image folder, an images .npz or a statistics .npz (see the module docstring)."""
    if path.is_dir():
        return FidInput(path, images=read_folder(path))
    if not path.exists():
        raise QualityError(f"{path} does not exist")
    if path.suffix.lower() != ".npz" or not path.is_file():
        raise QualityError(f"{path} is neither an image folder nor an .npz file")
    return read_npz(path)


def read_folder(folder: Path) -> NDArray[np.uint8]:
    from PIL import Image, UnidentifiedImageError

    files = sorted(p for p in folder.iterdir()
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if not files:
        raise QualityError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    out: list[NDArray[np.uint8]] = []
    for p in files:
        try:
            a = _read_image(p)
        except QualityError:
            raise
        except (OSError, ValueError, Image.DecompressionBombError, UnidentifiedImageError) as exc:
            raise QualityError(f"cannot read image {p}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        a = a[..., None] if a.ndim == 2 else a
        if out and a.shape != out[0].shape:
            raise QualityError(f"images in {folder} differ: {files[0].name} is {_shape(out[0])}, {p.name} is "
                               f"{_shape(a)}")
        out.append(a)
    return check_count(np.stack(out), folder)


def _read_image(p: Path) -> NDArray[np.uint8]:
    """One file as (H, W) grey or (H, W, 3) RGB uint8; an alpha channel only when fully opaque."""
    from PIL import Image

    with Image.open(p) as im:
        mode = im.mode
        if mode in _GREY:
            return np.asarray(im.convert("L"), dtype=np.uint8)
        if mode in _RGB:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
        if mode in ("LA", "RGBA", "PA"):
            a = np.asarray(im.convert("LA" if mode == "LA" else "RGBA"), dtype=np.uint8)
            if (a[..., -1] == 255).all():  # opaque: the alpha channel says nothing
                return a[..., 0] if mode == "LA" else a[..., :3]
            raise QualityError(f"{p} has transparent pixels; FID takes opaque grey or RGB images")
        raise QualityError(f"{p} is a {mode} image; FID takes 8-bit grey or RGB images")


def _shape(a: NDArray[np.uint8]) -> str:
    return f"{a.shape[0]}x{a.shape[1]} {'grey' if a.shape[2] == 1 else 'RGB'}"


def read_npz(path: Path) -> FidInput:
    try:
        loaded = np.load(path, allow_pickle=False)
        if not hasattr(loaded, "files"):  # np.load reads a plain .npy array whatever the file's name
            raise QualityError(f"{path} is a single .npy array, not an .npz file with 'images' or 'mu'/'sigma'")
        with loaded as z:
            keys = set(z.files)
            if "images" in keys:
                return FidInput(path, images=check_count(_npz_images(z["images"], path), path))
            if {"mu", "sigma"} <= keys:
                extractor = _scalar(z, "extractor", str, path) if "extractor" in keys else None
                n = _scalar(z, "n", int, path) if "n" in keys else 0
                return FidInput(path, stats=_npz_stats(z["mu"], z["sigma"], n, path), extractor=extractor)
    except QualityError:
        raise
    except (OSError, ValueError, TypeError, zipfile.BadZipFile, EOFError) as exc:
        raise QualityError(f"cannot read {path} as an .npz file: {str(exc).splitlines()[0] if str(exc) else exc}") \
            from None
    raise QualityError(f"{path} holds neither 'images' (N, H, W, C) uint8 nor statistics 'mu' and 'sigma' "
                       f"(it has: {', '.join(sorted(keys)) or 'nothing'})")


def _scalar(z: Any, key: str, kind: type, path: Path) -> Any:
    a = z[key]
    ok = a.ndim == 0 and (a.dtype.kind in "US" if kind is str else a.dtype.kind in "iu")
    if not ok:
        raise QualityError(f"{path}: '{key}' must be a single {'string' if kind is str else 'integer'}, got "
                           f"{a.dtype} {a.shape}")
    return kind(a)


def _npz_images(a: NDArray, path: Path) -> NDArray[np.uint8]:
    if a.dtype != np.uint8:
        raise QualityError(f"{path}: 'images' are {a.dtype}; FID takes uint8 images (0-255), as ddim-run --npz "
                           f"writes them")
    if a.ndim == 3:
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise QualityError(f"{path}: 'images' have shape {a.shape}; FID takes (N, H, W, C) with C = 1 or 3")
    return a


def _npz_stats(mu: NDArray, sigma: NDArray, n: int, path: Path) -> Stats:
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not len(mu):
        raise QualityError(f"{path}: 'mu' {mu.shape} and 'sigma' {sigma.shape} are not statistics of one "
                           f"feature size (D,) and (D, D)")
    if not (np.issubdtype(mu.dtype, np.floating) and np.issubdtype(sigma.dtype, np.floating)):
        raise QualityError(f"{path}: 'mu' and 'sigma' must be floating point, got {mu.dtype} and {sigma.dtype}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise QualityError(f"{path}: 'mu' or 'sigma' holds NaN or infinity")
    return Stats(mu.astype(np.float64), sigma.astype(np.float64), n)


def check_count(images: NDArray[np.uint8], path: Path) -> NDArray[np.uint8]:
    if len(images) < 2:
        raise QualityError(f"{path} holds {len(images)} image{'s' * (len(images) != 1)}; "
                           f"statistics need at least 2")
    return images


def check_stats(inp: FidInput, dim: int, identity: str | None) -> Stats:
    """The statistics of a statistics input, refused when computed with another extractor or dimension."""
    assert inp.stats is not None
    if len(inp.stats.mu) != dim:
        raise QualityError(f"{inp.path} holds statistics of {len(inp.stats.mu)} features; the Inception features "
                           f"have {dim}")
    if identity is not None and inp.extractor is not None and inp.extractor != identity:
        raise QualityError(f"{inp.path} was computed with {inp.extractor}, not {identity} (a different --resize or "
                           f"weights): compute both sides alike")
    return inp.stats


def check_npz_name(path: Path) -> None:
    if path.suffix.lower() != ".npz":
        raise QualityError(f"--save-stats {path}: statistics are written as an .npz file")


def save_stats(path: Path, stats: Stats, identity: str) -> None:
    """``mu``, ``sigma`` (float64; pytorch-fid reads these), ``n`` and ``extractor``, written atomically."""
    from runtime.common.files import atomic_path

    check_npz_name(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, mu=stats.mu, sigma=stats.sigma, n=np.int64(stats.n), extractor=np.str_(identity))
