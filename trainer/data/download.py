"""Checksum-verified, atomic downloads into a cache folder, with a progress bar."""

from __future__ import annotations

import hashlib
import logging
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path


from runtime.common.progress import progress_bar
from runtime.common.files import atomic_path
from trainer.errors import DownloadError

log = logging.getLogger(__name__)
CHUNK = 1 << 20


@dataclass(frozen=True)
class RemoteFile:
    """A file published at one or more URLs, identified by its checksum."""

    filename: str
    urls: tuple[str, ...]
    md5: str | None  # the checksum the publisher gives
    sha256_prefix: str | None = None  # or the SHA-256 prefix it names the file by (torch hub style)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(remote: RemoteFile, dest_dir: Path, progress: bool = True) -> Path:
    """Return ``dest_dir/filename``, downloading and verifying it first if it is not there yet."""
    dest = dest_dir / remote.filename
    if dest.is_file():
        return dest
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(f"cannot create download folder {dest_dir}: {exc.strerror or exc}") from None
    reasons = []
    for url in remote.urls:
        try:
            _download(url, dest, remote, progress)
            return dest
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", None) or exc
            log.warning("download of %s failed: %s", url, reason)
            reasons.append(f"{url} ({reason})")
    raise DownloadError(
        f"could not download {remote.filename} from {'; '.join(reasons)}; "
        f"download it by hand and save it as {dest}"
    )


def _download(url: str, dest: Path, remote: RemoteFile, progress: bool) -> None:
    digest, sha = hashlib.md5(usedforsecurity=False), hashlib.sha256()
    with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
        total = int(response.headers.get("Content-Length") or 0) or None
        with open(tmp, "wb") as out, progress_bar(
            total=total, unit="B", unit_scale=True, desc=dest.name, disable=not progress, leave=False
        ) as bar:
            while chunk := response.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                sha.update(chunk)
                bar.update(len(chunk))
        # Raising inside atomic_path discards the temporary file; nothing lands under dest.
        if remote.md5 is not None and digest.hexdigest() != remote.md5:
            raise ValueError(f"checksum mismatch: expected md5 {remote.md5}, got {digest.hexdigest()}")
        if remote.sha256_prefix is not None and not sha.hexdigest().startswith(remote.sha256_prefix):
            raise ValueError(f"checksum mismatch: expected SHA-256 {remote.sha256_prefix}..., got {sha.hexdigest()}")
    log.info("downloaded %s", dest)
