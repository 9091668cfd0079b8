"""Device arrays for the GPU backends (CuPy): the DDIM update runs on the GPU, on the backend's stream.

``runtime.schedule.ddim_step`` uses only arithmetic and ``.clip``, which CuPy arrays provide, so the
update, the noise and the finite checks stay on the device between steps; only the initial and
per-step noise (drawn on the host so every backend sees the same numbers) cross once per step.

Every array the loop feeds an engine is made on the backend's stream (CuPy queues a copy or a
kernel on the *current* stream): an array made on another stream could be read by the engine
before it is written. The methods here make their stream current themselves, so callers outside
:meth:`CupyArrays.context` (benchmarks, one-off forwards) are safe too.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from runtime.backends.base import BackendError, cond_shape, cond_values
from runtime.common.extras import install_hint


def import_cupy() -> Any:
    try:
        import cupy
    except ImportError:
        raise BackendError(f"GPU sampling needs CuPy ({install_hint('gpu', 'cupy-cuda13x')})") from None
    return cupy


def device_info() -> tuple[str, str]:
    """The current CUDA device's name and compute capability ("9.0"), as engines and manifests record them."""
    cp = import_cupy()
    device = cp.cuda.Device()
    name = cp.cuda.runtime.getDeviceProperties(device.id)["name"]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return name, "{}.{}".format(*divmod(int(device.compute_capability), 10))


class CupyArrays:
    """The array half of the Backend protocol for CuPy device arrays on ``stream``."""

    def __init__(self) -> None:
        self.cp = import_cupy()
        self.stream = self.cp.cuda.Stream(non_blocking=True)

    def context(self) -> Any:
        """Make the backend's stream current: kernels, copies and engine runs are ordered on it."""
        return self.stream

    def from_host(self, x: NDArray[np.float32]) -> Any:
        with self.stream:
            return self.cp.asarray(x)

    def full(self, shape: tuple[int, ...], value: float) -> Any:
        """A float32 device array of ``value`` (the noise variances an engine reads)."""
        with self.stream:
            return self.cp.full(shape, value, dtype=self.cp.float32)

    def cond(self, conditioning: str, n: int, cond: Any) -> Any:
        """The conditioning input of a batch of ``n`` on the device: one level (a float, filled on the device) or
        one per image (a host array, copied; :func:`runtime.backends.base.cond_values`)."""
        if np.ndim(cond) == 0:
            return self.full(cond_shape(conditioning, n), cond)  # type: ignore[arg-type]
        return self.from_host(cond_values(conditioning, n, cond))  # type: ignore[arg-type]

    def empty_like(self, x: Any) -> Any:
        with self.stream:
            return self.cp.empty_like(x)

    def to_host(self, x: Any) -> NDArray[np.float32]:
        host = self.cp.asnumpy(x, stream=self.stream)
        self.stream.synchronize()  # the copy is complete before the host reads it, whatever CuPy's default
        return host

    def is_finite(self, x: Any) -> bool:
        with self.stream:
            return bool(self.cp.isfinite(x).all())  # one scalar back to the host per step

    def clip_bounds(self, lo: tuple[float, ...], hi: tuple[float, ...]) -> tuple[Any, Any]:
        with self.stream:
            return tuple(self.cp.asarray(b, dtype=self.cp.float32).reshape(1, -1, 1, 1) for b in (lo, hi))  # type: ignore[return-value]


class OnDevice:
    """The array half of the Backend protocol for backends holding a :class:`CupyArrays` as ``arrays``."""

    arrays: CupyArrays

    def context(self) -> Any:
        return self.arrays.context()

    def from_host(self, x: NDArray[np.float32]) -> Any:
        return self.arrays.from_host(x)

    def to_host(self, x: Any) -> NDArray[np.float32]:
        return self.arrays.to_host(x)

    def is_finite(self, x: Any) -> bool:
        return self.arrays.is_finite(x)

    def clip_bounds(self, lo: tuple[float, ...], hi: tuple[float, ...]) -> tuple[Any, Any]:
        return self.arrays.clip_bounds(lo, hi)
