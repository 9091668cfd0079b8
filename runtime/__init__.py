"""ddim-deploy's lean runtime: schedules, the DDIM loop and model configs (numpy, never torch)."""

from runtime.config import (
    SCHEMA_VERSION,
    ConfigError,
    KerasUNetConfig,
    ModelSpec,
    NormalizationConfig,
    ScheduleConfig,
)
from runtime.sampler import NonFiniteError, SamplerHooks, SamplingPlan, ddim_sample
from runtime.schedule import build_schedule, ddim_step, select_steps

__version__ = "0.1.0"

__all__ = [
    "SCHEMA_VERSION",
    "ConfigError",
    "KerasUNetConfig",
    "ModelSpec",
    "NonFiniteError",
    "NormalizationConfig",
    "SamplerHooks",
    "SamplingPlan",
    "ScheduleConfig",
    "__version__",
    "build_schedule",
    "ddim_sample",
    "ddim_step",
    "select_steps",
]
