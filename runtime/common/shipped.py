"""Where the models shipped in the repository lie (``models/`` beside the packages, in a checkout or
an editable install): the trained Fashion-MNIST denoiser every command falls back to (``pick``), and the
Fashion-MNIST classifier whose features give the FD-classifier score."""

from __future__ import annotations

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
        return given, ""
    found = latest()
    if found is not None:
        return found, f" (the latest {kind} under {folder}/)"
    if (SHIPPED_MODEL / needs).is_file():
        return SHIPPED_MODEL, f" (the shipped model: no {kind} under {folder}/)"
    raise ValueError(f"no {arg} given, no {kind} under {folder}/ and no shipped model; {hint}")
