"""Features cached on disk, keyed by the images' hash and the extractor, so a reference set (Fashion-MNIST's
10,000 test images: about 13 minutes of InceptionV3 on 2 CPU cores) goes through the network once.

Layout, in ``cache_dir()/fid``: ``features-KEY.npy`` (float32 ``(N, D)``: the statistics and KID's subsets both
come from it; 80 MB for 10,000 Inception features), KEY being the sha256 of the images' shape and bytes and of
the extractor's identity (weights and resize filter); ``inception-*.onnx`` and its ``.json`` record
(:mod:`quality.inception`). Writes are atomic; an entry that does not load as the features it names is dropped
and computed again; a cache that cannot be written costs time only (one warning). The folder
is trimmed to ``DDIM_DEPLOY_CACHE_MAX_MB`` (default 1024) after each write, least recently used first, the newest
entry always kept. ``DDIM_DEPLOY_FID_CACHE=0`` (or ``off``/``false``/``no``) turns it off.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray

from runtime.common.files import atomic_path, cache_dir

if TYPE_CHECKING:
    from quality.features import FeatureExtractor
    from quality.metrics import Stats

log = logging.getLogger(__name__)
ENTRY = re.compile(r"^(features-[0-9a-f]{32}\.npy|inception-[\w.+-]+\.(onnx|json))$")
TMP = re.compile(r"^\.(features-[0-9a-f]{32}\.npy|inception-[\w.+-]+\.(onnx|json))\.\w+\.tmp$")
STALE_TMP_SECONDS = 3600.0  # no write takes an hour: older temp files are a killed writer's
OFF_VALUES = ("0", "off", "false", "no")
DEFAULT_MAX_MB = 1024.0
_WARNED_MAX_MB: set[str] = set()  # values of DDIM_DEPLOY_CACHE_MAX_MB warned about in this process


def folder() -> Path:
    return cache_dir() / "fid"


def enabled() -> bool:
    return os.environ.get("DDIM_DEPLOY_FID_CACHE", "1").strip().lower() not in OFF_VALUES


def images_key(images: NDArray[np.uint8], identity: str) -> str:
    """32 hex digits naming (these exact images, this extractor)."""
    digest = hashlib.sha256(f"{identity}|{images.dtype.str}|{images.shape}|".encode())
    digest.update(np.ascontiguousarray(images).data)
    return digest.hexdigest()[:32]


def cached_features(ext: "FeatureExtractor", images: NDArray[np.uint8], use_cache: bool = True) -> NDArray[np.float64]:
    """``ext.features(images)`` for images (N, H, W, C), from the cache when they are there."""
    identity = getattr(ext, "identity", None)
    if not (use_cache and enabled() and identity):
        return ext.features(images)
    try:
        path = folder() / f"features-{images_key(images, identity)}.npy"
    except RuntimeError as exc:  # no home folder to put the cache in
        from quality.inception import warn_cache_off

        warn_cache_off(Path("~/.cache"), OSError(str(exc)))
        return ext.features(images)
    hit = _load(path, len(images), getattr(ext, "num_features", None))
    if hit is not None:
        log.info("features of %d images from the cache (%s)", len(images), path)
        return hit
    feats = ext.features(images)
    _save(path, feats)
    return feats


def cached_stats(ext: "FeatureExtractor", images: NDArray[np.uint8], use_cache: bool = True) -> "Stats":
    """The feature statistics of ``images`` (see :func:`cached_features`)."""
    from quality.metrics import feature_stats

    return feature_stats(cached_features(ext, images, use_cache))


def _load(path: Path, n: int, dim: int | None) -> NDArray[np.float64] | None:
    try:
        if not path.is_file():
            return None
    except OSError as exc:  # a folder we may not search: the same as one we cannot write
        from quality.inception import warn_cache_off

        warn_cache_off(path.parent, exc)
        return None
    try:
        feats = np.load(path, allow_pickle=False)
        if (not isinstance(feats, np.ndarray) or feats.dtype != np.float32 or feats.ndim != 2 or len(feats) != n
                or (dim is not None and feats.shape[1] != dim) or not np.isfinite(feats).all()):
            raise ValueError(f"{getattr(feats, 'dtype', type(feats))} {getattr(feats, 'shape', '')}, expected "
                             f"float32 ({n}, {dim or 'D'})")
    except Exception as exc:  # noqa: BLE001 - a torn or foreign file: any reason means "compute again"
        log.warning("dropped cached features %s (%s); computing them again", path, str(exc).splitlines()[0])
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    with contextlib.suppress(OSError):
        os.utime(path)
    return feats.astype(np.float64)


def _save(path: Path, feats: NDArray[np.float64]) -> None:
    from quality.inception import warn_cache_off

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, feats.astype(np.float32), allow_pickle=False)  # the network's own precision
        trim(path.parent, keep=path)
    except OSError as exc:
        warn_cache_off(path.parent, exc)


def max_bytes() -> int:
    """The folder's size bound from ``DDIM_DEPLOY_CACHE_MAX_MB`` (default :data:`DEFAULT_MAX_MB`); a value that
    is not a size in MB is warned about once and the default used."""
    raw = os.environ.get("DDIM_DEPLOY_CACHE_MAX_MB", "")
    if not raw.strip():
        return int(DEFAULT_MAX_MB * (1 << 20))
    try:
        mb = float(raw)
        if not mb >= 0 or mb == float("inf"):
            raise ValueError
    except ValueError:
        if raw not in _WARNED_MAX_MB:
            _WARNED_MAX_MB.add(raw)
            log.warning("DDIM_DEPLOY_CACHE_MAX_MB=%r is not a size in MB (a number >= 0); using %.0f", raw,
                        DEFAULT_MAX_MB)
        mb = DEFAULT_MAX_MB
    return int(mb * (1 << 20))


def trim(where: Path, keep: Path, limit: int | None = None) -> None:
    """Delete this cache's least recently used files until they total at most ``limit`` bytes; ``keep``
    (and the record beside it) stays whatever its size. Files that are not this cache's are never touched."""
    import time

    limit = max_bytes() if limit is None else limit
    files = []
    for p in where.iterdir():
        with contextlib.suppress(OSError):
            if TMP.match(p.name) and p.is_file() and time.time() - p.stat().st_mtime > STALE_TMP_SECONDS:
                p.unlink()
            elif ENTRY.match(p.name) and p.is_file() and not p.is_symlink():
                files.append((p.stat().st_mtime, p.stat().st_size, p))
    total = sum(size for _, size, _ in files)
    protected = {keep, keep.with_suffix(".json")}
    for _, size, p in sorted(files):
        if total <= limit:
            break
        if p in protected:
            continue
        with contextlib.suppress(OSError):
            p.unlink()
            total -= size
