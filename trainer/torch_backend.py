"""The eager PyTorch backend: a trainer run directory (or an in-memory model) behind the runtime's protocol.

It is the reference every other backend is compared with, and it samples with the very same loop
(``runtime.api``). The runtime finds it through the ``ddim_deploy.backends`` entry point, so the
torch-free runtime never imports torch or the trainer unless this backend is chosen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray
from torch import nn

from runtime.backends.base import cond_shape, cond_values
from runtime.config import ModelSpec
from runtime.common.hostinfo import check_threads, threads_label
from trainer.rundir import load_model


class TorchBackend:
    """Eager PyTorch inference (float32) on CPU or CUDA."""

    name = "torch"
    precision = "fp32"

    def __init__(self, path: Path | None = None, device: str = "cpu", precision: str = "fp32",
                 threads: int | None = None, *, model: nn.Module | None = None, spec: ModelSpec | None = None) -> None:
        if precision != "fp32":
            raise ValueError("the torch backend is the float32 reference; use --precision fp32")
        if model is None:
            if path is None:
                raise ValueError("the torch backend needs a trainer run directory")
            model, spec = load_model(path)
        if spec is None:
            raise ValueError("an in-memory model needs its ModelSpec")
        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: this PyTorch has no usable CUDA GPU")
        self.device = device
        # torch's own default can oversubscribe a busy CPU; this process-wide setting is what --threads means
        self.threads = check_threads(threads)
        torch.set_num_threads(self.threads)
        self.provider = f"eager PyTorch {torch.__version__} on {device}" + \
            (f", {threads_label(self.threads)}" if device == "cpu" else "")
        self.model = model.to(device).eval()
        self.spec = spec

    per_image_cond = True

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, cond: Any) -> torch.Tensor:
        conditioning = self.spec.model.conditioning
        if np.ndim(cond) == 0:
            return self.model(x, torch.full(cond_shape(conditioning, x.shape[0]), cond, device=x.device))
        return self.model(x, torch.from_numpy(cond_values(conditioning, x.shape[0], cond)).to(x.device))

    def from_host(self, x: NDArray[np.float32]) -> torch.Tensor:
        return torch.from_numpy(x).to(self.device)

    def to_host(self, x: torch.Tensor) -> NDArray[np.float32]:
        return x.float().cpu().numpy()

    def is_finite(self, x: torch.Tensor) -> bool:
        return bool(torch.isfinite(x).all())

    def clip_bounds(self, lo: tuple[float, ...], hi: tuple[float, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(torch.tensor(b, device=self.device).view(1, -1, 1, 1) for b in (lo, hi))  # type: ignore[return-value]
