"""Atomic file writes: a temporary file in the same folder, fsync, then rename.

A reader never sees a half-written file under the final name, and an interrupted write leaves
whatever was there before intact.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterator


def _default_mode() -> int:
    """Mode a plain ``open()`` would give a new file (mkstemp alone gives 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


DEFAULT_FILE_MODE = _default_mode()  # what atomic writes give their files, as open() would

@contextlib.contextmanager
def atomic_path(target: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it over ``target``."""
    target = Path(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, DEFAULT_FILE_MODE)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: str | Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(target: str | Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``target`` atomically."""
    atomic_write_bytes(target, text.encode("utf-8"))


def replace_dir(staging: Path, out: Path) -> None:
    """Put the staged folder ``staging`` (a sibling of ``out``) in place of ``out``: its files (in
    subfolders too) are fsynced, ``out`` moves aside to ``.NAME.old-PID``, the staged folder is renamed in,
    and only then is the old one removed. A crash in between leaves ``.NAME.old-PID`` for the next writer
    to restore."""
    for path in sorted(staging.rglob("*")):
        if path.is_file() and not path.is_symlink():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        elif path.is_dir():
            fsync_dir(path)
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        os.replace(out, old)
    os.replace(staging, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def fsync_dir(path: str | Path) -> None:
    """Make a rename in ``path`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def cache_dir() -> Path:
    """``$DDIM_DEPLOY_CACHE``, else ``$XDG_CACHE_HOME/ddim-deploy``, else ``~/.cache/ddim-deploy``."""
    if env := os.environ.get("DDIM_DEPLOY_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddim-deploy"


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


MAX_JSON_BYTES = 1 << 20  # configs and metadata are a few KB: 1 MiB bounds what a hostile file can cost


def read_regular(path: str | Path, limit: int) -> bytes:
    """At most ``limit + 1`` bytes of a regular file (the caller tells "more than ``limit``" by the
    length). Refuses devices, FIFOs and sockets with ValueError (a symlink to /dev/zero never ends)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))  # a FIFO must not block the open
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path} is not a regular file")
        with os.fdopen(os.dup(fd), "rb") as fh:
            return fh.read(limit + 1)
    finally:
        os.close(fd)


