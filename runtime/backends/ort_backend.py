"""ONNX Runtime backend: CPU (and CUDA with onnxruntime-gpu), sessions tuned and built in memory.

Sessions optimise their graph at every start and write nothing to disk: an on-disk cache of optimised graphs
was measured to save nothing on ``ddim-run``'s cold start (docs/sampling.md) and was removed.

On CUDA, float32 means float32: ONNX Runtime's CUDA provider runs convolutions and matmuls in TF32
by default on Ampere and newer GPUs (10-bit mantissas), so fp32 sessions set ``use_tf32=0``; the
fp16 file is the fast path. A CUDA session that silently fell back to the CPU (cuDNN or the CUDA
runtime missing) is refused, never labelled "CUDA".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray

from runtime.exportdir import ONNX_FILES
from runtime.backends.base import OUTPUT_NAMES, BackendError, Cond, OnHost, cond_values, input_names
from runtime.backends.cuda_arrays import CupyArrays, OnDevice
from runtime.config import ConfigError, ModelSpec
from runtime.common.extras import install_hint
from runtime.common.hostinfo import check_threads
from runtime.common.limits import FILE_OVERHEAD, SizeLimits, check_file_size, most_parameters
from runtime.metadata import METADATA_KEY, read_onnx_metadata, spec_from_metadata

log = logging.getLogger(__name__)
MODEL_FILES = ONNX_FILES  # by precision (runtime.exportdir)
# A graph with symbolic image sizes cannot confirm what its metadata claims: cap what that may allocate
# (the largest preset samples 64x64; runtime.common.limits uses the same default for configs).
MAX_SYMBOLIC_IMAGE_SIZE = 1024


CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def cuda_available() -> bool:
    return CUDA in ort.get_available_providers()


def providers_for(device: str, precision: str = "fp32") -> list[Any]:
    """ONNX Runtime's providers list for ``device``; float32 on CUDA without TF32 (see the module docstring)."""
    if device != "cuda":
        return [CPU]
    return [(CUDA, {"use_tf32": "0"}) if precision == "fp32" else CUDA, CPU]


