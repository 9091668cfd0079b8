"""Command outputs written all-or-nothing, and checked before the work that makes them.

A command that writes several files (a grid, one PNG per image, an npz) first checks every target
can be written (:func:`check_file`, :func:`check_folder`: a real file is created and removed, since
root passes any permission check and a read-only mount only shows when written to). After the work,
:class:`StagedOutputs` writes each file into a staging folder ``.ddim-run-staging-PID-XXXXXXXX/`` beside
its final name (one per output folder, :class:`runtime.common.files.StagingFolder`) and renames them into
place only once all are written; on any failure the staged files go and whatever the user had under those
names stays as it was. A kill -9 cannot clean up: the next command staging into the same folder removes the
staging folders whose writer is dead (their OS lock is free), and nothing else.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Callable

from runtime.common.files import DEFAULT_FILE_MODE, StagingFolder, fsync_dir, remove_stale_staging

Writer = Callable[[BinaryIO], None]
log = logging.getLogger(__name__)


class OutputError(OSError):
    """An output cannot be written; the message names the flag and the path."""


def check_file(path: Path, flag: str, suffixes: str | tuple[str, ...]) -> None:
    """Refuse a file output ``flag`` that cannot be written, or whose suffix is not one of ``suffixes`` (the
    type it is written as); its folder may not exist yet."""
    suffixes = (suffixes,) if isinstance(suffixes, str) else suffixes
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file name, e.g. {path / ('samples' + suffixes[0])}")
    if path.suffix.lower() not in suffixes:
        kinds = suffixes[0] if len(suffixes) == 1 else f"{', '.join(suffixes[:-1])} or {suffixes[-1]}"
        raise OutputError(f"{flag} {path} must end in {kinds}: the suffix says which file type is written")
    _probe(path.parent, flag, path)


def check_folder(path: Path, flag: str) -> None:
    """Refuse a folder output ``flag`` that is a file or cannot be written; it may not exist yet."""
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path} is a file, not a folder")
    _probe(path, flag, path)


def _probe(folder: Path, flag: str, target: Path) -> None:
    """Create and remove a file in ``folder``, or in its nearest existing ancestor (``folder`` will be made)."""
    ancestor = next((p for p in [folder, *folder.parents, *folder.absolute().parents] if p.exists()), None)
    if ancestor is None or not ancestor.is_dir():
        raise OutputError(f"cannot write {flag} {target}: {ancestor} is not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=".write-check.", suffix=".tmp", dir=ancestor)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise OutputError(f"cannot write {flag} {target}: {ancestor} is not writable ({exc.strerror})") from exc


class StagedOutputs:
    """Files written together: ``stage`` each, then ``commit`` renames them all into place.

    Leaving the ``with`` block without ``commit`` (an error, Ctrl-C) removes the staged files, their
    staging folders and any folder made for them, so the previous files under the final names stay untouched.
    """

    def __init__(self) -> None:
        self._staged: dict[Path, Path] = {}  # final path -> its staged file
        self._folders: dict[Path, StagingFolder] = {}  # output folder -> its staging folder
        self._made: list[Path] = []  # folders created for outputs, outermost first

    def __enter__(self) -> "StagedOutputs":
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.discard()

    def stage(self, final: Path, data: bytes | Writer, flag: str) -> None:
        """Write ``data`` (bytes, or a function writing to a binary file) into the staging folder beside ``final``."""
        if final in self._staged:
            raise OutputError(f"{flag} {final} is also another output of this command")
        try:
            self._make_folder(final.parent)
            tmp = self._staging(final.parent).file(final.name)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            self._staged[final] = tmp
            with os.fdopen(fd, "wb") as fh:
                if isinstance(data, bytes):
                    fh.write(data)
                else:
                    data(fh)
                fh.flush()
                os.fsync(fh.fileno())  # on disk before the rename makes it visible
            os.chmod(tmp, DEFAULT_FILE_MODE)  # as a plain open() would give it
        except OSError as exc:
            raise OutputError(f"cannot write {flag} {final}: {exc.strerror or exc}; "
                              "nothing was written, previous files are kept") from exc

    def commit(self) -> None:
        """Rename every staged file over its final name, make the renames durable, remove the staging folders."""
        folders = {final.parent for final in self._staged} | {made.parent for made in self._made}
        # Every byte is already written: a rename within a folder allocates no data, so once the
        # writes succeeded the renames do not fail for want of space.
        for final, tmp in list(self._staged.items()):
            try:
                os.replace(tmp, final)
            except OSError as exc:  # a broken filesystem; the files renamed so far stay
                raise OutputError(f"cannot put {final} in place: {exc.strerror or exc}") from exc
            del self._staged[final]
        for folder in folders:
            fsync_dir(folder)
        self._close_staging()
        self._made.clear()

    def discard(self) -> None:
        """Remove staged files, their staging folders and the folders made for them (when still empty)."""
        self._staged.clear()
        self._close_staging()
        for folder in reversed(self._made):
            try:
                folder.rmdir()
            except OSError:
                pass  # not empty: something else is in it now
        self._made.clear()

    def _staging(self, folder: Path) -> StagingFolder:
        """``folder``'s staging folder, made on first use after removing those that killed writers left there."""
        if folder not in self._folders:
            for name in remove_stale_staging(folder):
                log.info("removed %s (staged outputs of a killed ddim-run)", folder / name)
            self._folders[folder] = StagingFolder(folder)
        return self._folders[folder]

    def _close_staging(self) -> None:
        for staging in self._folders.values():
            staging.close()  # removes whatever is still staged in it
        self._folders.clear()

    def _make_folder(self, folder: Path) -> None:
        missing = [p for p in [folder, *folder.parents] if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        self._made.extend(p for p in reversed(missing) if p not in self._made)
