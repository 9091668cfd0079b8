"""Oxford Flowers 102: the official tgz of jpgs, downloaded and extracted into the cache folder.

Like the Keras DDIM example, the toolkit ignores the official (imbalanced) splits and uses a
seeded random 80/20 split of all 8,189 images (see ``trainer.data.folder.split_files``).
"""

from __future__ import annotations

import logging
import shutil
import tarfile
from pathlib import Path

from runtime.common.files import cache_dir
from trainer.data.download import RemoteFile, fetch
from trainer.errors import DatasetError

log = logging.getLogger(__name__)

ARCHIVE = RemoteFile(
    "102flowers.tgz", ("https://www.robots.ox.ac.uk/~vgg/data/flowers/102/102flowers.tgz",),
    "52808999861908f626f3c1f4e79d11fa",
)


def flowers_folder() -> Path:
    """Where the extracted jpgs live: ``<cache>/oxford-flowers-102/jpg``."""
    return cache_dir() / "oxford-flowers-102" / "jpg"


def ensure_flowers(root: Path | None = None) -> Path:
    """The folder of jpgs, downloading and extracting the official archive when it is missing."""
    target = root or flowers_folder()
    if target.is_dir() and any(target.iterdir()):
        return target
    archive = fetch(ARCHIVE, target.parent)
    extract_jpgs(archive, target)
    return target


def extract_jpgs(archive: Path, target: Path) -> None:
    """Extract the archive's ``jpg/*.jpg`` into ``target`` atomically (a temporary folder, then rename).

    Only regular files directly under ``jpg/`` are taken: no links, no paths leaving the folder.
    """
    tmp = target.parent / f".{target.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    count = 0
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                parts = Path(member.name).parts
                if not (member.isfile() and len(parts) == 2 and parts[0] == "jpg" and parts[1].endswith(".jpg")):
                    continue
                src = tar.extractfile(member)
                if src is not None:
                    (tmp / parts[1]).write_bytes(src.read())
                    count += 1
    except (tarfile.TarError, OSError, EOFError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"cannot extract {archive}: {exc}") from None
    if count == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise DatasetError(f"{archive} holds no jpg/*.jpg images: not the Oxford Flowers 102 archive")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.info("extracted %d images into %s", count, target)