def install_problem() -> str | None:
    """Why this ONNX Runtime may lack its CUDA provider: onnxruntime and onnxruntime-gpu both installed.

    The two distributions own the same ``onnxruntime`` package folder; whichever was installed last
    wins, file by file, and the CUDA provider can vanish. Users need exactly one of them.
    """
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("onnxruntime", "onnxruntime-gpu"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            pass
    if len(found) < 2:
        return None
    return (f"both {' and '.join(found)} are installed and overwrite each other; keep one: "
            "pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu")


def preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu find the CUDA/cuDNN libraries of the nvidia-* wheels (ORT >= 1.21)."""
    preload = getattr(ort, "preload_dlls", None)
    if preload is not None:
        try:
            preload()
        except Exception as exc:  # noqa: BLE001 - a failed preload shows as the provider check below
            log.debug("onnxruntime.preload_dlls: %s", exc)


def check_provider(session: ort.InferenceSession, wanted: str, what: str) -> None:
    """Refuse a session whose first provider is not ``wanted`` (ORT falls back to the CPU silently)."""
    active = session.get_providers()
    if wanted == CUDA and (not active or active[0] != CUDA):
        raise BackendError(f"{what}: ONNX Runtime's CUDA provider did not start (active: {', '.join(active)}); "
                           "the CUDA runtime or cuDNN libraries it needs are missing - see ONNX Runtime's CUDA "
                           f"requirements, or {install_hint('gpu', 'onnxruntime-gpu')}")


def model_file(path: Path, precision: str) -> Path:
    """The ONNX file to run: ``path`` itself, or the export directory's file of ``precision``."""
    if path.is_dir():
        path = path / MODEL_FILES[precision]
    if not path.is_file():
        flag = {"fp16": " --fp16", "int8": " --int8"}.get(precision, "")
        raise BackendError(f"no model at {path} (export one with ddim-export{flag})")
    return path


def session_options(model_dir: Path | None = None, threads: int | None = None) -> ort.SessionOptions:
    """Full graph optimisation, ``threads`` threads (default: one per physical core), spinning between the
    loop's back-to-back runs.

    Sessions are made from the model's bytes, so ONNX Runtime would resolve external-data paths
    against the working directory: ``model_dir`` makes them resolve in the model's own folder,
    and ONNX Runtime refuses paths that leave it (absolute or ``..``).
    """
    so = ort.SessionOptions()
    if model_dir is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_dir))
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = check_threads(threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.log_severity_level = 3  # errors only: what goes wrong reaches the user as a BackendError
    return so


def make_session(model_path: Path, providers: list[Any], threads: int | None = None) -> ort.InferenceSession:
    """A session on ``model_path``'s bytes, its graph optimised in memory (nothing is written to disk); the file
    checked first (:func:`check_model_file`)."""
    check_model_file(model_path)
    options = session_options(model_path.resolve().parent, threads)
    return ort.InferenceSession(model_path.read_bytes(), options, providers=providers)


def check_model_file(model_path: Path) -> ModelSpec | None:
    """Before a byte of the graph is read: the config in the file's metadata (refused in one line when invalid)
    and the file's size against what a model of that config can hold (float32 weights of at most
    :func:`runtime.common.limits.most_parameters`, plus the graph), or against 10^9 float32 parameters (the
    ``--max-parameters`` default) where the file has no config. BackendError otherwise."""
    limits = SizeLimits()
    try:
        props = read_onnx_metadata(model_path)
        spec = spec_from_metadata(props, str(model_path)) if METADATA_KEY in props else None
        params = most_parameters(spec.model, limits) if spec is not None else limits.parameters
        why = (f"a {spec.model.architecture} U-Net of its config can hold ({params:,} float32 parameters at most)"
               if spec is not None else f"of {params:,} float32 parameters (the --max-parameters default)")
        check_file_size(model_path, 4 * params + FILE_OVERHEAD, "model", why)
    except OSError as exc:
        raise BackendError(f"cannot read {model_path}: {exc.strerror or exc}") from None
    except ConfigError as exc:  # an invalid config, or a file larger than it allows
        raise BackendError(str(exc)) from None
    return spec


def graph_dims(args: list[Any], name: str) -> list[int | str | None]:
    """The dims of input/output ``name`` (ints; strings or None where symbolic)."""
    shape = next((a.shape for a in args if a.name == name), None) or []
    return [d if isinstance(d, (int, str)) or d is None else str(d) for d in shape]


def check_image_dims(dims: list[Any], spec: ModelSpec, tensor: str, source: str, what: str = "graph",
                     told: str = "metadata") -> None:
    """Refuse a graph whose ``tensor`` is not [N, C, H, W] of the spec's images, before any allocation.

    ``told`` (metadata, manifest) sizes what the sampler allocates: a hostile file claiming 65536x65536
    images would cost gigabytes before the engine looked at a shape. Symbolic sizes (strings, None or
    -1) are taken only for images up to :data:`MAX_SYMBOLIC_IMAGE_SIZE`.
    """
    m = spec.model
    want = [m.channels, m.image_size, m.image_size]
    said = f"{told} says {'x'.join(map(str, want))} images"
    if len(dims) != 4:
        raise BackendError(f"{source}: {tensor} has {len(dims)} dims in the {what}, not N, C, H, W ({said})")
    got = ["?" if not isinstance(d, int) or d < 0 else d for d in dims[1:]]
    if any(g != "?" and g != w for g, w in zip(got, want)):
        raise BackendError(f"{source}: {said}, the {what} takes {'x'.join(map(str, got))} ({tensor}); "
                           f"not a model ddim-export wrote, or its {told} was changed")
    if "?" in got and m.image_size > MAX_SYMBOLIC_IMAGE_SIZE:
        raise BackendError(f"{source}: {said}, and the {what}'s {tensor} does not fix its sizes "
                           f"({'x'.join(map(str, got))}); refusing images over {MAX_SYMBOLIC_IMAGE_SIZE} "
                           "pixels a side without a graph that confirms them")


class OrtBackend(OnHost):
    """Runs an exported ONNX model; the DDIM loop keeps numpy arrays on the host."""

    name = "onnxruntime"

    def __init__(self, path: Path, device: str = "cpu", precision: str = "fp32", threads: int | None = None) -> None:
        if device == "cuda" and not cuda_available():
            raise BackendError("--device cuda: this onnxruntime has no CUDA provider ("
                               + (install_problem() or install_hint("gpu", "onnxruntime-gpu")) + ")")
        self.model_path = model_file(path, precision)
        self.device, self.precision = device, precision
        self.threads = check_threads(threads)  # resolved once: the session and the backend line agree
        if device == "cuda":
            preload_cuda_libraries()
        try:
            self.session = make_session(self.model_path, providers_for(device, precision), self.threads)
        except BackendError:
            raise
        except Exception as exc:  # ORT raises its own exception types for corrupt or invalid files
            raise BackendError(f"cannot load {self.model_path}: {str(exc).strip().splitlines()[0]}") from None
        check_provider(self.session, CUDA if device == "cuda" else CPU, str(self.model_path))
        self.provider = self.session.get_providers()[0]
        try:
            self.spec = spec_from_metadata(self.session.get_modelmeta().custom_metadata_map, str(self.model_path))
        except ConfigError as exc:
            raise BackendError(str(exc)) from None
        self.conditioning = self.spec.model.conditioning
        self.inputs = input_names(self.conditioning)
        names = ([i.name for i in self.session.get_inputs()], [o.name for o in self.session.get_outputs()])
        if names != (list(self.inputs), list(OUTPUT_NAMES)):
            raise BackendError(f"{self.model_path} has inputs/outputs {names}, not those of a denoiser conditioned "
                               f"on {self.conditioning} ({list(self.inputs)}, {list(OUTPUT_NAMES)})")
        # Before anything is allocated: the sampler sizes its buffers from the metadata.
        io = ((self.session.get_inputs(), self.inputs[0]), (self.session.get_outputs(), OUTPUT_NAMES[0]))
        for args, name in io:
            check_image_dims(graph_dims(args, name), self.spec, name, str(self.model_path))

    per_image_cond = True

    def denoise(self, x: NDArray[np.float32], cond: Cond) -> NDArray[np.float32]:
        v = cond_values(self.conditioning, x.shape[0], cond)
        return self.session.run(list(OUTPUT_NAMES), dict(zip(self.inputs, (x, v))))[0]


class OrtCudaBackend(OnDevice, OrtBackend):
    """ONNX Runtime CUDA with I/O binding on CuPy device buffers: no host round trip between steps."""

    def __init__(self, path: Path, device: str = "cuda", precision: str = "fp32", threads: int | None = None) -> None:
        OrtBackend.__init__(self, path, "cuda", precision, threads)
        try:
            self.arrays = CupyArrays()
        except BackendError:
            raise
        except Exception as exc:  # a CuPy that cannot reach the GPU: a reason, not a traceback
            raise BackendError(f"CuPy could not start on the GPU: {type(exc).__name__}: {exc}") from exc
        self.binding = self.session.io_binding()

    def denoise(self, x: Any, cond: Cond) -> Any:
        v = self.arrays.cond(self.conditioning, x.shape[0], cond)
        out = self.arrays.empty_like(x)
        b = self.binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name, arr in zip(self.inputs, (x, v)):
            b.bind_input(name, "cuda", 0, np.float32, tuple(arr.shape), arr.data.ptr)
        b.bind_output("pred_noises", "cuda", 0, np.float32, tuple(out.shape), out.data.ptr)
        self.arrays.stream.synchronize()  # ORT runs on its own stream: inputs must be complete
        self.session.run_with_iobinding(b)  # returns once the outputs are written
        return out
