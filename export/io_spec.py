"""One declaration of the denoiser's inputs and outputs, used by the ONNX export and the engine build.

Like TensorRT demo/Diffusion's ``get_input_names`` / ``get_dynamic_axes`` / ``get_input_profile``:
names, dtypes, the dynamic batch axis and the TensorRT shape profile are declared here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from runtime.backends.base import OUTPUT_NAMES, cond_shape, input_names
from runtime.config import ModelConfig

__all__ = ["BATCH_AXIS", "OUTPUT_NAMES", "DTYPE", "BatchProfile", "input_names_of", "tensor_shapes", "dynamic_axes",
           "input_profile", "feed"]
BATCH_AXIS = "batch"
DTYPE = "float32"  # every input and output, in every precision (FP16 is internal to the graph)


@dataclass(frozen=True)
class BatchProfile:
    """Batch sizes an engine accepts: min <= opt <= max (all equal for a static batch)."""

    min: int = 1
    """TensorRT profile: smallest batch."""
    opt: int = 16
    """TensorRT profile: the batch tuned for."""
    max: int = 64
    """TensorRT profile: largest batch."""

    def __post_init__(self) -> None:
        if not 1 <= self.min <= self.opt <= self.max:
            raise ValueError(f"need 1 <= min-batch <= opt-batch <= max-batch, got {self.min}, {self.opt}, {self.max}")

    @classmethod
    def static(cls, batch: int) -> "BatchProfile":
        return cls(batch, batch, batch)

    @property
    def is_static(self) -> bool:
        return self.min == self.max


def input_names_of(cfg: ModelConfig) -> tuple[str, str]:
    """The images, then ``noise_variances`` or ``timesteps`` as the config's conditioning says."""
    return input_names(cfg.conditioning)


def tensor_shapes(cfg: ModelConfig, batch: int | str) -> dict[str, tuple[int | str, ...]]:
    """Shape of every input and output at ``batch`` (an int, or the symbolic batch axis)."""
    image = (batch, cfg.channels, cfg.image_size, cfg.image_size)  # (N, C, H, W)
    images, cond = input_names_of(cfg)
    return {images: image, cond: cond_shape(cfg.conditioning, batch), OUTPUT_NAMES[0]: image}


def dynamic_axes(cfg: ModelConfig) -> dict[str, dict[int, str]]:
    """``torch.onnx.export``'s dynamic_axes: the batch axis of every tensor."""
    return {name: {0: BATCH_AXIS} for name in input_names_of(cfg) + OUTPUT_NAMES}


def feed(cfg: ModelConfig, x: NDArray, noise_var: NDArray, t: NDArray) -> dict[str, NDArray[np.float32]]:
    """The network's inputs for images ``x`` (N, C, H, W) at steps ``t`` (N,) of noise variance ``noise_var``
    (N,): each image's variance as (N, 1, 1, 1), or its timestep as (N,), all float32."""
    images, cond = input_names_of(cfg)
    n = len(x)
    value = np.asarray(t if cfg.conditioning == "timestep" else noise_var, dtype=np.float32)
    return {images: np.asarray(x, dtype=np.float32), cond: value.reshape(cond_shape(cfg.conditioning, n))}


def input_profile(cfg: ModelConfig, profile: BatchProfile) -> dict[str, tuple[tuple[int, ...], ...]]:
    """TensorRT optimisation-profile shapes (min, opt, max) of every input."""
    out = {}
    for name in input_names_of(cfg):
        out[name] = tuple(tuple(int(d) for d in tensor_shapes(cfg, b)[name])
                          for b in (profile.min, profile.opt, profile.max))
    return out
