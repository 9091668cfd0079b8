"""The choices every command line and the Python API share, declared once.

Each is a ``Literal`` type (for annotations and config validation) whose values :func:`values`
lists (for ``click.Choice`` and error messages). A command line that offers a backend, device,
precision, step spacing or solver takes it from here (backends: runtime.backends.registry), so adding one is a one-line change.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

Device = Literal["cpu", "cuda"]
# The exported files: model.onnx, model.fp16.onnx, model.int8.onnx (a TensorRT engine is fp16); bf16 is no file:
# model.onnx run in bfloat16 (OpenVINO on a CPU with BF16).
Precision = Literal["fp32", "fp16", "int8", "bf16"]
# What ddim-run may be asked for: a precision above, or ``auto`` (the fastest file that passed its gate here).
RunPrecision = Literal["auto", "fp32", "fp16", "int8", "bf16"]
# How the DDIM steps are spread over the schedule (runtime/schedule.py).
Spacing = Literal["uniform", "quadratic", "leading", "trailing", "linspace"]
# The solvers of the runtime loop: DDIM (runtime/schedule.py) and DPM-Solver++(2M) (runtime/dpm_solver.py).
Solver = Literal["ddim", "dpmpp-2m"]


def values(choice: Any) -> tuple[str, ...]:
    """The allowed strings of a ``Literal`` type, in declaration order."""
    return tuple(get_args(choice))
