"""Shards of a sampling run and where they are kept: in memory, or an ``--out-dir`` that a rerun resumes. Ray-free.

Images ``0 .. total - 1`` of one seed are split into shards of ``shard_size`` consecutive indices (the last one may
be shorter); shard k holds images ``k * shard_size ..``. An ``--out-dir`` holds

- ``shard-KKKKKK.npz`` per shard done (``indices`` int64 ``(n,)``, ``seed``, ``samples`` float32 ``(n, C, H, W)``,
  ``images`` uint8 ``(n, H, W, C)``, ``schema``), each written atomically (a temporary file, then a rename);
- ``manifest.json``: the run's identity (the model's sha256, the engine, the resolved sampling settings, seed, total,
  shard size, image shape) and each shard done with its file's sha256 and the worker that made it. It is rewritten
  (atomically) after shard files are in place, at most every :data:`MANIFEST_EVERY_S` seconds and when the run ends
  or stops (a manifest of 10,000 shards rewritten after each would cost gigabytes), so a shard is done only once its
  file is complete; a kill -9 loses at most those seconds of recording, and the unrecorded shards are redone.

A rerun into the same folder takes the shards the manifest lists whose file still has that sha256 and redoes the
rest (missing, corrupt, or written but not yet recorded when the run was killed); a manifest of another identity is
refused in one line: images of two runs are never mixed. One writer at a time (an OS lock beside the folder).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from runtime.common.files import PathLock, atomic_write_bytes, atomic_write_text, read_capped

SCHEMA = 1
KIND = "ddim-run shards"
MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 64 << 20  # ~150 bytes a shard: 400,000 shards
MANIFEST_EVERY_S = 2.0


class ShardError(ValueError):
    """A shard folder or file that cannot be used; one line saying why and what to do."""


@dataclass(frozen=True)
class Shard:
    """Shard ``index``: ``count`` images from index ``first`` on."""

    index: int
    first: int
    count: int

    @property
    def name(self) -> str:
        """Its file's name in ``--out-dir``."""
        return f"shard-{self.index:06d}.npz"

    @property
    def indices(self) -> NDArray[np.int64]:
        return np.arange(self.first, self.first + self.count, dtype=np.int64)

    def describe(self) -> str:
        return f"shard {self.index} (images {self.first}-{self.first + self.count - 1})"


def split(total: int, shard_size: int) -> list[Shard]:
    """Images ``0 .. total - 1`` in shards of ``shard_size`` (the last one the rest)."""
    if total < 1 or shard_size < 1:
        raise ValueError(f"total and shard_size must be >= 1, got {total} and {shard_size}")
    return [Shard(k, first, min(shard_size, total - first)) for k, first in enumerate(range(0, total, shard_size))]


@dataclass
class ShardData:
    """One shard's arrays, in index order."""

    samples: NDArray[np.float32]  # (n, C, H, W), model space
    images: NDArray[np.uint8]  # (n, H, W, C)


def shard_bytes(shard: Shard, seed: int, data: ShardData) -> bytes:
    """The ``.npz`` of a shard file (see the module docstring)."""
    buf = io.BytesIO()
    np.savez(buf, indices=shard.indices, seed=np.array(seed, np.int64), samples=np.asarray(data.samples, np.float32),
             images=np.asarray(data.images, np.uint8), schema=np.array(SCHEMA))
    return buf.getvalue()


def read_shard(raw: bytes, shard: Shard, seed: int, shape: tuple[int, int, int]) -> ShardData:
    """The arrays of a shard file's bytes; ShardError unless it is exactly ``shard`` of ``seed`` for images of
    ``shape`` (C, H, W)."""
    c, h, w = shape
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as f:
            indices, file_seed, samples, images = f["indices"], int(f["seed"]), f["samples"], f["images"]
    except Exception as exc:  # noqa: BLE001 (not an npz, a missing array, a truncated file: all "corrupt")
        raise ShardError(f"{shard.name} cannot be read ({type(exc).__name__})") from None
    if file_seed != seed or not np.array_equal(indices, shard.indices):
        raise ShardError(f"{shard.name} holds other images (seed {file_seed}, indices {indices[:1]}..)")
    if samples.shape != (shard.count, c, h, w) or samples.dtype != np.float32 \
            or images.shape != (shard.count, h, w, c) or images.dtype != np.uint8:
        raise ShardError(f"{shard.name} holds arrays of another shape or type")
    return ShardData(samples, images)


