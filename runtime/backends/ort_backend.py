"""ONNX Runtime backend: CPU (and CUDA with onnxruntime-gpu), sessions tuned and cached on disk."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from runtime.backends import BackendError
from runtime.backends.cuda_arrays import CupyArrays, OnDevice
from runtime.config import ConfigError
from runtime.files import cache_dir
from runtime.hostinfo import cpu_fingerprint, physical_cores
from runtime.metadata import spec_from_metadata
from runtime.sampler import numpy_is_finite

log = logging.getLogger(__name__)
MODEL_FILES = {"fp32": "model.onnx", "fp16": "model.fp16.onnx", "int8": "model.int8.onnx"}


def cuda_available() -> bool:
    return "CUDAExecutionProvider" in ort.get_available_providers()


def model_file(path: Path, precision: str) -> Path:
    """The ONNX file to run: ``path`` itself, or the export directory's file of ``precision``."""
    if path.is_dir():
        path = path / MODEL_FILES[precision]
    if not path.is_file():
        flag = {"fp16": " --fp16", "int8": " --int8"}.get(precision, "")
        raise BackendError(f"no model at {path} (export one with ddim-export{flag})")
    return path


def session_options(optimized_path: Path | None) -> ort.SessionOptions:
    """Full graph optimisation, one thread per physical core, spinning between the loop's back-to-back runs."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = physical_cores()
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.log_severity_level = 3  # ORT warns that optimised graphs are host-specific: the cache key says so too
    if optimized_path is not None:
        so.optimized_model_filepath = str(optimized_path)
    return so


def cached_session(model_path: Path, providers: list[str]) -> ort.InferenceSession:
    """A session on the optimised graph cached by model hash, ORT version, CPU features and provider."""
    data = model_path.read_bytes()
    key = "-".join([hashlib.sha256(data).hexdigest()[:16], ort.__version__, cpu_fingerprint(), providers[0]])
    cached = cache_dir() / "onnxruntime" / f"{key}.onnx"
    try:
        if cached.is_file():
            so = session_options(None)
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # optimised already
            return ort.InferenceSession(str(cached), so, providers=providers)
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        session = ort.InferenceSession(data, session_options(tmp), providers=providers)
        if tmp.is_file():
            os.replace(tmp, cached)
        return session
    except OSError:  # an unwritable cache only costs start-up time
        return ort.InferenceSession(data, session_options(None), providers=providers)


class OrtBackend:
    """Runs an exported ONNX model; the DDIM loop keeps numpy arrays on the host."""

    name = "onnxruntime"

    def __init__(self, path: Path, device: str = "cpu", precision: str = "fp32") -> None:
        if device == "cuda" and not cuda_available():
            raise BackendError("--device cuda: this onnxruntime has no CUDA provider (pip install onnxruntime-gpu)")
        self.model_path = model_file(path, precision)
        self.device, self.precision = device, precision
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
        try:
            self.session = cached_session(self.model_path, providers)
        except Exception as exc:  # ORT raises its own exception types for corrupt or invalid files
            raise BackendError(f"cannot load {self.model_path}: {str(exc).strip().splitlines()[0]}") from None
        self.provider = self.session.get_providers()[0]
        try:
            self.spec = spec_from_metadata(self.session.get_modelmeta().custom_metadata_map, str(self.model_path))
        except ConfigError as exc:
            raise BackendError(str(exc)) from None
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (["noisy_images", "noise_variances"], ["pred_noises"]):
            raise BackendError(f"{self.model_path} has inputs/outputs {names}, not the denoiser's")

    def denoise(self, x: NDArray[np.float32], noise_var: float) -> NDArray[np.float32]:
        v = np.full((x.shape[0], 1, 1, 1), noise_var, dtype=np.float32)
        return self.session.run(["pred_noises"], {"noisy_images": x, "noise_variances": v})[0]

    def from_host(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        return x

    def to_host(self, x: NDArray[np.float32]) -> NDArray[np.float32]:
        return x

    def is_finite(self, x: NDArray[np.float32]) -> bool:
        return numpy_is_finite(x)

    def clip_bounds(self, lo: tuple[float, ...], hi: tuple[float, ...]) -> tuple[NDArray, NDArray]:
        return (np.asarray(lo, dtype=np.float32).reshape(1, -1, 1, 1), np.asarray(hi, dtype=np.float32).reshape(1, -1, 1, 1))


class OrtCudaBackend(OnDevice, OrtBackend):
    """ONNX Runtime CUDA with I/O binding on CuPy device buffers: no host round trip between steps."""

    def __init__(self, path: Path, device: str = "cuda", precision: str = "fp32") -> None:
        OrtBackend.__init__(self, path, "cuda", precision)
        self.arrays = CupyArrays()
        self.binding = self.session.io_binding()

    def denoise(self, x: Any, noise_var: float) -> Any:
        cp = self.arrays.cp
        v = cp.full((x.shape[0], 1, 1, 1), noise_var, dtype=cp.float32)
        out = cp.empty_like(x)
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        b.bind_input("noisy_images", "cuda", 0, np.float32, tuple(x.shape), x.data.ptr)
        b.bind_input("noise_variances", "cuda", 0, np.float32, tuple(v.shape), v.data.ptr)
        b.bind_output("pred_noises", "cuda", 0, np.float32, tuple(out.shape), out.data.ptr)
        self.arrays.stream.synchronize()  # ORT runs on its own stream: inputs must be complete
        self.session.run_with_iobinding(b)  # returns once the outputs are written
        return out
