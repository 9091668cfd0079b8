"""A backend that is not one of ours: registered through the backend table alone (tests/test_backend_table.py).

It reads the model's config from the ONNX file's metadata (the contract every reader shares) and "denoises" with a
fixed numpy function, so sampling through it is cheap and deterministic.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx

from runtime.backends.base import BackendError
from runtime.backends.registry import OpenRequest
from runtime.exportdir import FP32_ONNX
from runtime.metadata import spec_from_metadata


class FakeBackend:
    """Predicted noise = 0.5 * x * cond: cheap, deterministic, finite."""

    name, device, precision, provider = "fake", "cpu", "fp32", "numpy stand-in"

    def __init__(self, path: Path, device: str = "cpu", precision: str = "fp32", threads: int | None = None) -> None:
        model = path / FP32_ONNX if path.is_dir() else path
        if not model.is_file():
            raise BackendError(f"the fake backend needs {FP32_ONNX} in {path}")
        props = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
        self.spec = spec_from_metadata(props, str(model))
        self.model_path = model
        self.calls = 0

    def denoise(self, x: Any, cond: float) -> Any:
        self.calls += 1
        return (0.5 * x * cond).astype(np.float32)

    from_host = to_host = staticmethod(lambda a: a)
    is_finite = staticmethod(lambda a: bool(np.isfinite(a).all()))
    clip_bounds = staticmethod(lambda lo, hi: (np.asarray(lo, np.float32).reshape(1, -1, 1, 1),
                                               np.asarray(hi, np.float32).reshape(1, -1, 1, 1)))


def open_fake(r: OpenRequest) -> tuple[FakeBackend, str]:
    """The table's opener: the backend and the one line saying why it was picked."""
    b = FakeBackend(r.path, r.device or "cpu", r.precision or "fp32", r.threads)
    return b, f"fake, {b.provider} ({'asked for' if r.asked else 'first in auto'})"
