"""The export folder: the contract between its writer (``export/``) and its readers (``runtime/``), written once.

    exports/NAME/
        model.onnx           float32 ONNX, the denoiser with its config in metadata_props (always)
        model.fp16.onnx      FP16 ONNX (ddim-export --fp16)
        model.int8.onnx      INT8 QDQ ONNX, passed its quality gate (--int8)
        model.plan           FP16 TensorRT engine (on a GPU with TensorRT) ...
        manifest.json        ... and what it was built from and for (TensorRT version, GPU, profile, config)
        export_report.json   written last, inside the staging folder: marks the folder complete and ours, and
                             lists under "files" every file the export wrote (itself too), by relative path

The writer and every reader take the names from here; "is this one of our exports?" is :func:`is_export`, and
"which export / run does a command take when given none?" is :func:`latest_export` / :func:`latest_run`.
A run directory (``trainer.rundir`` owns its layout; ``runtime`` may not import it) is recognised by the names
below, so that an export is never taken for a run or the other way round. What in an export folder is ours to
replace is :func:`foreign_files`' complement: the files its report lists.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from runtime.choices import Precision
from runtime.common.files import read_capped

ONNX_FILES: dict[Precision, str] = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}
FP32_ONNX, FP16_ONNX, INT8_ONNX = ONNX_FILES["fp32"], ONNX_FILES["fp16"], ONNX_FILES["int8"]
ENGINE = "model.plan"
MANIFEST = "manifest.json"
REPORT = "export_report.json"

# A trainer run directory's markers (trainer/rundir.py: CONFIG, WEIGHTS and the checkpoints folder).
RUN_CONFIG = "config.json"
RUN_WEIGHTS = "model.safetensors"
RUN_CHECKPOINTS = "checkpoints"

MAX_REPORT_BYTES = 1 << 20
REPORT_FILES = "files"  # the report's list of every file the export wrote: relative POSIX paths, sorted
# What an export folder held before reports listed their files: ddim-export's names above, and the diffusers
# folder's (export/to_diffusers.py: diffusers' save_pretrained with safetensors, plus our card). Only these count
# as ours in a folder whose report has no list.
DIFFUSERS_FILES = ("model_index.json", "README.md", "unet/config.json", "unet/diffusion_pytorch_model.safetensors",
                   "scheduler/scheduler_config.json")
KNOWN_FILES = (*ONNX_FILES.values(), ENGINE, MANIFEST, REPORT, *DIFFUSERS_FILES)
_OLD = re.compile(r"^\.(?P<name>.+)\.old-(?P<pid>\d+)$")  # an export moved aside by a commit (export/pipeline.py)


def is_run_dir(folder: Path) -> bool:
    """A trainer run directory (its config or checkpoints), which no export command may replace."""
    return (folder / RUN_CONFIG).is_file() or (folder / RUN_CHECKPOINTS).exists()


def is_export(folder: Path) -> bool:
    """A folder ``ddim-export`` finished: it holds our report (written last) and is not a run directory."""
    return folder.is_dir() and (folder / REPORT).is_file() and not is_run_dir(folder)


def latest_export(root: Path = Path("exports")) -> Path | None:
    """The most recently completed export under ``root`` (by its report's time), if any.

    Hidden names are skipped: a killed export leaves its ``.NAME.partial-PID`` staging folder (an ungated model)
    or ``.NAME.old-PID`` (the replaced one)."""
    found: list[tuple[float, Path]] = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if folder.name.startswith(".") or not (is_export(folder) and (folder / FP32_ONNX).is_file()):
            continue
        try:
            found.append(((folder / REPORT).stat().st_mtime, folder))
        except OSError:  # removed meanwhile
            continue
    return max(found)[1] if found else None


def latest_run(root: Path = Path("runs")) -> Path | None:
    """The most recently written run directory under ``root`` (by its config), if any; hidden names (staging and
    lock files) are never a run."""
    configs = [p for p in root.glob(f"*/{RUN_CONFIG}") if p.is_file() and not p.parent.name.startswith(".")] \
        if root.is_dir() else []
    return max(configs, key=lambda p: p.stat().st_mtime).parent if configs else None


def read_report(folder: Path) -> dict[str, Any]:
    """The export's report as a dict; OSError when it cannot be read, ValueError when it is not a JSON object."""
    data = json.loads(read_capped(folder / REPORT, MAX_REPORT_BYTES, what="export report"))
    if not isinstance(data, dict):
        raise ValueError(f"{folder / REPORT} is not a JSON object")
    return data


def written_files(folder: Path) -> list[str]:
    """Every file under ``folder`` (a staging folder about to be committed) as the report lists them, the report
    itself included: relative POSIX paths, sorted."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() or p.is_symlink()}
    return sorted(found | {REPORT})


def foreign_files(folder: Path) -> tuple[list[str], bool]:
    """What in the export ``folder`` its export did not write (a folder as ``NAME/``, not looked into), sorted; and
    whether the report listed its files (else only :data:`KNOWN_FILES` count as the export's: an older report)."""
    try:
        listed = read_report(folder).get(REPORT_FILES)
    except (OSError, ValueError):
        listed = None
    has_list = isinstance(listed, list) and all(isinstance(name, str) for name in listed)
    ours = set(listed) if has_list else set(KNOWN_FILES)
    folders = {name.rsplit("/", i)[0] for name in ours for i in range(1, name.count("/") + 1)}
    foreign: list[str] = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for name in sorted(dirs):  # os.walk lists links to folders here and does not follow them
            if os.path.islink(os.path.join(root, name)):
                foreign += [prefix + name] if prefix + name not in ours else []
                dirs.remove(name)
            elif prefix + name not in folders:
                foreign.append(prefix + name + "/")
                dirs.remove(name)
        foreign += [prefix + name for name in files if prefix + name not in ours]
    return sorted(foreign), has_list


def moved_aside(path: Path) -> list[Path]:
    """The exports a killed ``ddim-export`` moved aside from the missing ``path`` (or its missing folder): the
    ``.NAME.old-PID`` beside the first missing part of ``path`` that are complete exports, newest first."""
    missing = None
    for part in [path, *path.parents]:
        if os.path.lexists(part):
            break
        missing = part
    if missing is None or missing.name in ("", ".", "..") or not missing.parent.is_dir():
        return []
    found = [p for p in missing.parent.iterdir() if (m := _OLD.match(p.name)) and m["name"] == missing.name
             and not p.is_symlink() and is_export(p)]
    return sorted(found, key=lambda p: (p / REPORT).stat().st_mtime, reverse=True)
