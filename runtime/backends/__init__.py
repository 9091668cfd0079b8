"""Backends: given noisy images and the step's conditioning (noise variance or timestep), return the predicted noise.

Every backend works on its own arrays (numpy on the host, torch tensors for the eager
reference) and supplies the few array operations the shared DDIM loop needs, so buffers stay
where the backend keeps them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray

from runtime.choices import BackendName, Device, Precision, RunPrecision
from runtime.config import Conditioning, ModelSpec
from runtime.extras import install_hint

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


class BackendError(ValueError):
    """A backend that cannot run the given model here, with the reason."""


class Backend(Protocol):
    """What the sampler needs from an inference engine."""

    name: str
    device: str
    precision: str
    spec: ModelSpec

    def denoise(self, x: Any, cond: float) -> Any: ...  # (N, C, H, W), the step's cond -> predicted noise
    def from_host(self, x: NDArray[np.float32]) -> Any: ...
    def to_host(self, x: Any) -> NDArray[np.float32]: ...
    def is_finite(self, x: Any) -> bool: ...
    def clip_bounds(self, lo: tuple[float, ...], hi: tuple[float, ...]) -> tuple[Any, Any]: ...


def open_backend(path: Path, backend: BackendName = "auto", device: Device | None = None,
                 precision: RunPrecision | None = None, threads: int | None = None) -> tuple[Backend, str]:
    """The backend to sample ``path`` with, and one line saying which and why.

    ``auto`` picks TensorRT (an engine whose manifest matches this machine, when no precision or
    the engine's was asked), then ONNX Runtime CUDA, then ONNX Runtime CPU; a trainer run directory
    (weights, no ONNX) means the eager torch backend. A backend that cannot start here is skipped
    with its reason. ``precision`` None and ``auto`` are the same: the engine's where TensorRT is
    picked; on ONNX Runtime CPU, ``model.int8.onnx`` where an export folder holds one that passed its
    quality gate and is faster on this CPU with ``threads`` threads
    (:func:`runtime.backends.precision.choose`); else fp32. ``threads``: CPU threads of ONNX Runtime
    and torch (default: one per physical core).
    """
    if not path.exists():
        raise BackendError(f"{path} does not exist")
    if precision == "auto":
        precision = None
    run_dir = (path / "model.safetensors").is_file() and not (path / "model.onnx").is_file()
    if backend == "torch" or (backend == "auto" and run_dir):
        why = "asked for" if backend == "torch" else "a trainer run directory"
        b = plugin("torch")(path, device or "cpu", precision or "fp32", threads)
        return b, f"torch, {b.provider} ({why}: the eager reference)"
    skipped = []
    if backend == "tensorrt" or (backend == "auto" and device != "cpu" and (path / "model.plan").is_file()):
        if backend == "auto" and precision not in (None, "fp16"):
            skipped.append(f"TensorRT skipped: the engine is fp16 and --precision {precision} was asked")
        else:
            try:
                from runtime.backends.tensorrt_backend import TensorRTBackend

                b = TensorRTBackend(path, device or "cuda", precision)
                why = "asked for" if backend == "tensorrt" else "engine matches this machine"
                return b, f"tensorrt, {b.provider} ({why})"
            except BackendError as exc:
                if backend == "tensorrt":
                    raise
                skipped.append(f"TensorRT skipped: {exc}")
    try:
        from runtime.backends.ort_backend import OrtBackend, OrtCudaBackend, cuda_available, install_problem
    except ImportError as exc:
        raise BackendError(f"ONNX Runtime is not installed ({exc}): {install_hint('cpu')}; on a CUDA machine "
                           f"instead {install_hint('gpu', 'onnxruntime-gpu')} (one of them, not both)") from None

    if backend == "auto" and not (path / "model.plan").is_file():
        skipped.insert(0, "no TensorRT engine")
    if device == "cuda" or (device is None and cuda_available()):
        try:
            b = OrtCudaBackend(path, "cuda", precision or "fp32", threads)
            return b, _ort_line(b, backend, skipped)
        except BackendError as exc:
            if device == "cuda":
                raise
            skipped.append(f"ONNX Runtime CUDA skipped: {exc}")
    if backend == "auto" and device is None and not cuda_available():
        problem = install_problem()
        skipped.append("ONNX Runtime has no CUDA provider" + (f" ({problem})" if problem else ""))
    elif backend == "auto" and device == "cpu":
        skipped.append("--device cpu")
    chosen: Precision = precision or "fp32"
    if precision is None and path.is_dir():
        from runtime.backends.precision import choose

        chosen, why = choose(path, threads)
        if why:
            skipped.append(f"precision auto: {chosen}, {why}")
    b = OrtBackend(path, "cpu", chosen, threads)
    return b, _ort_line(b, backend, skipped)


def _ort_line(b: Any, backend: str, skipped: list[str]) -> str:
    why = ["asked for"] if backend == "onnxruntime" else []
    from runtime.hostinfo import threads_label

    threads = f", {threads_label(b.threads)}" if b.device == "cpu" else ""
    return f"onnxruntime {b.provider} {b.model_path.name}{threads} ({'; '.join(why + skipped)})"


def plugin(name: str) -> Any:
    """A backend class registered under the ``ddim_deploy.backends`` entry-point group.

    The eager PyTorch backend lives with the trainer (it rebuilds models from run directories);
    looking it up by name keeps the runtime free of torch and of the trainer until it is chosen.
    """
    from importlib.metadata import entry_points

    found = [ep for ep in entry_points(group="ddim_deploy.backends") if ep.name == name]
    if not found:
        raise BackendError(f"the {name} backend is not installed ({install_hint('train')})")
    try:
        return found[0].load()
    except ImportError as exc:
        raise BackendError(f"the {name} backend cannot be imported: {exc}") from None
