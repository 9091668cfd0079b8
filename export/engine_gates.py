"""Gates per (engine, precision) beyond ONNX Runtime: OpenVINO int8, bf16 and fp32, measured at ``ddim-export --int8``
after the ONNX Runtime INT8 gate passed, recorded under ``engine_gates`` of ``export_report.json``.

- ``openvino/int8`` (``model.int8.onnx``) and ``openvino/bf16`` (``model.onnx`` with the bf16 hint, only where the
  CPU has BF16) go through the INT8 quality gate itself (:class:`export.int8.SameNoiseGate`: the same float32
  ONNX Runtime samples, same noise, same thresholds ``--int8-min-psnr`` / ``--int8-max-fd-ratio``); the record
  holds the figures ``int8.gate`` holds (``fd_int8`` is the candidate's FD-classifier).
- ``openvino/fp32`` (``model.onnx``, hint f32) is gated by parity with ONNX Runtime float32 on the parity gate's
  inputs (:func:`export.parity.gate_inputs`, batches 1, 3, 8) at the float32 tolerance.

Every measured record also carries ``parity``: max abs / relative error of its predicted noise against ONNX
Runtime float32 on those inputs. A gate that fails, or cannot run, never fails the export: it is recorded
(``passed: false`` with its figures, or ``status: error`` with why); without OpenVINO, or bf16 on a CPU without
BF16, the record is ``{"status": "skipped", "why": ..., "passed": false}``. Only ``passed: true`` is a gated pair.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from export.int8 import SameNoiseGate
from export.parity import FP32_TOLERANCE, compare
from runtime.common.files import sha256_file
from runtime.exportdir import FP32_ONNX, INT8_ONNX

log = logging.getLogger(__name__)

ENGINE = "openvino"
PRECISIONS = ("int8", "bf16", "fp32")
FILES = {"fp32": FP32_ONNX, "bf16": FP32_ONNX, "int8": INT8_ONNX}


def key(precision: str) -> str:
    return f"{ENGINE}/{precision}"


def skipped(why: str) -> dict[str, Any]:
    return {"status": "skipped", "why": why, "passed": False}


SWITCH = "DDIM_DEPLOY_ENGINE_GATES"  # "0": skip these gates (recorded as skipped; `auto` then never picks the pairs)


def openvino_missing() -> str | None:
    """Why OpenVINO cannot be gated here, or None."""
    if os.environ.get(SWITCH, "1") == "0":
        return f"{SWITCH}=0"
    try:
        import openvino  # noqa: F401
        from runtime.backends import openvino_backend  # noqa: F401
    except ImportError as exc:
        return f"OpenVINO is not installed ({exc})"
    return None


class _Reference(torch.nn.Module):
    """ONNX Runtime float32 (the runtime's own session on ``model.onnx``) behind the eager model's call, so the
    parity gate's :func:`export.parity.compare` measures an engine against it on the parity gate's inputs."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        from runtime.backends.ort_backend import OrtBackend

        self.backend = OrtBackend(folder, "cpu", "fp32")

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        feed = dict(zip(self.backend.inputs, (t.numpy() for t in inputs)))
        return torch.from_numpy(self.backend.session.run(["pred_noises"], feed)[0])


def _runner(backend: Any) -> Callable[[dict[str, np.ndarray]], np.ndarray]:
    """``feed -> pred_noises`` on an OpenVINO backend's own compiled model (per-image conditioning, which its
    ``denoise`` does not take)."""

    def run(feed: dict[str, np.ndarray]) -> np.ndarray:
        x, cond = (feed[name] for name in backend.inputs)
        return backend.run_feed(x, cond)

    return run


def measure(folder: Path, spec: Any, gate: SameNoiseGate) -> dict[str, dict[str, Any]]:
    """``engine_gates`` of the report for the export staged in ``folder`` (``model.onnx``, ``model.int8.onnx``);
    ``gate`` is the INT8 gate that passed, its float32 samples kept. Never raises for a gate that fails."""
    missing = openvino_missing()
    if missing is not None:
        log.info("OpenVINO gates skipped: %s", missing)
        return {key(p): skipped(missing) for p in PRECISIONS}
    import openvino as ov

    from runtime.backends.base import BackendError
    from runtime.backends.openvino_backend import OpenVinoBackend, check_bf16, ov_reason

    reference = _Reference(folder)
    shas = {name: sha256_file(folder / name) for name in set(FILES.values())}
    out: dict[str, dict[str, Any]] = {}
    for precision in PRECISIONS:
        name = key(precision)
        if precision == "bf16":
            try:
                check_bf16(ov.Core())
            except BackendError as exc:
                out[name] = skipped(str(exc))
                log.info("%s gate skipped: %s", name, exc)
                continue
        record: dict[str, Any] = {"status": "measured", "file": FILES[precision], "sha256": shas[FILES[precision]],
                                  "openvino": ov.get_version(), "reference": "onnxruntime/fp32"}
        try:
            backend = OpenVinoBackend(folder, "cpu", precision)
            tolerance = FP32_TOLERANCE if precision == "fp32" else float("inf")
            parity = compare(reference, _runner(backend), FILES[precision], spec, f"OpenVINO {precision}", tolerance)
            record["parity"] = {"max_abs": parity.max_abs, "max_rel": parity.max_rel, "worst_batch": parity.worst_batch}
            if precision == "fp32":
                record["parity"]["tolerance"] = FP32_TOLERANCE
                record["passed"] = parity.passed
                line = parity.line()
            else:
                result = gate.check(lambda: backend, f"OpenVINO {precision} quality gate", precision)
                record.update({**dataclasses.asdict(result), "passed": result.passed, "fd_ratio": result.fd_ratio})
                line = result.line().replace("INT8 quality gate", f"OpenVINO {precision} quality gate", 1)
        except Exception as exc:  # noqa: BLE001 - an engine that cannot run this file: recorded, never fatal
            why = ov_reason(exc) if not isinstance(exc, BackendError) else str(exc)
            record = {**record, "status": "error", "why": why, "passed": False}
            line = f"could not be measured: {why}"
        out[name] = record
        log.info("%s gate: %s", name, line)
    return out
