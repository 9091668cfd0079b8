"""User images in: what ``ddim-encode MODEL INPUT`` (DDIM inversion) and ``ddim-run --init-images INPUT``
(image-to-image) read, checked against the model, and their conversion to model space.

``INPUT`` is one image file (anything Pillow opens: PNG, JPEG, WebP, BMP, ...), a folder of image files
(sorted by name, hidden files and subfolders skipped; every other file must be an image: nothing is skipped
in silence) or an ``.npz`` holding ``images`` ``(N, H, W, C)`` or ``(N, H, W)`` uint8 (what ``ddim-run --npz``
writes). Every refusal is an :class:`InputError` (a ValueError) of one line naming the file and, where it
applies, what the model takes.

The rules an image meets (a file's pixels as Pillow decodes them, after its EXIF orientation is applied;
a multi-frame file gives its first frame):

- **Channels.** Grey images are modes ``1`` and ``L``; colour images ``RGB``. A palette image is turned into
  RGB and counts as grey when every pixel it uses is grey (R = G = B). An alpha channel (``LA``, ``RGBA``,
  ``PA``, a PNG ``tRNS`` colour) is dropped when every pixel is opaque; transparent pixels are an error
  (there is no honest background to put behind them). A grey image for a colour model, or a colour image for
  a grey model, is an error: nothing converts between them in silence. Images of more than 8 bits per sample
  (16-bit grey ``I;16``, 32-bit ``I`` and ``F``) are refused rather than scaled, since how their range maps to
  0..255 is the user's call; ``CMYK`` and other modes are refused too.
- **Size.** Images must be ``size`` x ``size`` (sizes are written width x height). With ``resize``, each image
  is centre-cropped to a square (the largest one, odd pixels going to the right / bottom) and resized to
  ``size`` x ``size`` with Pillow's LANCZOS filter (antialiased when it shrinks); an image that is already
  ``size`` x ``size`` is kept bit for bit. The trainer's data pipeline uses antialiased bilinear instead.
- **Count.** At most ``limit`` images, checked before any pixel is decoded (from the folder's listing, or
  the npz header).

An npz is read with ``allow_pickle=False``; its array header is checked (dtype uint8, shape, count, size and
channels) before the array is read.
"""

from __future__ import annotations

import os
import stat
import zipfile
import zlib
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

RESAMPLE = Image.Resampling.LANCZOS
"""The filter of ``resize=True``."""

NPZ_KEY = "images"
_NPY_MAGIC = b"\x93NUMPY"
_DESC = {1: "grey", 3: "RGB"}


class InputError(ValueError):
    """An input image, folder or npz that the model cannot take; the message is one line."""


def _show(path: object) -> str:
    """A path for a one-line message (a name with a newline or other control character is quoted)."""
    s = str(path)
    return s if s.isprintable() else repr(s)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0].strip() if lines else type(exc).__name__


def _takes(channels: int) -> str:
    return f"the model takes {channels} ({_DESC[channels]})"


def _channels_text(k: int) -> str:
    return f"{k} channel{'' if k == 1 else 's'}" + (f" ({_DESC[k]})" if k in _DESC else "")


def _size_error(what: str, w: int, h: int, size: int) -> InputError:
    return InputError(f"{what} {w}x{h}; the model takes {size}x{size} images "
                      f"(pass --resize to centre-crop and resize)")


def _is_regular(path: Path) -> bool:
    return stat.S_ISREG(os.stat(path).st_mode)


# --- one image ------------------------------------------------------------------------------------------------


def _opaque(arr: NDArray[np.uint8], path: Path) -> NDArray[np.uint8]:
    """``arr`` without its last (alpha) channel, when every pixel is opaque."""
    if (arr[..., -1] != 255).any():
        raise InputError(f"{_show(path)} has transparent pixels; the model takes opaque images")
    return arr[..., :-1]


