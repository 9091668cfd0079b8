"""FP16 TensorRT engines built from the ONNX through the TensorRT Python API, with their manifest.

The manifest beside ``model.plan`` records what the engine is bound to (TensorRT version, GPU and
compute capability, the ONNX it was built from) so the runtime can refuse a stale engine with a
clear "rebuild" message instead of failing later.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import onnx

from export.io_spec import BatchProfile, input_profile
from export.onnx_graph import float32_nodes
from runtime.config import ModelSpec
from runtime.files import atomic_write_bytes, atomic_write_text, sha256_file

log = logging.getLogger(__name__)
MANIFEST_SCHEMA = 1


def unavailable_reason() -> str | None:
    """Why no engine can be built here (None when TensorRT and a CUDA GPU are both present)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "TensorRT is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU is visible"
    return None


def build_engine(onnx_path: Path, plan_path: Path, spec: ModelSpec, profile: BatchProfile,
                 timing_cache: Path, optimization_level: int = 3) -> dict[str, Any]:
    """Build an FP16 engine (embedding and normalisation layers pinned to float32); returns the manifest."""
    import tensorrt as trt
    import torch

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP16)
    config.set_flag(trt.BuilderFlag.OBEY_PRECISION_CONSTRAINTS)
    config.builder_optimization_level = optimization_level
    keep = {n.name for n in float32_nodes(onnx.load(str(onnx_path), load_external_data=False))}
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.name in keep:
            layer.precision = trt.float32
            for j in range(layer.num_outputs):
                layer.set_output_type(j, trt.float32)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
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
    timing_cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(timing_cache, bytes(config.get_timing_cache().serialize()))
    major, minor = torch.cuda.get_device_capability()
    return manifest(spec, profile, onnx_path, trt.__version__, torch.cuda.get_device_name(), f"{major}.{minor}",
                    seconds, optimization_level)


def manifest(spec: ModelSpec, profile: BatchProfile, onnx_path: Path, trt_version: str, gpu: str,
             capability: str, build_seconds: float, optimization_level: int) -> dict[str, Any]:
    """The engine's manifest: everything the runtime must match before loading ``model.plan``."""
    return {
        "schema_version": MANIFEST_SCHEMA,
        "tensorrt_version": trt_version,
        "gpu": gpu,
        "compute_capability": capability,
        "precision": "fp16",
        "profile": {"min_batch": profile.min, "opt_batch": profile.opt, "max_batch": profile.max,
                    "static": profile.is_static, "shapes": input_profile(spec.model, profile)},
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "build_seconds": round(build_seconds, 2),
        "builder_optimization_level": optimization_level,
        "config": spec.to_dict(),
    }


def write_manifest(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def engine_runner(plan_path: Path) -> Callable[[dict[str, Any]], Any]:
    """Load ``model.plan`` once; the returned function runs it on host arrays (torch CUDA tensors as buffers)."""
    import tensorrt as trt
    import torch

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"TensorRT cannot load {plan_path.name}")
    context = engine.create_execution_context()
    stream = torch.cuda.Stream()

    def run(feeds: dict[str, Any]) -> Any:
        inputs = {name: torch.from_numpy(array).cuda() for name, array in feeds.items()}
        for name, tensor in inputs.items():
            context.set_input_shape(name, tuple(tensor.shape))
            context.set_tensor_address(name, tensor.data_ptr())
        out = torch.empty_like(inputs["noisy_images"])
        context.set_tensor_address("pred_noises", out.data_ptr())
        torch.cuda.current_stream().synchronize()  # the inputs' copies are done before the engine reads them
        if not context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        return out.cpu().numpy()

    return run
