"""ONNX Runtime's optimised graphs, cached on disk so that a session starts without optimising again.

Layout, in ``cache_dir()/onnxruntime`` (``$DDIM_DEPLOY_CACHE/onnxruntime`` when that is set):

- ``KEY.onnx``: the optimised graph ONNX Runtime saved; KEY is the source model's sha256 (16 hex
  digits), the ONNX Runtime version, :func:`runtime.hostinfo.cpu_fingerprint` and the provider;
- ``KEY.json``: its record, written after it: the entry's size and sha256 and the source model's full
  sha256. An entry is given to ONNX Runtime only when it matches its record, so a truncated, changed
  or foreign file is dropped (with one warning) and rebuilt from the source model;
- ``.KEY.onnx.XXXX.tmp`` / ``.KEY.json.XXXX.tmp``: writes in progress, renamed into place when complete.
  Left-overs of killed processes are deleted after an hour;
- ``.ddim-deploy-cache.lock``: held while an entry and its record are replaced, read or trimmed, so
  two processes building the same entry at once both succeed and leave a matching pair.

Environment:

- ``DDIM_DEPLOY_ORT_CACHE=0`` turns the cache off (``off``, ``false`` and ``no`` work too): every
  session optimises its graph in memory.
- ``DDIM_DEPLOY_CACHE_MAX_MB`` bounds the folder (default 1024 MB): after each write the least
  recently used entries (by mtime, refreshed on every hit) are deleted; the newest always stays.

A cache that cannot be written (read-only, not ours, full) costs start-up time only: caching is
switched off for the rest of the process with one warning saying why, and sessions are built from
the source model. Errors of the model itself are never hidden: they come from the uncached build.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import onnxruntime as ort

from runtime.files import DEFAULT_FILE_MODE, cache_dir, read_regular
from runtime.hostinfo import cpu_fingerprint

log = logging.getLogger(__name__)

Options = Callable[[Path | None], ort.SessionOptions]  # session options saving the optimised graph there, or not

RECORD_SCHEMA = 1
DEFAULT_MAX_MB = 1024.0
STALE_TMP_SECONDS = 3600.0  # no session takes an hour to optimise: older temp files are orphans
FREE_MARGIN = 1 << 20  # the optimised graph is about the source's size; a little more for the record
MAX_RECORD_BYTES = 64 * 1024
LOCK_NAME = ".ddim-deploy-cache.lock"
OFF_VALUES = ("0", "off", "false", "no")
HOW = ("sessions start uncached (slower start-up, same results); point DDIM_DEPLOY_CACHE at a writable "
       "folder with space, or set DDIM_DEPLOY_ORT_CACHE=0 to turn this cache off")

# What this module writes; trimming never touches anything else in the folder.
_KEY = r"[0-9a-f]{16}-[\w.+]+-[0-9a-f]{12}-\w+"
ENTRY_RE = re.compile(rf"^(?P<key>{_KEY})\.(?P<kind>onnx|json)$")
TMP_RE = re.compile(rf"^\.{_KEY}\.(?:onnx|json)\.\w+\.tmp$")


_disabled: dict[str, str] = {}  # cache folder -> why caching is off for this process
_warned: set[tuple[str, str]] = set()  # (reason, folder): one warning each per process


def enabled() -> bool:
    """False when ``DDIM_DEPLOY_ORT_CACHE`` turns the cache off."""
    return os.environ.get("DDIM_DEPLOY_ORT_CACHE", "1").strip().lower() not in OFF_VALUES


def is_off() -> bool:
    """True when nothing is to be written to the cache in this process: ``DDIM_DEPLOY_ORT_CACHE`` turns
    it off, or its folder could not be written."""
    return not enabled() or str(cache_folder()) in _disabled


def turn_off(reason: str) -> None:
    """Caching off for the rest of this process, with one warning saying ``reason`` (other writers of
    this folder, such as :mod:`runtime.backends.precision`'s verdicts, share the switch)."""
    _disable(cache_folder(), reason)


def cache_folder() -> Path:
    """Where the optimised graphs live."""
    return cache_dir() / "onnxruntime"


def entry_key(source_sha256: str, providers: list[Any]) -> str:
    """The entry's name without suffix: source model, ONNX Runtime version, CPU features, provider."""
    first = providers[0] if isinstance(providers[0], str) else providers[0][0]
    return "-".join([source_sha256[:16], ort.__version__, cpu_fingerprint(), first])


def max_bytes() -> int:
    """The folder's size bound from ``DDIM_DEPLOY_CACHE_MAX_MB``."""
    raw = os.environ.get("DDIM_DEPLOY_CACHE_MAX_MB", "")
    if not raw.strip():
        return int(DEFAULT_MAX_MB * (1 << 20))
    try:
        mb = float(raw)
        if not mb >= 0 or mb == float("inf"):
            raise ValueError
    except ValueError:
        _warn_once("max-mb", "", f"DDIM_DEPLOY_CACHE_MAX_MB={raw!r} is not a size in MB (a number >= 0); "
                                 f"using {DEFAULT_MAX_MB:.0f}")
        mb = DEFAULT_MAX_MB
    return int(mb * (1 << 20))


def cached_session(model_path: Path, providers: list[Any], options: Options) -> ort.InferenceSession:
    """A session on ``model_path``'s graph, optimised once and cached (see the module docstring)."""
    data = model_path.read_bytes()
    folder = cache_folder()
    if not enabled() or str(folder) in _disabled:
        return _plain(data, providers, options)
    source_sha = hashlib.sha256(data).hexdigest()
    key = entry_key(source_sha, providers)
    try:
        session = _from_cache(folder, key, source_sha, providers, options, model_path, len(data))
    except OSError as exc:  # an unreadable folder: the same as one we cannot write
        return _uncached(data, providers, options, folder, _os_reason(folder, exc, len(data)))
    if session is not None:
        return session
    return _build_and_store(data, folder, key, source_sha, providers, options)


def _plain(data: bytes, providers: list[Any], options: Options) -> ort.InferenceSession:
    return ort.InferenceSession(data, options(None), providers=providers)


def _uncached(data: bytes, providers: list[Any], options: Options, folder: Path, reason: str) -> ort.InferenceSession:
    """A session without the cache, which is then off for ``folder``; a broken model raises first, unwarned."""
    session = _plain(data, providers, options)
    _disable(folder, reason)
    return session


# ---- hits ----------------------------------------------------------------------------------------------------
def _from_cache(folder: Path, key: str, source_sha: str, providers: list[Any], options: Options,
                model_path: Path, source_size: int) -> ort.InferenceSession | None:
    """The session on a verified entry; None on a miss, or after dropping an entry that failed."""
    entry, record = folder / f"{key}.onnx", folder / f"{key}.json"
    if not os.path.lexists(entry):
        return None
    with _lock(folder, shared=True):  # publishers hold it exclusively: entry and record read as a pair
        got, seen = _read_verified(entry, record, source_sha, 4 * source_size + (64 << 20))
    if seen is None:  # trimmed by another process since we looked: a plain miss
        return None
    if isinstance(got, bytes):
        so = options(None)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimised already
        try:
            session = ort.InferenceSession(got, so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime's own types; the source model decides below
            reason = f"ONNX Runtime cannot load it ({_first_line(exc)})"
        else:
            with contextlib.suppress(OSError):  # a read-only cache still serves hits
                os.utime(entry)  # least recently used goes first when trimming
            return session
    else:
        reason = got
    with _lock(folder):
        if _identity(entry) == seen:  # not republished by another process meanwhile
            _remove(entry, record)
    _warn_once(f"dropped: {reason.split(' (')[0]}", str(folder),
               f"dropped ONNX Runtime cache entry {entry}: {reason}; rebuilding it from {model_path}")
    return None


def _read_verified(entry: Path, record: Path, source_sha: str,
                   max_size: int) -> tuple[bytes | str, tuple[int, int] | None]:
    """(the entry's bytes, or why they cannot be trusted; the entry's (inode, size) as read).

    ``max_size`` bounds what a record may make us read (an optimised graph is about its source's size).
    """
    try:
        meta = json.loads(read_regular(record, MAX_RECORD_BYTES))
        size, digest, source = int(meta["size"]), str(meta["sha256"]), str(meta["source_sha256"])
        if not 0 < size <= max_size:
            raise ValueError(f"size {size}")
    except FileNotFoundError:
        return "it has no record (an interrupted write, or an older ddim-deploy)", _identity(entry)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return f"its record is unreadable ({type(exc).__name__})", _identity(entry)
    if source != source_sha:
        return "its record names another source model", _identity(entry)
    try:
        blob = read_regular(entry, size)
    except (OSError, ValueError) as exc:
        return f"it cannot be read ({exc})", _identity(entry)
    seen = _identity(entry)
    if len(blob) != size:
        return f"it is truncated or changed ({len(blob)} bytes, the record says {size})", seen
    if hashlib.sha256(blob).hexdigest() != digest:
        return "it does not match its record (changed or replaced)", seen
    return blob, seen


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = os.lstat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size


# ---- misses --------------------------------------------------------------------------------------------------
def _build_and_store(data: bytes, folder: Path, key: str, source_sha: str, providers: list[Any],
                     options: Options) -> ort.InferenceSession:
    """Optimise from the source model, saving the graph as a new entry when the folder allows it."""
    entry = folder / f"{key}.onnx"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = _free_bytes(folder)
        if free is not None and free < len(data) + FREE_MARGIN:  # ONNX Runtime would write half a file
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        tmp = _new_tmp(entry)
    except OSError as exc:
        return _uncached(data, providers, options, folder, _os_reason(folder, exc, len(data)))
    try:
        try:
            session = ort.InferenceSession(data, options(tmp), providers=providers)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types, even for a full disk
            tmp.unlink(missing_ok=True)  # before anything else: ORT leaves what it wrote of a full disk
            full = (_free_bytes(folder) or 0) < len(data) + FREE_MARGIN
            reason = (_os_reason(folder, OSError(errno.ENOSPC, "full"), len(data)) if full else
                      f"saving the optimised model in {folder} failed ({_first_line(exc)})")
            return _uncached(data, providers, options, folder, reason)  # the model's own errors raise here
        try:
            _publish(tmp, entry, source_sha)
        except OSError as exc:
            _disable(folder, _os_reason(folder, exc, len(data)))
            return session
        try:
            _trim(folder, max_bytes(), keep=entry)
        except OSError as exc:  # the entry is in place; the next write trims again
            log.debug("trimming %s: %s", folder, exc)
        return session
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, entry: Path, source_sha: str) -> None:
    """Rename the finished graph into place, then write its record (a record never names a partial entry).

    No fsync: a file torn by a power cut fails verification against its record and is rebuilt.
    """
    blob = tmp.read_bytes()
    if not blob:  # ONNX Runtime saved nothing (some providers do not): nothing to cache
        return
    text = json.dumps({"schema_version": RECORD_SCHEMA, "size": len(blob), "sha256": hashlib.sha256(blob).hexdigest(),
                       "source_sha256": source_sha, "onnxruntime": ort.__version__}, sort_keys=True)
    record = entry.with_suffix(".json")
    rtmp = _new_tmp(record)
    try:
        rtmp.write_text(text + "\n")
        # Two processes may publish the same key at once (their graphs differ byte-wise): the lock
        # keeps each entry with its own record, last writer wins.
        with _lock(entry.parent):
            os.replace(tmp, entry)
            try:
                os.replace(rtmp, record)
            except OSError:
                _remove(entry, record)
                raise
    finally:
        rtmp.unlink(missing_ok=True)


def _new_tmp(target: Path) -> Path:
    """A new empty file beside ``target``, named ``.NAME.XXXX.tmp`` (unique per writer)."""
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        os.chmod(name, DEFAULT_FILE_MODE)  # mkstemp alone gives 0600; a team cache is shared
    except OSError:
        os.unlink(name)
        raise
    return Path(name)


# ---- trimming ------------------------------------------------------------------------------------------------
def _trim(folder: Path, limit: int, keep: Path, now: float | None = None) -> None:
    """Delete least recently used entries until the folder holds at most ``limit`` bytes of them,
    stale temp files and records without an entry; ``keep`` (the newest) stays whatever its size."""
    now = time.time() if now is None else now
    entries: dict[str, dict[str, os.stat_result]] = {}
    with _lock(folder):
        for path in folder.iterdir():
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if not stat.S_ISREG(st.st_mode):
                continue
            if TMP_RE.match(path.name):
                if now - st.st_mtime > STALE_TMP_SECONDS:
                    _remove(path)
                continue
            match = ENTRY_RE.match(path.name)
            if match:
                entries.setdefault(match["key"], {})[match["kind"]] = st
        for key, parts in list(entries.items()):
            if "onnx" not in parts:  # a record whose entry was dropped
                _remove(folder / f"{key}.json")
                del entries[key]
        total = sum(st.st_size for parts in entries.values() for st in parts.values())
        for key in sorted(entries, key=lambda k: entries[k]["onnx"].st_mtime):
            if total <= limit:
                break
            if folder / f"{key}.onnx" == keep:
                continue
            _remove(folder / f"{key}.onnx", folder / f"{key}.json")
            total -= sum(st.st_size for st in entries[key].values())
            log.debug("trimmed ONNX Runtime cache entry %s", key)


# ---- helpers -------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _lock(folder: Path, shared: bool = False) -> Iterator[None]:
    """An OS lock on the folder's lock file; none where it cannot be made (read-only: nobody publishes)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; a torn pair is caught by verification and rebuilt
        yield
        return
    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(OSError):
            path.unlink(missing_ok=True)


def _free_bytes(folder: Path) -> int | None:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def _os_reason(folder: Path, exc: OSError, needed: int) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(folder)
        have = f"{free / 2**20:.1f} MB free" if free is not None else "no space left"
        return f"{folder} is full ({have}, an optimised graph needs about {needed / 2**20:.1f} MB)"
    return f"cannot write to {folder} ({exc.strerror or exc})"


def _disable(folder: Path, reason: str) -> None:
    """Caching off for ``folder`` for the rest of this process, with one warning."""
    _disabled[str(folder)] = reason
    _warn_once("disabled", str(folder), f"ONNX Runtime cache off for this process: {reason}; {HOW}")


def _warn_once(reason: str, folder: str, message: str) -> None:
    if (reason, folder) not in _warned:
        _warned.add((reason, folder))
        log.warning("%s", message)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]
