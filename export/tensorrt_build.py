"""TensorRT engines built from ``model.fp16.onnx`` through the TensorRT Python API, with their manifest.

TensorRT 10 and 11 alike: the network is strongly typed, so every layer runs in the precision the
ONNX graph gives it (float16 compute, the embedding and normalisation nodes float32, float32 I/O,
as ``export.onnx_graph.to_fp16`` wrote them). No weak-typing API is used: TensorRT 11 removed
``BuilderFlag.FP16``, ``OBEY_PRECISION_CONSTRAINTS``, ``ILayer.precision`` and
``ILayer.set_output_type``, and on TensorRT 10 they would fight the graph's own types. TensorRT 10
needs ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``; TensorRT 11 is always strongly typed (the
flag is deprecated there and not passed).

The manifest beside ``model.plan`` records what the engine is bound to (TensorRT version, GPU and
compute capability, the ONNX it was built from and that file's precision) so the runtime can refuse
a stale engine with a clear "rebuild" message instead of failing later.
"""

from __future__ import annotations

import json
import logging
import shlex
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx

from export.io_spec import BatchProfile, input_names_of, input_profile
from export.onnx_graph import graph_precision
from runtime.backends.base import BackendError
from runtime.backends.cuda_arrays import CupyArrays, device_info, import_cupy
from runtime.backends.tensorrt_backend import MANIFEST_SCHEMA, Engine, import_tensorrt
from runtime.config import ModelSpec
from runtime.common.files import atomic_write_bytes, atomic_write_text, cache_dir, sha256_file

log = logging.getLogger(__name__)


def unavailable_reason() -> str | None:
    """Why no engine can be built here (None when TensorRT 10/11, CuPy and a CUDA GPU are all present)."""
    try:
        import_tensorrt()
        cp = import_cupy()
    except BackendError as exc:
        return str(exc)
    try:
        if cp.cuda.runtime.getDeviceCount() < 1:
            return "no CUDA GPU is visible"
    except Exception as exc:  # noqa: BLE001 - no driver, no device: CuPy says which
        return f"no CUDA GPU is visible ({type(exc).__name__}: {exc})"
    return None


def timing_cache_path(trt_version: str, capability: str) -> Path:
    """The default timing cache: one per TensorRT version and compute capability (they do not transfer)."""
    return cache_dir() / "tensorrt" / f"timing-trt{trt_version}-sm{capability.replace('.', '')}.cache"


def build_engine(onnx_path: Path, plan_path: Path, spec: ModelSpec, profile: BatchProfile,
                 timing_cache: Path | None = None, optimization_level: int = 3) -> dict[str, Any]:
    """Build a strongly typed engine from ``onnx_path`` (normally model.fp16.onnx); returns the manifest."""
    trt = import_tensorrt()
    gpu, capability = device_info()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if major == 10 else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.builder_optimization_level = optimization_level
    cache_file = timing_cache or timing_cache_path(trt.__version__, capability)
    attach_timing_cache(config, cache_file, trt.__version__)
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in input_profile(spec.model, profile).items():
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)
    start = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see the TensorRT log above)")
    seconds = time.perf_counter() - start
    atomic_write_bytes(plan_path, bytes(serialized))
    Engine(plan_path, CupyArrays(), trt, spec)  # what was built loads here, with float32 I/O under the denoiser's names
    cache = config.get_timing_cache()
    if cache is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_file, bytes(cache.serialize()))
    precision = graph_precision(onnx.load(str(onnx_path), load_external_data=False))
    return manifest(spec, profile, onnx_path,
                    EngineBuild(trt.__version__, gpu, capability, seconds, optimization_level, precision))


def attach_timing_cache(config: Any, path: Path, trt_version: str) -> None:
    """Load ``path`` into the builder config; a cache from another TensorRT or GPU is replaced by a fresh one."""
    data = path.read_bytes() if path.is_file() else b""
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return
    if data:
        log.warning("timing cache %s does not match TensorRT %s on this GPU; starting a fresh one (it will "
                    "replace that file)", path, trt_version)
    cache = config.create_timing_cache(b"")
    if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
        log.warning("TensorRT refused an empty timing cache; building without one")


@dataclass(frozen=True)
class EngineBuild:
    """Where and how an engine was built: what its manifest records beside the model and profile."""

    tensorrt_version: str
    gpu: str
    compute_capability: str
    seconds: float
    optimization_level: int
    precision: str


def manifest(spec: ModelSpec, profile: BatchProfile, onnx_path: Path, build: EngineBuild) -> dict[str, Any]:
    """The engine's manifest: everything the runtime must match before loading ``model.plan``."""
    return {
        "schema_version": MANIFEST_SCHEMA,
        "tensorrt_version": build.tensorrt_version,
        "gpu": build.gpu,
        "compute_capability": build.compute_capability,
        "precision": build.precision,
        "strongly_typed": True,
        "profile": {"min_batch": profile.min, "opt_batch": profile.opt, "max_batch": profile.max,
                    "static": profile.is_static, "shapes": input_profile(spec.model, profile)},
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "build_seconds": round(build.seconds, 2),
        "builder_optimization_level": build.optimization_level,
        "config": spec.to_dict(),
    }


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def engine_runner(plan_path: Path, spec: ModelSpec) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """Load ``model.plan`` once; the returned function runs it on host arrays (one step per image)."""
    trt = import_tensorrt()
    arrays = CupyArrays()
    engine = Engine(plan_path, arrays, trt, spec)

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        x, v = (arrays.from_host(np.ascontiguousarray(feed[k])) for k in input_names_of(spec.model))
        return arrays.to_host(engine.run(x, v))

    return run


def equivalent_commands(onnx_name: str, spec: ModelSpec, profile: BatchProfile, optimization_level: int,
                        tolerance: float) -> dict[str, str]:
    """trtexec and polygraphy command lines for the same ONNX, profile and builder level.

    trtexec builds the engine inside another TensorRT (a Triton container's, say); polygraphy builds
    it and compares TensorRT with ONNX Runtime on the same file (add ``--trt-outputs mark all
    --onnx-outputs mark all`` to compare layer by layer). ``--stronglyTyped`` is needed on TensorRT
    10 and a no-op on 11.
    """
    shapes = input_profile(spec.model, profile)

    def trtexec_shapes(i: int) -> str:
        return ",".join(f"{name}:{'x'.join(map(str, dims[i]))}" for name, dims in shapes.items())

    def polygraphy_shapes(i: int) -> str:
        return " ".join(shlex.quote(f"{name}:[{','.join(map(str, dims[i]))}]") for name, dims in shapes.items())

    onnx_arg = shlex.quote(onnx_name)
    trtexec = (f"trtexec --onnx={onnx_arg} --saveEngine=model.plan --stronglyTyped "
               f"--minShapes={trtexec_shapes(0)} --optShapes={trtexec_shapes(1)} --maxShapes={trtexec_shapes(2)} "
               f"--builderOptimizationLevel={optimization_level} --timingCacheFile=timing.cache")
    polygraphy = (f"polygraphy run {onnx_arg} --trt --onnxrt --strongly-typed "
                  f"--trt-min-shapes {polygraphy_shapes(0)} --trt-opt-shapes {polygraphy_shapes(1)} "
                  f"--trt-max-shapes {polygraphy_shapes(2)} --input-shapes {polygraphy_shapes(1)} "
                  f"--builder-optimization-level {optimization_level} --atol {tolerance:g} --rtol {tolerance:g}")
    return {"trtexec": trtexec, "polygraphy": polygraphy}