def read_capped(path: str | Path, limit: int = MAX_JSON_BYTES, what: str = "file") -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (see :func:`read_regular`); ValueError
    for anything else, naming it as ``what``; OSError when it cannot be read."""
    try:
        data = read_regular(path, limit)
    except ValueError:
        raise ValueError(f"{what} {path} is not a regular file") from None
    if len(data) > limit:
        raise ValueError(f"{what} {path} is larger than {limit // 1024} KiB: not one of ours")
    return data


STAGING_PREFIX = ".ddim-run-staging-"
STAGING_LOCK = ".lock"  # inside the staging folder; held (flock) by its writer as long as it lives
_STAGING_NAME = re.compile(r"^\.ddim-run-staging-\d+-[a-z0-9_]{8}$")  # tempfile.mkdtemp's 8 characters
_LIVE_STAGING: set[Path] = set()  # this process's own staging folders: never stale, whatever the lock says


class StagingFolder:
    """A hidden folder ``.ddim-run-staging-PID-XXXXXXXX`` in ``parent`` holding files on their way into
    ``parent`` (a rename within one folder tree of one file system). Its writer holds an OS lock (``flock``)
    on the ``.lock`` file inside for as long as it lives; the kernel drops it when the writer dies, however
    it dies (kill -9 too). :func:`remove_stale_staging` removes only folders of this exact name whose lock
    it can take: their writer is gone. PIDs are reused and never trusted; the PID in the name is for people.
    """

    def __init__(self, parent: Path) -> None:
        import fcntl

        while True:
            path = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-", dir=parent))
            try:
                fd = os.open(path / STAGING_LOCK, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            except FileNotFoundError:  # another writer's cleanup took the still empty folder for a dead one's
                continue
            fcntl.flock(fd, fcntl.LOCK_EX)  # waits only while a cleanup that took it first removes the folder
            try:
                ours = os.path.samestat(os.fstat(fd), os.lstat(path / STAGING_LOCK))
            except FileNotFoundError:
                ours = False
            if ours:
                break
            os.close(fd)
        self.path, self._fd = path, fd
        _LIVE_STAGING.add(path.absolute())

    def file(self, name: str) -> Path:
        """Where the file that will be ``parent/name`` is written."""
        if name == STAGING_LOCK:
            raise ValueError(f"{name} cannot be staged: the staging folder's lock has that name")
        return self.path / name

    def close(self) -> None:
        """Remove what is left in the folder (files not renamed out), the folder and the lock."""
        if self._fd is None:
            return
        try:
            _empty_staging(self.path)
        finally:
            _LIVE_STAGING.discard(self.path.absolute())
            os.close(self._fd)
            self._fd = None


def _empty_staging(path: Path) -> bool:
    """Remove the staged files of a staging folder, then its lock, then the folder (only when then empty);
    a folder or anything else that is not a plain file or link is left. True when the folder is gone."""
    with os.scandir(path) as entries:
        names = [e.name for e in entries if e.name != STAGING_LOCK and (e.is_symlink() or e.is_file())]
    for name in names:
        (path / name).unlink(missing_ok=True)
    try:
        (path / STAGING_LOCK).unlink(missing_ok=True)  # last: a kill before this leaves it for the next writer
        path.rmdir()
    except OSError:
        return False
    return True


def remove_stale_staging(parent: Path) -> list[str]:
    """Remove the :class:`StagingFolder` s in ``parent`` whose writer is dead (a kill -9 while it wrote): a folder
    named ``.ddim-run-staging-PID-XXXXXXXX`` (not a link) whose ``.lock`` this process can lock, or that has no
    ``.lock`` and is empty (its writer died between making it and locking it). Nothing else is ever touched.
    Returns the names removed."""
    import fcntl

    removed: list[str] = []
    try:
        entries = sorted(parent.iterdir())
    except OSError:
        return removed
    for path in entries:
        if not _STAGING_NAME.match(path.name) or path.absolute() in _LIVE_STAGING:
            continue
        if path.is_symlink() or not path.is_dir():
            continue
        try:
            fd = os.open(path / STAGING_LOCK, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        except FileNotFoundError:
            with contextlib.suppress(OSError):
                path.rmdir()  # only when empty; a live writer about to lock it makes another
                removed.append(path.name)
            continue
        except OSError:  # another user's, or not a file: not ours to judge
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # its writer is alive
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(path / STAGING_LOCK))
            except FileNotFoundError:
                same = False
            if same and _empty_staging(path):  # else another cleanup got there first
                removed.append(path.name)
        finally:
            os.close(fd)
    return removed


class LockHeld(RuntimeError):
    """Another process is writing to the same place."""


class PathLock:
    """An exclusive OS lock (``flock``) on ``.NAME.lock`` beside ``target``; the kernel drops it when
    the holder dies, so a crash never leaves a stale lock. The file holds the holder's PID.

    A second writer fails at once with :class:`LockHeld` naming that PID; ``what`` names the place
    in that message ("run directory", "export folder").
    """

    def __init__(self, target: str | Path, what: str) -> None:
        self.target = Path(target)
        self.what = what
        where = self.target.resolve()  # one lock per folder, however it is named ("." , "..", symlinks)
        self.path = where.parent / f".{where.name}.lock"
        self._fd: int | None = None

    def __enter__(self) -> "PathLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise LockHeld(f"{self.what} {self.target} is in use by another process (PID {holder}); "
                               "wait for it to finish or stop it") from None
            # The file may have been unlinked by a holder that just finished: lock the one on disk.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # still holding it: nobody can have taken it meanwhile
        finally:
            os.close(self._fd)
            self._fd = None