def _pixels(im: Image.Image, path: Path) -> NDArray[np.uint8]:
    """A decoded image as ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8, by the rules of the module docstring."""
    mode = im.mode
    if mode in ("1", "L", "RGB") and "transparency" in im.info:  # a PNG tRNS colour: alpha in disguise
        im = im.convert("LA" if mode in ("1", "L") else "RGBA")
        mode = im.mode
    if mode in ("1", "L"):
        return np.asarray(im.convert("L"), dtype=np.uint8)
    if mode in ("RGB", "RGBX", "YCbCr"):
        return np.asarray(im.convert("RGB"), dtype=np.uint8)
    if mode == "LA":
        return _opaque(np.asarray(im, dtype=np.uint8), path)[..., 0]
    if mode in ("RGBA", "P", "PA"):
        rgb = _opaque(np.asarray(im.convert("RGBA"), dtype=np.uint8), path)
        if mode != "RGBA" and (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all():
            return np.ascontiguousarray(rgb[..., 0])  # a palette of greys: a grey image
        return rgb
    kind = {"I;16": "16-bit grey", "I;16B": "16-bit grey", "I;16L": "16-bit grey", "I;16N": "16-bit grey",
            "I": "32-bit integer", "F": "32-bit float"}.get(mode, mode)
    detail = "" if kind == mode else f" (mode {mode})"
    raise InputError(f"{_show(path)} is a {kind} image{detail}; the model takes 8-bit grey or RGB images "
                     f"(convert it first)")


def _centre_square(im: Image.Image, size: int) -> Image.Image:
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    if side != w or side != h:
        im = im.crop((left, top, left + side, top + side))
    return im if side == size else im.resize((size, size), RESAMPLE)


def _fit(arr: NDArray[np.uint8], what: str, size: int, resize: bool) -> NDArray[np.uint8]:
    """``(H, W)`` or ``(H, W, 3)`` uint8 as ``(size, size, C)``: checked, or centre-cropped and resized."""
    h, w = arr.shape[:2]
    if (h, w) != (size, size):
        if not resize:
            raise _size_error(f"{what} is", w, h, size)
        arr = np.asarray(_centre_square(Image.fromarray(arr), size), dtype=np.uint8)
    return arr[..., None] if arr.ndim == 2 else arr


def _read_file(path: Path, size: int, channels: int, resize: bool) -> NDArray[np.uint8]:
    """One image file as ``(size, size, channels)`` uint8."""
    shown = _show(path)
    try:
        if not _is_regular(path):  # a FIFO or a device would block or never end
            raise InputError(f"{shown} is not a regular file")
        with Image.open(path) as im:
            ImageOps.exif_transpose(im, in_place=True)
            arr = _pixels(im, path)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{shown} is not an image Pillow can read") from None
    except FileNotFoundError:
        raise InputError(f"{shown} does not exist") from None
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise InputError(f"{shown} is not an image Pillow can read ({_first_line(exc)})") from None
    k = 1 if arr.ndim == 2 else 3
    if k != channels:
        raise InputError(f"{shown} has {_channels_text(k)}; {_takes(channels)}")
    return _fit(arr, shown, size, resize)


# --- a folder -------------------------------------------------------------------------------------------------


def _folder_files(folder: Path, limit: int) -> list[Path]:
    try:
        entries = sorted((e for e in folder.iterdir() if not e.name.startswith(".")), key=lambda e: e.name)
        files = [e for e in entries if not e.is_dir()]  # not recursive
    except OSError as exc:
        raise InputError(f"cannot list {_show(folder)} ({_first_line(exc)})") from None
    if not files:
        raise InputError(f"{_show(folder)} holds no images")
    if len(files) > limit:
        raise InputError(f"{_show(folder)} holds {len(files)} files; at most {limit} images are read at once")
    return files


# --- an npz ---------------------------------------------------------------------------------------------------


def _npz_header(zf: zipfile.ZipFile, member: str) -> tuple[tuple[int, ...], np.dtype]:
    with zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        else:  # 2.0 and 3.0 differ from 1.0 only in the header's length field (3.0 also in its encoding)
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return tuple(int(n) for n in shape), np.dtype(dtype)


def _check_npz_header(shape: tuple[int, ...], dtype: np.dtype, shown: str, size: int, channels: int,
                      resize: bool, limit: int) -> None:
    expected = "expected (N, H, W, C) or (N, H, W) uint8 images, as ddim-run --npz writes"
    if dtype != np.uint8:
        raise InputError(f"{shown}: '{NPZ_KEY}' is {dtype.str if dtype.fields else dtype.name}, not uint8; {expected}")
    if len(shape) not in (3, 4):
        raise InputError(f"{shown}: '{NPZ_KEY}' has shape {shape}; {expected}")
    n, h, w = shape[:3]
    if n == 0:
        raise InputError(f"{shown} holds 0 images")
    if n > limit:
        raise InputError(f"{shown} holds {n} images; at most {limit} are read at once")
    k = shape[3] if len(shape) == 4 else 1
    if k != channels:
        raise InputError(f"{shown} holds images of {_channels_text(k)}; {_takes(channels)}")
    if h == 0 or w == 0:
        raise InputError(f"{shown} holds empty {w}x{h} images")
    if (h, w) != (size, size):
        if not resize:
            raise _size_error(f"{shown} holds images of", w, h, size)
        cap = Image.MAX_IMAGE_PIXELS
        if cap is not None and h * w > cap:
            raise InputError(f"{shown} holds {w}x{h} images: more than Pillow's limit of {cap} pixels an image")


def _read_npz(path: Path, size: int, channels: int, resize: bool,
              limit: int) -> tuple[NDArray[np.uint8], list[str]]:
    shown = _show(path)
    member = NPZ_KEY + ".npy"
    try:
        if not _is_regular(path):
            raise InputError(f"{shown} is not a regular file")
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
            if member not in names:
                keys = sorted(n.removesuffix(".npy") for n in names)
                have = ", ".join(keys[:10]) + (", ..." if len(keys) > 10 else "") if keys else "nothing"
                raise InputError(f"{shown} holds no '{NPZ_KEY}' array (it has: {have}); expected (N, H, W, C) uint8 "
                                 f"images, as ddim-run --npz writes")
            shape, dtype = _npz_header(zf, member)
            _check_npz_header(shape, dtype, shown, size, channels, resize, limit)
            with zf.open(member) as f:
                arr = np.lib.format.read_array(f, allow_pickle=False)
    except InputError:
        raise
    except (OSError, ValueError, TypeError, EOFError, SyntaxError, NotImplementedError, RuntimeError,
            zipfile.BadZipFile, zlib.error) as exc:
        try:
            with open(path, "rb") as fh:
                npy = fh.read(len(_NPY_MAGIC)) == _NPY_MAGIC
        except OSError:
            npy = False
        if npy:
            raise InputError(f"{shown} is a single .npy array, not an .npz holding '{NPZ_KEY}'") from None
        raise InputError(f"{shown} is not a readable .npz file ({_first_line(exc)})") from None
    if arr.shape != shape:
        raise InputError(f"{shown}: '{NPZ_KEY}' does not match its header ({arr.shape} vs {shape})")
    arr = arr[..., None] if arr.ndim == 3 else arr
    names_out = [f"{path.name}[{i}]" for i in range(arr.shape[0])]
    if arr.shape[1:3] == (size, size):
        return np.ascontiguousarray(arr), names_out
    out = np.empty((arr.shape[0], size, size, channels), dtype=np.uint8)
    for i in range(arr.shape[0]):
        out[i] = _fit(arr[i, ..., 0] if channels == 1 else arr[i], f"{shown}[{i}]", size, True)
    return out, names_out


# --- the entry points -----------------------------------------------------------------------------------------


def read_images(source: Path, size: int, channels: int, resize: bool = False,
                limit: int = 100_000) -> tuple[NDArray[np.uint8], list[str]]:
    """The images of ``source`` (an image file, a folder of them, or an npz of ``images``) as
    ``(N, size, size, channels)`` uint8, and a name for each (its file name, or ``NAME.npz[i]``).

    ``channels`` is the model's (1 grey, 3 RGB). With ``resize``, images of another size are centre-cropped to
    a square and resized with LANCZOS; else they are an error. The rules are in the module docstring; every
    refusal is an :class:`InputError` (ValueError) of one line.
    """
    if channels not in _DESC:
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"size must be an integer >= 1, got {size!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be an integer >= 1, got {limit!r}")
    source = Path(source)
    if not source.exists():
        raise InputError(f"{_show(source)} does not exist")
    if source.is_dir():
        files = _folder_files(source, limit)
        out = np.empty((len(files), size, size, channels), dtype=np.uint8)
        for i, p in enumerate(files):
            out[i] = _read_file(p, size, channels, resize)
        return out, [p.name for p in files]
    if source.suffix.lower() == ".npz":
        return _read_npz(source, size, channels, resize, limit)
    return _read_file(source, size, channels, resize)[None], [source.name]


def to_model_space(images: NDArray[np.uint8], mean: tuple[float, ...],
                   std: tuple[float, ...]) -> NDArray[np.float32]:
    """``(N, H, W, C)`` uint8 to ``(N, C, H, W)`` float32 model space: ``(u / 255 - mean) / std`` per channel.

    The inverse of :func:`runtime.images.to_uint8` with the same mean and std: computed in float64 and
    rounded once to float32, so ``to_uint8(to_model_space(u), norm)`` gives ``u`` back bit for bit.
    """
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4:
        what = f"{images.dtype} {tuple(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
        raise ValueError(f"expected (N, H, W, C) uint8 images, got {what}")
    c = images.shape[3]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"normalization has {len(mean)} mean and {len(std)} std values for {c}-channel images")
    m = np.asarray(mean, dtype=np.float64).reshape(1, 1, 1, -1)
    s = np.asarray(std, dtype=np.float64).reshape(1, 1, 1, -1)
    if not (np.isfinite(m).all() and np.isfinite(s).all() and (s > 0).all()):
        raise ValueError("normalization mean and std must be finite, and std > 0")
    x = (images.astype(np.float64) / 255.0 - m) / s
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)