def shard_limit(shard: Shard, shape: tuple[int, int, int]) -> int:
    """The most bytes a shard file of ``shard`` may have (its arrays plus the npz's headers)."""
    return shard.count * (int(np.prod(shape)) * 5 + 8) + (64 << 10)


def differences(there: Any, here: Any, key: str = "") -> list[str]:
    """``KEY VALUE there, VALUE here`` for each leaf where two identities differ (long values shortened)."""
    if isinstance(there, dict) and isinstance(here, dict):
        return [d for k in sorted(set(there) | set(here), key=str)
                for d in differences(there.get(k), here.get(k), f"{key}.{k}" if key else str(k))]
    if there == here:
        return []
    short = lambda v: (v[:12] + "..." if isinstance(v, str) and len(v) > 16 else json.dumps(v))  # noqa: E731
    return [f"{key} {short(there)} there, {short(here)} here"]


class ShardStore(Protocol):
    """Where the shards of a run are kept: which are done, put one, read one back."""

    done: set[int]

    def put(self, shard: Shard, data: ShardData, worker: str) -> None: ...

    def get(self, shard: Shard) -> ShardData: ...


class MemoryShards:
    """The shards of a run without ``--out-dir``: held until the merge, nothing to resume."""

    def __init__(self) -> None:
        self.done: set[int] = set()
        self._data: dict[int, ShardData] = {}

    def put(self, shard: Shard, data: ShardData, worker: str) -> None:
        self._data[shard.index] = data
        self.done.add(shard.index)

    def get(self, shard: Shard) -> ShardData:
        return self._data[shard.index]


