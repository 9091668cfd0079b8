"""TensorRT backend: ``model.plan`` loaded only after its manifest matches this machine.

Buffers are CuPy device arrays on the backend's stream; the DDIM update runs there too. With a
static-batch engine, the engine's enqueue is captured once in a CUDA graph and replayed each step
(inputs are copied into the captured buffers first).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from runtime.backends import BackendError
from runtime.backends.cuda_arrays import CupyArrays, OnDevice
from runtime.config import ConfigError, ModelSpec
from runtime.files import sha256_file

log = logging.getLogger(__name__)
MANIFEST_SCHEMA = 1


def check_manifest(export_dir: Path, trt_version: str, capability: str) -> dict[str, Any]:
    """The engine's manifest, if it matches the installed TensorRT, this GPU and the ONNX beside it."""
    plan, path = export_dir / "model.plan", export_dir / "manifest.json"
    rebuild = "rebuild it with ddim-export --fp16 on this machine"
    if not plan.is_file():
        raise BackendError(f"{export_dir} holds no model.plan; build one with ddim-export --fp16 on a GPU machine")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise BackendError(f"{plan} has no manifest.json beside it; {rebuild}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BackendError(f"unreadable {path} ({exc}); {rebuild}") from None
    if manifest.get("schema_version") != MANIFEST_SCHEMA:
        raise BackendError(f"{path} has manifest schema {manifest.get('schema_version')!r}; {rebuild}")
    checks = [
        ("TensorRT version", manifest.get("tensorrt_version"), trt_version),
        ("GPU compute capability", manifest.get("compute_capability"), capability),
    ]
    onnx_file = export_dir / str(manifest.get("onnx_file", "model.onnx"))
    if onnx_file.is_file():
        checks.append(("ONNX sha256", manifest.get("onnx_sha256"), sha256_file(onnx_file)))
    for what, built, here in checks:
        if built != here:
            raise BackendError(f"model.plan was built for {what} {built}, this machine has {here}; {rebuild}")
    return manifest


class TensorRTBackend(OnDevice):
    """Runs a TensorRT engine on device buffers; CUDA-graph replay for static-batch engines."""

    name = "tensorrt"

    def __init__(self, path: Path, device: str = "cuda", precision: str = "fp16") -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise BackendError("TensorRT is not installed (pip install 'ddim-deploy[gpu]')") from None
        if device != "cuda":
            raise BackendError("the TensorRT backend runs on CUDA only (--device cuda)")
        self.arrays = CupyArrays()
        cp = self.arrays.cp
        cap = "{}.{}".format(*divmod(int(cp.cuda.Device().compute_capability), 10))
        export_dir = path if path.is_dir() else path.parent
        manifest = check_manifest(export_dir, trt.__version__, cap)
        try:
            self.spec = ModelSpec.from_dict(manifest["config"])
        except ConfigError as exc:
            raise BackendError(f"manifest.json: {exc}") from None
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(
            (export_dir / "model.plan").read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT cannot load {export_dir / 'model.plan'}; rebuild it with ddim-export --fp16")
        self.engine, self.exec_ctx = engine, engine.create_execution_context()
        prof = manifest["profile"]
        self.min_batch, self.max_batch, self.static = prof["min_batch"], prof["max_batch"], prof["static"]
        self.device, self.precision = "cuda", manifest.get("precision", "fp16")
        self.provider = f"TensorRT {trt.__version__} {manifest.get('precision', 'fp16')} engine"
        self.model_path = export_dir / "model.plan"
        self._graph: Any = None
        self._buffers: dict[str, Any] = {}

    def _bind(self, x: Any, v: Any, out: Any) -> None:
        for name, arr in (("noisy_images", x), ("noise_variances", v)):
            self.exec_ctx.set_input_shape(name, tuple(arr.shape))
            self.exec_ctx.set_tensor_address(name, arr.data.ptr)
        self.exec_ctx.set_tensor_address("pred_noises", out.data.ptr)

    def denoise(self, x: Any, noise_var: float) -> Any:
        cp, stream = self.arrays.cp, self.arrays.stream
        n = x.shape[0]
        if not self.min_batch <= n <= self.max_batch:
            raise BackendError(f"batch {n} is outside the engine's profile {self.min_batch}..{self.max_batch}; "
                               "use --batch-size within it or rebuild with ddim-export --min-batch/--max-batch")
        if self.static:
            return self._replay(x, noise_var)
        v = cp.full((n, 1, 1, 1), noise_var, dtype=cp.float32)
        out = cp.empty_like(x)
        self._bind(x, v, out)
        if not self.exec_ctx.execute_async_v3(stream.ptr):
            raise RuntimeError("TensorRT execution failed")
        return out

    def _replay(self, x: Any, noise_var: float) -> Any:
        """Static batch: copy into the captured buffers and launch the captured engine run."""
        cp, stream = self.arrays.cp, self.arrays.stream
        if self._graph is None:
            b = self._buffers = {"x": cp.empty_like(x), "v": cp.empty((x.shape[0], 1, 1, 1), dtype=cp.float32),
                                 "out": cp.empty_like(x)}
            self._bind(b["x"], b["v"], b["out"])
            self.exec_ctx.execute_async_v3(stream.ptr)  # a first run outside capture lets TensorRT allocate
            stream.begin_capture()
            self.exec_ctx.execute_async_v3(stream.ptr)
            self._graph = stream.end_capture()
        b = self._buffers
        b["x"][...] = x
        b["v"].fill(noise_var)
        self._graph.launch(stream)
        return b["out"]  # consumed by the update before the next replay overwrites it
