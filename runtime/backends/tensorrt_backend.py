"""TensorRT backend: ``model.plan`` loaded only after its manifest matches this machine.

Works with TensorRT 10 and 11 (strongly typed engines: the precision is the ONNX graph's, recorded
in the manifest). Buffers are CuPy device arrays on the backend's stream; the DDIM update runs
there too. With a static-batch engine, the engine's enqueue is captured once in a CUDA graph and
replayed each step (inputs are copied into the captured buffers first); a capture that fails falls
back to plain enqueues with a warning, never to a graph that replays garbage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from runtime.exportdir import ENGINE, FP32_ONNX, MANIFEST
from runtime.backends.base import OUTPUT_NAMES, BackendError, Cond, cond_shape, cond_values, input_names
from runtime.backends.cuda_arrays import CupyArrays, OnDevice, device_info
from runtime.config import ConfigError, ModelSpec
from runtime.common.extras import install_hint
from runtime.common.files import read_capped, sha256_file

log = logging.getLogger(__name__)
MANIFEST_SCHEMA = 1
SUPPORTED_MAJORS = (10, 11)
REBUILD = "rebuild it with ddim-export --fp16 on this machine"


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, refused with a clear message when it is missing or older than 10."""
    try:
        import tensorrt as trt
    except ImportError:
        raise BackendError(f"TensorRT is not installed ({install_hint('gpu', 'tensorrt-cu13')})") from None
    version = str(getattr(trt, "__version__", "unknown"))
    try:
        major = int(version.split(".")[0])
    except ValueError:
        major = 0
    if major < SUPPORTED_MAJORS[0]:
        raise BackendError(f"TensorRT {version} is installed; ddim-deploy needs TensorRT 10 or 11")
    return trt


def check_manifest(export_dir: Path, trt_version: str, capability: str) -> dict[str, Any]:
    """The engine's manifest, if it matches the installed TensorRT, this GPU and the ONNX beside it."""
    plan, path = export_dir / ENGINE, export_dir / MANIFEST
    if not plan.is_file():
        raise BackendError(f"{export_dir} holds no model.plan; build one with ddim-export --fp16 on a GPU machine")
    try:
        manifest = json.loads(read_capped(path, what="manifest"))
    except FileNotFoundError:
        raise BackendError(f"{plan} has no manifest.json beside it; {REBUILD}") from None
    except (OSError, ValueError) as exc:  # ValueError: JSON, too large, not a regular file
        raise BackendError(f"unreadable {path} ({exc}); {REBUILD}") from None
    if not isinstance(manifest, dict) or manifest.get("schema_version") != MANIFEST_SCHEMA:
        schema = manifest.get("schema_version") if isinstance(manifest, dict) else None
        raise BackendError(f"{path} has manifest schema {schema!r}; {REBUILD}")
    checks = [
        ("TensorRT version", manifest.get("tensorrt_version"), trt_version),
        ("GPU compute capability", manifest.get("compute_capability"), capability),
    ]
    onnx_file = export_dir / str(manifest.get("onnx_file", FP32_ONNX))
    if onnx_file.is_file():
        checks.append(("ONNX sha256", manifest.get("onnx_sha256"), sha256_file(onnx_file)))
    for what, built, here in checks:
        if built != here:
            raise BackendError(f"model.plan was built for {what} {built}, this machine has {here}; {REBUILD}")
    return manifest


class Engine:
    """A deserialized engine and one execution context, enqueued on a :class:`CupyArrays` stream."""

    def __init__(self, plan: Path, arrays: CupyArrays, trt: Any, spec: ModelSpec) -> None:
        self.arrays = arrays
        self.inputs = input_names(spec.model.conditioning)
        engine = trt.Runtime(trt.Logger(trt.Logger.WARNING)).deserialize_cuda_engine(plan.read_bytes())
        if engine is None:
            raise BackendError(f"TensorRT {trt.__version__} cannot load {plan}; {REBUILD}")
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        if sorted(names) != sorted(self.inputs + OUTPUT_NAMES):
            raise BackendError(f"{plan} has I/O tensors {names}, not the denoiser's")
        not_float = {n: str(engine.get_tensor_dtype(n)) for n in names
                     if engine.get_tensor_dtype(n) != trt.DataType.FLOAT}
        if not_float:
            raise BackendError(f"{plan} has non-float32 I/O {not_float}; {REBUILD}")
        self.engine, self.context = engine, engine.create_execution_context()

    def check_dims(self, spec: ModelSpec, source: str) -> None:
        """Refuse an engine whose image tensors are not the manifest's sizes (the sampler allocates those)."""
        from runtime.backends.ort_backend import check_image_dims  # ONNX Runtime comes with TensorRT's extra

        for name in (self.inputs[0], OUTPUT_NAMES[0]):
            check_image_dims(self.dims(name), spec, name, source, what="engine", told=MANIFEST)

    def dims(self, name: str) -> list[int]:
        """``name``'s dims, -1 where set at run time, unless the first profile pins an input's size."""
        dims = [int(d) for d in self.engine.get_tensor_shape(name)]
        if -1 in dims[1:] and name in self.inputs and self.engine.num_optimization_profiles > 0:
            lo, _, hi = ([int(d) for d in shape] for shape in self.engine.get_tensor_profile_shape(name, 0))
            dims = [lo[i] if d < 0 and i > 0 and lo[i] == hi[i] else d for i, d in enumerate(dims)]
        return dims

    def bind(self, x: Any, v: Any, out: Any) -> None:
        for name, arr in zip(self.inputs, (x, v)):
            if not self.context.set_input_shape(name, tuple(arr.shape)):
                raise BackendError(f"TensorRT refused shape {tuple(arr.shape)} for {name}")
            self.context.set_tensor_address(name, arr.data.ptr)
        self.context.set_tensor_address(OUTPUT_NAMES[0], out.data.ptr)

    def enqueue(self) -> None:
        if not self.context.execute_async_v3(self.arrays.stream.ptr):
            raise RuntimeError("TensorRT execution failed (see the TensorRT log above)")

    def run(self, x: Any, v: Any) -> Any:
        """Predicted noise for device arrays ``x`` (N, C, H, W) and ``v`` (the conditioning), on the stream."""
        out = self.arrays.empty_like(x)
        self.bind(x, v, out)
        self.enqueue()
        return out


