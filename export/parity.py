"""The parity gate: an exported file against the eager PyTorch model on the same inputs.

Inputs are realistic: clean images drawn N(0, I), noised to steps spread over the whole
schedule (one step per image, so per-sample conditioning is exercised), at several batch
sizes. The error is measured relative to the output's scale, ``max|onnx - eager| / max(max|eager|, 1)``
per call: it stays meaningful where single elements of the predicted noise are near zero, and the
floor of 1 (the scale of the unit-variance noise the network predicts) keeps an untrained model,
whose zero-initialised head outputs ~1e-3, from turning rounding noise into a large ratio.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from export.io_spec import feed, input_names_of
from runtime.config import ModelSpec
from runtime.schedule import build_schedule, noise_variance, select_steps

log = logging.getLogger(__name__)

# float32: conv / normalisation fusions only reorder float32 sums (measured errors ~1e-6 of the
# output's scale); 1e-4 keeps a 100x margin while any wrong node shows up at 1e-2 or more.
FP32_TOLERANCE = 1e-4
# fp16: 10-bit mantissas through 20-60 layers. Measured on ONNX Runtime CPU: 2.1e-4 (fashion-mnist
# after 200 steps), 2.2e-3 (cifar10-64 with random weights); PyTorch's own half model is at 2.5e-3 on
# the latter. 2e-2 leaves room for GPU kernels that round differently; an fp16 bug shows at 5e-2+
# (the angles rounded to fp16 gave 5.4e-2).
FP16_TOLERANCE = 2e-2
BATCHES = (1, 3, 8)


@dataclass(frozen=True)
class ParityResult:
    """Worst agreement of one file on one provider."""

    file: str
    provider: str
    max_abs: float
    max_rel: float
    tolerance: float
    worst_batch: int

    @property
    def passed(self) -> bool:
        return bool(np.isfinite(self.max_rel)) and self.max_rel <= self.tolerance

    def line(self) -> str:
        state = "ok" if self.passed else "FAILED"
        return (f"{self.file} [{self.provider}]: max abs error {self.max_abs:.3g}, max relative error "
                f"{self.max_rel:.3g} (tolerance {self.tolerance:g}) {state}")


def gate_inputs(spec: ModelSpec, batches: tuple[int, ...] = BATCHES, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Feeds covering the schedule's whole noise range, one step (variance or timestep) per image."""
    schedule = build_schedule(spec.schedule)
    steps = select_steps(schedule, 16, "uniform")
    rng = np.random.default_rng(seed)
    c, s = spec.model.channels, spec.model.image_size
    feeds = []
    for i, n in enumerate(batches):
        t = np.resize(np.roll(steps, i), n)  # ends of the range included across calls
        v = noise_variance(schedule, t)
        x0, eps = rng.standard_normal((2, n, c, s, s), dtype=np.float32)
        vv = v.reshape(n, 1, 1, 1)
        feeds.append(feed(spec.model, np.sqrt(1 - vv) * x0 + np.sqrt(vv) * eps, v, t))
    return feeds


def check_file(model: torch.nn.Module, onnx_bytes: bytes, name: str, spec: ModelSpec, provider: str,
               tolerance: float) -> ParityResult:
    """Run ``onnx_bytes`` on ONNX Runtime ``provider`` and the eager model on the same feeds.

    CUDA sessions run with TF32 off (ONNX Runtime turns it on by default on Ampere and newer; the
    float32 tolerance is for float32 arithmetic). Raises BackendError when the CUDA provider did not
    really start (ONNX Runtime falls back to the CPU silently), so CPU results are never labelled CUDA.
    """
    import onnxruntime as ort

    from runtime.backends.ort_backend import CUDA, check_provider, preload_cuda_libraries, providers_for

    device = "cuda" if provider == CUDA else "cpu"
    if device == "cuda":
        preload_cuda_libraries()
    session = ort.InferenceSession(onnx_bytes, providers=providers_for(device, "fp32"))
    check_provider(session, provider, name)
    return compare(model, lambda feed: session.run(["pred_noises"], feed)[0], name, spec, provider, tolerance)


def compare(model: torch.nn.Module, run: Callable[[dict[str, np.ndarray]], np.ndarray], name: str, spec: ModelSpec,
            provider: str, tolerance: float, batches: tuple[int, ...] = BATCHES) -> ParityResult:
    """``run(feed) -> pred_noises`` against the eager model over the gate's feeds."""
    model.eval()
    worst_abs, worst_rel, worst_batch = 0.0, 0.0, 0
    names = input_names_of(spec.model)
    for inputs in gate_inputs(spec, batches):
        got = run(inputs)
        with torch.no_grad():
            ref = model(*(torch.from_numpy(inputs[k]) for k in names)).numpy()
        abs_err = float(np.abs(got.astype(np.float64) - ref).max())
        rel_err = abs_err / max(float(np.abs(ref).max()), 1.0)
        if not np.isfinite(rel_err) or rel_err > worst_rel:
            worst_rel, worst_batch = rel_err, len(ref)
        worst_abs = max(worst_abs, abs_err)
    return ParityResult(name, provider, worst_abs, worst_rel, tolerance, worst_batch)


def gate_providers() -> tuple[list[str], str | None]:
    """ONNX Runtime providers to check files on (CUDA when installed, always CPU), and what is missing."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    note = None if "CUDAExecutionProvider" in available else "ONNX Runtime CUDA not installed"
    return providers, note
