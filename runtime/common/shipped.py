"""Where the models shipped in the repository lie (``models/`` beside the packages, in a checkout or
an editable install): the trained Fashion-MNIST denoiser every command falls back to (``pick``), and the
Fashion-MNIST classifier whose features give the FD-classifier score."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

MODELS = Path(__file__).resolve().parents[2] / "models"
SHIPPED_MODEL = MODELS / "fashion-mnist"
SHIPPED_CLASSIFIER = MODELS / "fashion-mnist-classifier"


def pick(given: Path | None, arg: str, kind: str, folder: str, latest: Callable[[], Path | None], needs: str,
         hint: str) -> tuple[Path, str]:
    """What a command works on when ``arg`` is left out, and why: the latest ``kind`` under ``folder``,
    else the shipped model (when it holds ``needs``); ValueError with ``hint`` when neither exists."""
    if given is not None:
        _check_not_moved_aside(given, arg)
        return given, ""
    found = latest()
    if found is not None:
        return found, f" (the latest {kind} under {folder}/)"
    if (SHIPPED_MODEL / needs).is_file():
        return SHIPPED_MODEL, f" (the shipped model: no {kind} under {folder}/)"
    raise ValueError(f"no {arg} given, no {kind} under {folder}/ and no shipped model; {hint}")


def _check_not_moved_aside(given: Path, arg: str) -> None:
    """A missing ``given`` that a killed ``ddim-export`` moved aside (``.NAME.old-PID``, its commit cut between the
    two renames): ValueError naming that folder and how to get it back, instead of a bare "does not exist"."""
    from runtime.exportdir import moved_aside

    if os.path.lexists(given):
        return
    found = moved_aside(given)
    if found:
        old = found[0]
        missing = old.parent / old.name[1:old.name.rindex(".old-")]
        raise ValueError(f"{arg} {given} does not exist, but {old} holds the export a killed ddim-export was "
                         f"replacing there: rename it back (mv {old} {missing}), or run ddim-export into {missing} "
                         "again, which restores it first")
