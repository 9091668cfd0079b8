"""Latents on disk and between two of them: what ``ddim-encode`` writes and ``ddim-run --latents`` /
``--interpolate`` read.

A latents file is an ``.npz`` (read with ``allow_pickle=False``) holding

- ``latents``: ``(N, C, H, W)`` float32, x_T in model space;
- ``settings``: the :class:`runtime.settings.SamplingSettings` the encoding used, as JSON;
- ``model_sha256``: the model's identity (:func:`model_identity`), so latents of another model are refused;
- ``names``: where each came from (file names), for the user;
- ``schema``: :data:`SCHEMA`.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from runtime.common.files import sha256_file
from runtime.exportdir import FP32_ONNX, RUN_WEIGHTS
from runtime.settings import SamplingSettings

SCHEMA = 1
MAX_BYTES = 4 << 30  # 4 GiB of latents is ~1M Fashion-MNIST images: refuse bigger before reading


def model_identity(path: Path) -> str:
    """The sha256 that names a model across its files: an export folder's float32 ONNX (its FP16, INT8 and
    engine files are the same model), a run directory's weights, else the file itself."""
    for candidate in (path / FP32_ONNX, path / RUN_WEIGHTS) if path.is_dir() else (path,):
        if candidate.is_file():
            return sha256_file(candidate)
    raise ValueError(f"{path} holds no {FP32_ONNX} or {RUN_WEIGHTS} to identify the model by")


def latents_bytes(latents: NDArray[np.float32], settings: SamplingSettings, model_sha256: str,
                  names: list[str]) -> bytes:
    """The ``.npz`` of a latents file (see the module docstring)."""
    buf = io.BytesIO()
    np.savez(buf, latents=np.asarray(latents, np.float32), settings=np.array(json.dumps(settings.to_dict())),
             model_sha256=np.array(model_sha256), names=np.array(names, dtype=str), schema=np.array(SCHEMA))
    return buf.getvalue()


def read_latents(path: Path, shape: tuple[int, int, int],
                 model_sha256: str | None = None) -> tuple[NDArray[np.float32], dict[str, Any]]:
    """Latents for a model taking ``(C, H, W)`` and, when given, of identity ``model_sha256``; the file's settings
    (a dict, empty when the file has none). ValueError in one line for anything else: not an npz, no
    ``latents``, another shape, NaN/Inf, another model."""
    if not path.is_file():
        raise ValueError(f"{path} does not exist or is not a file")
    if path.stat().st_size > MAX_BYTES:
        raise ValueError(f"{path} is larger than {MAX_BYTES >> 30} GiB: not a latents file")
    try:
        with np.load(path, allow_pickle=False) as data:
            if "latents" not in data.files:
                raise ValueError(f"{path} holds no 'latents' array (has: {', '.join(data.files) or 'nothing'})")
            latents = np.asarray(data["latents"])
            meta = {k: data[k].item() if data[k].ndim == 0 else data[k].tolist()
                    for k in ("settings", "model_sha256", "names", "schema") if k in data.files}
    except ValueError:
        raise
    except Exception as exc:  # zipfile/npy errors of a torn or foreign file
        raise ValueError(f"{path} is not a readable .npz ({type(exc).__name__}: {exc})".splitlines()[0]) from None
    latents = check_batch(latents[None] if latents.ndim == 3 else latents, shape, f"{path}: latents")
    recorded = meta.get("model_sha256")
    if model_sha256 is not None and recorded and recorded != model_sha256:
        raise ValueError(f"{path} holds latents of another model (sha256 {str(recorded)[:12]}..., this one "
                         f"{model_sha256[:12]}...): encode with this model")
    settings: dict[str, Any] = {}
    if "settings" in meta:
        try:
            settings = dict(json.loads(str(meta["settings"])))
        except (ValueError, TypeError):
            settings = {}
    return latents, settings


def check_batch(x: NDArray[np.floating], shape: tuple[int, int, int], what: str) -> NDArray[np.float32]:
    """``x`` as float32 ``(N, C, H, W)`` with ``(C, H, W) == shape``, N >= 1, finite; ValueError in one line naming
    ``what`` otherwise. The one check of model-space batches (latents and images) given to the sampler."""
    arr = np.asarray(x)
    if arr.ndim != 4 or tuple(arr.shape[1:]) != shape or len(arr) == 0:
        raise ValueError(f"{what} of shape {tuple(arr.shape)}: this model takes (N, {', '.join(map(str, shape))}), "
                         "N >= 1")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"{what} must be floating point (model space), got {arr.dtype}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{what} hold NaN or Inf ({int((~np.isfinite(arr)).sum())} values)")
    return np.ascontiguousarray(arr, dtype=np.float32)


def slerp(a: NDArray[np.floating], b: NDArray[np.floating], frames: int) -> NDArray[np.float32]:
    """``frames`` latents on the great circle from ``a`` to ``b`` (each ``(C, H, W)``), both ends included: spherical
    interpolation keeps the norm a Gaussian latent has (a straight line through the middle would shrink it);
    nearly parallel ends fall back to a straight line. Computed in float64."""
    if frames < 2:
        raise ValueError(f"frames must be >= 2, got {frames}")
    x, y = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
    cos = float(np.dot(x, y) / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-300))
    theta = math.acos(min(1.0, max(-1.0, cos)))
    out = []
    for t in np.linspace(0.0, 1.0, frames):
        if theta < 1e-6:
            z = (1 - t) * x + t * y
        else:
            z = (math.sin((1 - t) * theta) * x + math.sin(t * theta) * y) / math.sin(theta)
        out.append(z.reshape(np.shape(a)))
    return np.stack(out).astype(np.float32)
