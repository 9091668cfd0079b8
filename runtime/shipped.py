"""Where the models shipped in the repository lie (``models/`` beside the packages, in a checkout or
an editable install): the trained Fashion-MNIST denoiser every command falls back to, and the
Fashion-MNIST classifier whose features give the FD-classifier score."""

from __future__ import annotations

from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "models"
SHIPPED_MODEL = MODELS / "fashion-mnist"
SHIPPED_CLASSIFIER = MODELS / "fashion-mnist-classifier"
