"""Backends: given noisy images and the step's conditioning (noise variance or timestep), return the predicted noise.

- :mod:`runtime.backends.base`: the protocol every backend implements, the denoiser's I/O names, the error;
- :mod:`runtime.backends.registry`: the table of backends (built-in rows, registered ones, entry-point plugins)
  and ``open_backend``, which picks one;
- one module per engine: ``ort_backend`` (ONNX Runtime CPU and CUDA), ``tensorrt_backend`` (with
  ``cuda_arrays``), and the eager torch backend in ``trainer.torch_backend`` (a plugin).
"""

from runtime.backends.base import (
    COND_INPUTS,
    IMAGE_INPUT,
    OUTPUT_NAMES,
    Backend,
    BackendError,
    cond_shape,
    input_names,
)
from runtime.backends.registry import BackendEntry, OpenRequest, open_backend, plugin, register

__all__ = ["COND_INPUTS", "IMAGE_INPUT", "OUTPUT_NAMES", "Backend", "BackendEntry", "BackendError", "OpenRequest",
           "cond_shape", "input_names", "open_backend", "plugin", "register"]