class TensorRTBackend(OnDevice):
    """Runs a TensorRT engine on device buffers; CUDA-graph replay for static-batch engines."""

    name = "tensorrt"

    def __init__(self, path: Path, device: str = "cuda", precision: str | None = None) -> None:
        trt = import_tensorrt()
        if device != "cuda":
            raise BackendError("the TensorRT backend runs on CUDA only (--device cuda)")
        try:
            self._start(path if path.is_dir() else path.parent, precision, trt)
        except BackendError:
            raise
        except Exception as exc:  # CuPy, CUDA or TensorRT errors, a manifest missing a key: say which
            first = (str(exc).strip().splitlines() or [""])[0]
            raise BackendError(f"the TensorRT backend could not start: {type(exc).__name__}: {first}") from exc

    def _start(self, export_dir: Path, precision: str | None, trt: Any) -> None:
        self.arrays = CupyArrays()
        _, capability = device_info()
        manifest = check_manifest(export_dir, trt.__version__, capability)
        built = manifest["precision"]
        if precision is not None and precision != built:
            raise BackendError(f"model.plan is a {built} engine and --precision {precision} was asked; "
                               "ONNX Runtime runs the other precisions (--backend onnxruntime)")
        try:
            self.spec = ModelSpec.from_dict(manifest["config"])
        except ConfigError as exc:
            raise BackendError(f"manifest.json: {exc}") from None
        self.model_path = export_dir / ENGINE
        self.engine = Engine(self.model_path, self.arrays, trt, self.spec)
        self.conditioning = self.spec.model.conditioning
        self.engine.check_dims(self.spec, str(self.model_path))
        prof = manifest["profile"]
        self.min_batch, self.max_batch, self.static = prof["min_batch"], prof["max_batch"], prof["static"]
        self.device, self.precision = "cuda", built
        self.provider = f"TensorRT {trt.__version__} {built} engine"
        self._graph: Any = None
        self._capture_failed = False
        self._buffers: dict[str, Any] = {}

    per_image_cond = True

    def denoise(self, x: Any, cond: Cond) -> Any:
        n = x.shape[0]
        if not self.min_batch <= n <= self.max_batch:
            raise BackendError(f"batch {n} is outside the engine's profile {self.min_batch}..{self.max_batch}; "
                               "use --batch-size within it or rebuild with ddim-export --min-batch/--max-batch")
        if self.static and not self._capture_failed:
            return self._replay(x, cond)
        return self.engine.run(x, self.arrays.cond(self.conditioning, n, cond))

    def _replay(self, x: Any, cond: Cond) -> Any:
        """Static batch: copy into the captured buffers and launch the captured engine run."""
        if self._graph is None and not self._capture(x):
            return self.denoise(x, cond)
        b, stream = self._buffers, self.arrays.stream
        with stream:
            b["x"][...] = x
            if np.ndim(cond) == 0:
                b["v"].fill(cond)
            else:
                b["v"][...] = self.arrays.from_host(cond_values(self.conditioning, x.shape[0], cond))
        self._graph.launch(stream)
        return b["out"]  # consumed by the update before the next replay overwrites it

    def _capture(self, x: Any) -> bool:
        """Capture one enqueue on the static buffers; False (and plain enqueues from now on) if it fails."""
        a = self.arrays
        v = a.full(cond_shape(self.conditioning, x.shape[0]), 0.0)
        b = self._buffers = {"x": a.empty_like(x), "v": v, "out": a.empty_like(x)}
        self.engine.bind(b["x"], b["v"], b["out"])
        self.engine.enqueue()  # a first run outside capture lets TensorRT allocate what it needs
        ok, graph, error = False, None, ""
        a.stream.begin_capture()
        try:
            ok = bool(self.engine.context.execute_async_v3(a.stream.ptr))
        except Exception as exc:  # noqa: BLE001 - any failure means: do not replay this graph
            error = f"{type(exc).__name__}: {exc}"
        finally:
            try:  # always end the capture: a stream left capturing breaks every later launch
                graph = a.stream.end_capture()
            except Exception as exc:  # noqa: BLE001
                error = error or f"end_capture: {type(exc).__name__}: {exc}"
        if ok and graph is not None and not error:
            self._graph = graph
            return True
        self._capture_failed = True
        log.warning("CUDA-graph capture of the TensorRT engine failed (%s); running without a graph",
                    error or "execute_async_v3 returned False")
        return False
