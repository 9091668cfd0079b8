"""OpenVINO backend (CPU): ``model.onnx`` in float32 or bfloat16, ``model.int8.onnx`` (the QDQ file) in INT8.

- **Precisions.** fp32 runs ``model.onnx`` with the inference precision hint ``f32``: on CPUs with BF16 (AMX,
  AVX512-BF16) OpenVINO's default is bf16, so float32 is asked for explicitly. bf16 runs the same file with the
  hint ``bf16``, only where the CPU lists BF16 among its optimisation capabilities (elsewhere OpenVINO would
  emulate it or fall back silently: refused in one line). int8 runs ``model.int8.onnx``, the gated QDQ file of
  ``ddim-export --int8``, its float parts in f32.
- **Static shapes.** The graph is read once (ONNX frontend only, external data confined to the model's folder as
  ONNX Runtime confines it: :func:`read_onnx`) and compiled per batch size, reshaped to a static N (OpenVINO's
  CPU plugin plans memory and picks kernels for the shape); at most :data:`MAX_COMPILED` shapes are kept, the least
  recently used dropped first; a batch runs in the next power of two, padded (:func:`bucket`). ``threads`` sets INFERENCE_NUM_THREADS; the performance hint is LATENCY (one stream:
  the loop runs one batch at a time).
- **No model cache.** OpenVINO's CACHE_DIR was measured and left off: a process importing OpenVINO, opening the
  shipped model and compiling batch 16 took 0.97 s without it and 0.80 s with a warm cache (median of 5 interleaved
  cold processes, 1.4 s each in all): 12%, and the toolkit keeps a cache only where it saves 20% of a cold start
  (docs/sampling.md).

The model's config is read from the ONNX metadata exactly as the ONNX Runtime backend reads it (the file checked
first by :func:`runtime.backends.ort_backend.check_model_file`, then :mod:`runtime.metadata`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov
from numpy.typing import NDArray

from runtime.backends.base import OUTPUT_NAMES, BackendError, Cond, OnHost, cond_shape, cond_values, input_names
from runtime.backends.ort_backend import check_image_dims, check_model_file, model_file
from runtime.config import ConfigError
from runtime.common.hostinfo import check_threads
from runtime.metadata import read_onnx_metadata, spec_from_metadata

PRECISIONS = ("fp32", "bf16", "int8")
HINTS = {"fp32": "f32", "bf16": "bf16", "int8": "f32"}  # INFERENCE_PRECISION_HINT (int8: its float parts)
FILES = {"fp32": "fp32", "bf16": "fp32", "int8": "int8"}  # which exported file each runs (runtime.exportdir)
MAX_COMPILED = 6  # batch shapes kept compiled (buckets: 1, 2, 4, 8, 16, 32 cover every batch of ddim-serve's)
MAX_BUCKET = 256  # batches up to this run padded to the next power of two; larger ones compile their own shape


def bucket(n: int) -> int:
    """The compiled batch a batch of ``n`` runs in: the next power of two up to :data:`MAX_BUCKET`, else ``n``. A
    compile costs 0.3-1 s (more than a dozen forwards of the shipped model): ddim-serve's batches change size with
    its queue, and a sampling call's last batch is smaller; padding with zeros costs only the extra images' compute
    (each image is computed on its own: no batch statistics at inference)."""
    return n if n > MAX_BUCKET else 1 << (n - 1).bit_length()
DEVICE = "CPU"


def cpu_capabilities(core: Any) -> list[str]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU (``["FP32", "BF16", "INT8", ...]``)."""
    return [str(c) for c in core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES")]


def check_bf16(core: Any) -> None:
    """Refuse bf16 on a CPU without it, in one line naming what it lacks."""
    caps = cpu_capabilities(core)
    if "BF16" not in caps:
        raise BackendError(f"--precision bf16: this CPU has no bfloat16 instructions (OpenVINO lists {', '.join(caps)};"
                           " bf16 needs AVX512-BF16 or AMX-BF16); use --precision fp32 or int8")


def read_onnx(path: Path) -> Any:
    """The graph of ONNX file ``path``, through OpenVINO's ONNX frontend alone (``Core.read_model`` would try every
    frontend it has, PyTorch's among them, on a file that is not ONNX). Read from the path, not its bytes: external
    data then resolves in the model's own folder, and OpenVINO refuses paths that leave it (absolute or ``..``);
    from bytes it would resolve them against the working directory, and read absolute ones."""
    from openvino.frontend import FrontEndManager

    frontend = FrontEndManager().load_by_framework("onnx")
    return frontend.convert(frontend.load(str(path)))


def ov_reason(exc: Exception) -> str:
    """The line of an OpenVINO exception that says what is wrong (not where in its sources it was raised)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = [line for line in lines if not line.startswith(("Exception from ", "Check '"))]
    return (said or lines or [type(exc).__name__])[-1]


def _dims(shape: Any) -> list[int | str]:
    """An OpenVINO partial shape as ints, with ``?`` where a dimension is dynamic."""
    return [d.get_length() if d.is_static else "?" for d in shape] if shape.rank.is_static else []


class OpenVinoBackend(OnHost):
    """Runs an exported ONNX model on OpenVINO's CPU plugin; the DDIM loop keeps numpy arrays on the host."""

    name = "openvino"

    def __init__(self, path: Path, device: str = "cpu", precision: str = "fp32", threads: int | None = None) -> None:
        if device != "cpu":
            raise BackendError(f"--device {device}: the OpenVINO backend runs on the CPU (--device cpu)")
        if precision not in PRECISIONS:
            raise BackendError(f"--precision {precision}: OpenVINO runs {', '.join(PRECISIONS)} here (fp16 is the "
                               "GPU's: TensorRT or ONNX Runtime CUDA)")
        self.core = ov.Core()
        if precision == "bf16":
            check_bf16(self.core)
        self.model_path = model_file(path, FILES[precision])
        self.device, self.precision, self.provider = "cpu", precision, f"OpenVINO {DEVICE}"
        self.threads = check_threads(threads)
        check_model_file(self.model_path)  # size and config, before the graph is read
        try:
            self.spec = spec_from_metadata(read_onnx_metadata(self.model_path), str(self.model_path))
        except ConfigError as exc:
            raise BackendError(str(exc)) from None
        except OSError as exc:
            raise BackendError(f"cannot read {self.model_path}: {exc.strerror or exc}") from None
        try:
            self.model = read_onnx(self.model_path)
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types for files it cannot read
            raise BackendError(f"cannot load {self.model_path}: {ov_reason(exc)}") from None
        self.conditioning = self.spec.model.conditioning
        self.inputs = input_names(self.conditioning)
        names = ([i.get_any_name() for i in self.model.inputs], [o.get_any_name() for o in self.model.outputs])
        if names != (list(self.inputs), list(OUTPUT_NAMES)):
            raise BackendError(f"{self.model_path} has inputs/outputs {names}, not those of a denoiser conditioned "
                               f"on {self.conditioning} ({list(self.inputs)}, {list(OUTPUT_NAMES)})")
        for port, name in ((self.model.inputs[0], self.inputs[0]), (self.model.outputs[0], OUTPUT_NAMES[0])):
            check_image_dims(_dims(port.get_partial_shape()), self.spec, name, str(self.model_path))
        self.config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": self.threads,
                                       "INFERENCE_PRECISION_HINT": HINTS[precision]}
        self._compiled: OrderedDict[int, Any] = OrderedDict()  # batch -> infer request of its compiled model
        self._lock = threading.Lock()  # an infer request runs one call at a time

    def _request(self, n: int) -> Any:
        """The infer request compiled for batch ``n`` (compiled now if not kept)."""
        request = self._compiled.get(n)
        if request is not None:
            self._compiled.move_to_end(n)
            return request
        m = self.spec.model
        model = self.model.clone()
        model.reshape({self.inputs[0]: [n, m.channels, m.image_size, m.image_size],
                       self.inputs[1]: list(cond_shape(self.conditioning, n))})
        try:
            compiled = self.core.compile_model(model, DEVICE, self.config)
        except Exception as exc:  # noqa: BLE001 - OpenVINO's own types
            raise BackendError(f"OpenVINO cannot compile {self.model_path} at batch {n}: {ov_reason(exc)}") from None
        request = compiled.create_infer_request()
        self._compiled[n] = request
        while len(self._compiled) > MAX_COMPILED:
            self._compiled.popitem(last=False)
        return request

    per_image_cond = True

    def denoise(self, x: NDArray[np.float32], cond: Cond) -> NDArray[np.float32]:
        return self.run_feed(x, cond_values(self.conditioning, x.shape[0], cond))

    def run_feed(self, x: NDArray[np.float32], cond: NDArray[np.float32]) -> NDArray[np.float32]:
        """The network on ``x`` with per-image conditioning ``cond`` (the gates' inputs: one level per image)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        cond = np.ascontiguousarray(cond, dtype=np.float32)
        n = x.shape[0]
        padded = bucket(n)
        if padded != n:
            x = np.concatenate([x, np.zeros((padded - n, *x.shape[1:]), dtype=np.float32)])
            cond = np.concatenate([cond, np.repeat(cond[-1:], padded - n, axis=0)])
        with self._lock:
            request = self._request(padded)
            request.infer({0: x, 1: cond}, share_inputs=True)
            return np.array(request.get_output_tensor(0).data[:n], dtype=np.float32, copy=True)  # the request reuses it
