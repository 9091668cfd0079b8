"""ddim-deploy's lean runtime: schedules, the DDIM loop and model configs (numpy, never torch).

    import runtime
    sampler = runtime.load("exports/fashion-mnist")     # backend picked as ddim-run does
    result = sampler.sample(16, steps=50, seed=0)         # result.images: (16, H, W, C) uint8
"""

# The toolkit's version: written here only (pyproject.toml reads it; every CLI prints it with --version).
__version__ = "0.1.0"

from runtime.config import (  # noqa: E402 (the version first: modules below may read it)
    SCHEMA_VERSION,
    ConfigError,
    KerasUNetConfig,
    ModelSpec,
    NormalizationConfig,
    ScheduleConfig,
)
from runtime.api import SampleResult, Sampler, load  # noqa: E402
from runtime.sampler import NonFiniteError, SamplerHooks, SamplingPlan, ddim_sample  # noqa: E402
from runtime.schedule import build_schedule, ddim_step, select_steps  # noqa: E402
from runtime.settings import SamplingSettings, SettingsError  # noqa: E402

__all__ = [
    "SCHEMA_VERSION",
    "ConfigError",
    "KerasUNetConfig",
    "ModelSpec",
    "NonFiniteError",
    "NormalizationConfig",
    "SampleResult",
    "Sampler",
    "SamplerHooks",
    "SamplingPlan",
    "SamplingSettings",
    "ScheduleConfig",
    "SettingsError",
    "__version__",
    "build_schedule",
    "ddim_sample",
    "ddim_step",
    "load",
    "select_steps",
]
