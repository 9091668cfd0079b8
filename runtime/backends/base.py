"""The backend protocol: what the sampler needs from an inference engine, the denoiser's I/O names, the error.

Every backend works on its own arrays (numpy on the host, CuPy or torch on a device) and supplies the few array
operations the shared DDIM loop needs, so buffers stay where the backend keeps them. Backend modules import this
module only; choosing among them is :mod:`runtime.backends.registry`'s job.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from runtime.config import Conditioning, ModelSpec

# The denoiser's I/O names, as every exported file declares them (export.io_spec builds on these): the images,
# then the conditioning input its config names, then the predicted noise.
IMAGE_INPUT = "noisy_images"
COND_INPUTS: dict[str, str] = {"noise_variance": "noise_variances", "timestep": "timesteps"}
OUTPUT_NAMES = ("pred_noises",)


def input_names(conditioning: Conditioning) -> tuple[str, str]:
    """The denoiser's inputs: ``noisy_images`` (N, C, H, W) and ``noise_variances`` (N, 1, 1, 1) or
    ``timesteps`` (N,), all float32."""
    return IMAGE_INPUT, COND_INPUTS[conditioning]


def cond_shape(conditioning: Conditioning, batch: Any) -> tuple[Any, ...]:
    """Shape of the conditioning input at ``batch`` (an int or a symbolic axis name)."""
    return (batch,) if conditioning == "timestep" else (batch, 1, 1, 1)


Cond = Any  # a float (one level for the whole batch) or a host float32 array (N,): one level per image


def cond_values(conditioning: Conditioning, n: int, cond: Cond) -> NDArray[np.float32]:
    """The conditioning input of a batch of ``n`` (host float32, :func:`cond_shape`): ``cond`` a number gives every
    image that level; a 1-D array of ``n`` gives each image its own (step-level batching: images at different steps
    share one network call). Both round the float64 levels to float32 the same way, so an image's input does not
    depend on which form carried it."""
    if np.ndim(cond) == 0:
        return np.full(cond_shape(conditioning, n), cond, dtype=np.float32)
    v = np.asarray(cond, dtype=np.float32)
    if v.shape != (n,):
        raise ValueError(f"per-image conditioning must have shape ({n},) for a batch of {n}, got {v.shape}")
    return v.reshape(cond_shape(conditioning, n))


class BackendError(ValueError):
    """A backend that cannot run the given model here, with the reason."""


class Backend(Protocol):
    """What the sampler needs from an inference engine."""

    name: str
    device: str
    precision: str
    spec: ModelSpec

    # (N, C, H, W) and the step's cond (a float) or one per image (host float32 (N,), see cond_values) -> predicted
    # noise. A backend without ``per_image_cond = True`` is called with floats only (step-level batching then
    # calls it once per distinct level).
    def denoise(self, x: Any, cond: Cond) -> Any: ...
    def from_host(self, x: NDArray[np.float32]) -> Any: ...
    def to_host(self, x: Any) -> NDArray[np.float32]: ...
    def is_finite(self, x: Any) -> bool: ...
    def clip_bounds(self, lo: tuple[float, ...], hi: tuple[float, ...]) -> tuple[Any, Any]: ...


class OnHost:
    """The array side of a backend whose arrays are numpy on the host (ONNX Runtime CPU, OpenVINO): nothing to move,
    finite checks and clip bounds in numpy. Device backends override all four (``cuda_arrays.OnDevice``)."""

    def from_host(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        return x

    def to_host(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        return x

    def is_finite(self, x: NDArray[np.float32]) -> bool:
        from runtime.sampler import numpy_is_finite

        return numpy_is_finite(x)

    def clip_bounds(self, lo: tuple[float, ...], hi: tuple[float, ...]) -> tuple[NDArray, NDArray]:
        low, high = (np.asarray(b, dtype=np.float32).reshape(1, -1, 1, 1) for b in (lo, hi))
        return low, high