class ShardFolder:
    """``--out-dir``: the shard files and manifest of one run (see the module docstring); use as a context manager
    (it holds the folder's lock). After ``__enter__``, ``done`` are the shards verified there and ``redo`` says why
    each other recorded shard is done again."""

    def __init__(self, folder: Path, identity: dict[str, Any], shards: list[Shard], flag: str = "--out-dir",
                 model: str = "") -> None:
        self.folder, self.identity, self.flag = folder, identity, flag
        self.shards = {s.index: s for s in shards}
        self.shape: tuple[int, int, int] = tuple(identity["image_shape"])  # type: ignore[assignment]
        self.seed = int(identity["seed"])
        self.done: set[int] = set()
        self.redo: list[str] = []
        self._records: dict[str, dict[str, Any]] = {}
        self._model = model
        self._lock = PathLock(folder, f"{flag} folder")
        self._unwritten = False  # shards recorded since the manifest was last written
        self._written_at = 0.0

    def __enter__(self) -> "ShardFolder":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock.__enter__()
        try:
            self._open()
        except BaseException:
            self._lock.__exit__()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            if self._unwritten:  # an error or Ctrl-C too: what is done stays done
                self._write_manifest()
        finally:
            self._lock.__exit__()

    def _open(self) -> None:
        path = self.folder / MANIFEST
        if not path.exists():
            self._write_manifest()
            return
        manifest = self._read_manifest(path)
        diff = differences(manifest["identity"], self.identity)
        if diff:
            raise ShardError(f"{self.flag} {self.folder} holds shards of another run ({'; '.join(diff)}): images of "
                             f"two runs are never mixed; give another {self.flag}, or the same model and settings "
                             "to resume")
        for key, record in manifest["shards"].items():
            shard = self.shards.get(int(key)) if str(key).isdigit() else None
            if shard is None or not isinstance(record, dict):
                continue
            try:
                self._verified(shard, record.get("sha256"))
            except (ShardError, OSError) as exc:
                self.redo.append(f"{shard.describe()}: {exc}")
                continue
            self._records[str(shard.index)] = record
            self.done.add(shard.index)
        self._write_manifest()  # drops what failed verification: done only once redone

    def _read_manifest(self, path: Path) -> dict[str, Any]:
        try:
            manifest = json.loads(read_capped(path, MAX_MANIFEST_BYTES, "manifest"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ShardError(f"{self.flag} {self.folder}: {MANIFEST} is not a ddim-run shard manifest ({exc}); "
                             f"remove it or give another {self.flag}") from None
        if not isinstance(manifest, dict) or manifest.get("kind") != KIND \
                or not isinstance(manifest.get("identity"), dict) or not isinstance(manifest.get("shards"), dict):
            raise ShardError(f"{self.flag} {self.folder}: {MANIFEST} is not a ddim-run shard manifest; remove it or "
                             f"give another {self.flag}")
        if manifest.get("schema") != SCHEMA:
            raise ShardError(f"{self.flag} {self.folder}: {MANIFEST} has schema {manifest.get('schema')!r}, this "
                             f"ddim-run reads {SCHEMA}; give another {self.flag}")
        return manifest

    def _verified(self, shard: Shard, sha256: Any) -> ShardData:
        """The shard's arrays, read once: its file must have ``sha256`` and hold exactly that shard."""
        path = self.folder / shard.name
        if not path.exists():
            raise ShardError("its file is missing")
        raw = read_capped(path, shard_limit(shard, self.shape), "shard file")
        if hashlib.sha256(raw).hexdigest() != sha256:
            raise ShardError("its file's sha256 differs from the manifest's (corrupt or changed)")
        return read_shard(raw, shard, self.seed, self.shape)

    def _write_manifest(self) -> None:
        manifest = {"kind": KIND, "schema": SCHEMA, "model": self._model, "identity": self.identity,
                    "shards": dict(sorted(self._records.items(), key=lambda kv: int(kv[0])))}
        atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=1) + "\n")
        self._unwritten, self._written_at = False, time.monotonic()

    def put(self, shard: Shard, data: ShardData, worker: str) -> None:
        """Write the shard's file (atomically), then record it; the manifest follows (atomically) within
        :data:`MANIFEST_EVERY_S` seconds, or when the run ends."""
        raw = shard_bytes(shard, self.seed, data)
        atomic_write_bytes(self.folder / shard.name, raw)
        self._records[str(shard.index)] = {"file": shard.name, "first": shard.first, "count": shard.count,
                                           "sha256": hashlib.sha256(raw).hexdigest(), "worker": worker}
        self._unwritten = True
        if time.monotonic() - self._written_at >= MANIFEST_EVERY_S:
            self._write_manifest()
        self.done.add(shard.index)

    def get(self, shard: Shard) -> ShardData:
        """The shard's arrays, verified again against the manifest's sha256 (nothing unverified is merged)."""
        try:
            return self._verified(shard, self._records[str(shard.index)]["sha256"])
        except ShardError as exc:
            raise ShardError(f"{self.flag} {self.folder}: {shard.describe()} changed during the run ({exc}); run "
                             "the same command again to redo it") from None


def merge(store: ShardStore, shards: list[Shard]) -> ShardData:
    """Every shard's arrays, concatenated in index order (each index exactly once: the shards tile the range)."""
    ordered = sorted(shards, key=lambda s: s.first)
    ends = [0] + [s.first + s.count for s in ordered[:-1]]
    if [s.first for s in ordered] != ends:
        raise ValueError(f"the shards do not tile 0..{ordered[-1].first + ordered[-1].count - 1}")
    parts = [store.get(s) for s in ordered]
    return ShardData(np.concatenate([p.samples for p in parts]), np.concatenate([p.images for p in parts]))
