"""The config that travels with a model: architecture, schedule and data normalisation.

These frozen dataclasses are written as JSON next to checkpoint weights (``config.json``), into
ONNX ``metadata_props`` and beside TensorRT engines, always with ``schema_version``. Readers
refuse unknown schema versions and unknown keys with a :class:`ConfigError` that says what is
allowed. Sections owned by other packages (the trainer's ``data`` and ``train``) ride along
untouched in :attr:`ModelSpec.extra`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping, Union, get_args, get_origin, get_type_hints

from runtime.common.files import read_capped

# 2 added model.conditioning, the schedule "scaled-linear", schedule.clip_sample(_range) and the imported
# "diffusers" architecture; a version-1 config reads as noise-variance conditioning without clipping.
SCHEMA_VERSION = 2
SUPPORTED_SCHEMA_VERSIONS = (1, 2)

Architecture = Literal["keras", "ddpm", "diffusers"]
ScheduleName = Literal["cosine-angle", "linear", "cosine", "scaled-linear"]
# What the network is conditioned on: the variance of the noise (1 - alpha_bar, any schedule, any step) or the
# integer step t of a discrete schedule (the DDPM paper's and diffusers' UNet2DModel's convention).
Conditioning = Literal["noise_variance", "timestep"]
CONDITIONINGS: tuple[str, ...] = get_args(Conditioning)


# T of a discrete schedule: the field's schedules use 1000; schedules, plans and timestep tables are arrays of T.
MAX_TIMESTEPS = 100_000


class ConfigError(ValueError):
    """A config that is missing, malformed, or of an unknown schema."""


def check_choice(value: object, allowed: tuple[object, ...], what: str) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {what} {value!r}; allowed: {', '.join(map(str, allowed))}")


def _check_positive_int(value: object, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be an integer >= 1, got {value!r}")


def check_finite_fields(config: object) -> None:
    """Refuse a config dataclass whose float fields (or float tuples) hold NaN or an infinity: one line naming the
    field. Values built in Python (``dataclasses.replace``, CLI overrides) skip the JSON reader's check."""
    for f in dataclasses.fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        for v in value if isinstance(value, tuple) else (value,):
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{f.name} must be a finite number, got {v!r}")


@dataclass(frozen=True)
class KerasUNetConfig:
    """The Keras DDIM example's U-Net (residual blocks, no attention)."""

    image_size: int
    """Height and width of the (square) images in pixels."""
    channels: int
    """Image channels: 1 grey, 3 RGB."""
    architecture: Literal["keras"] = "keras"
    """Which U-Net: keras (residual blocks) or ddpm (GroupNorm, attention, dropout)."""
    conditioning: Conditioning = "noise_variance"
    """What the network is conditioned on: noise_variance (1 - alpha_bar; any schedule) or timestep (the integer
    step t of a discrete schedule, embedded as diffusers' UNet2DModel does)."""
    widths: tuple[int, ...] = (32, 64, 96, 128)
    """Channels of each resolution level, e.g. 32,64,96,128 (one 2x downsampling between levels)."""
    block_depth: int = 2
    """Residual blocks per level."""
    embedding_dims: int = 32
    """Size of the sinusoidal noise-variance embedding (even)."""
    embedding_min_frequency: float = 1.0
    """Lowest frequency of the sinusoidal embedding."""
    embedding_max_frequency: float = 1000.0
    """Highest frequency of the sinusoidal embedding."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_choice(self.architecture, ("keras",), "architecture")
        check_choice(self.conditioning, CONDITIONINGS, "conditioning")
        _check_positive_int(self.image_size, "image_size")
        _check_positive_int(self.channels, "channels")
        _check_positive_int(self.block_depth, "block_depth")
        if not self.widths:
            raise ConfigError("widths must list at least one block width")
        for w in self.widths:
            _check_positive_int(w, "every width")
        if self.embedding_dims < 2 or self.embedding_dims % 2:
            raise ConfigError(f"embedding_dims must be an even number >= 2, got {self.embedding_dims}")
        if not 0 < self.embedding_min_frequency < self.embedding_max_frequency:
            raise ConfigError("need 0 < embedding_min_frequency < embedding_max_frequency")
        _check_downsampling(self.image_size, len(self.widths), f"widths {list(self.widths)}")


def _check_downsampling(image_size: int, levels: int, what: str) -> None:
    factor = 2 ** (levels - 1)  # one 2x downsampling per level but the last
    if image_size % factor:
        raise ConfigError(
            f"image_size {image_size} does not fit {what}: {levels - 1} downsamplings need a multiple of {factor}"
        )


@dataclass(frozen=True)
class DDPMUNetConfig:
    """The DDPM-style U-Net (Ho et al. 2020; as in the DDIM paper's CIFAR-10 / CelebA models).

    GroupNorm, residual blocks with the noise-level embedding added through an MLP, dropout,
    self-attention at the listed resolutions; conditioned on the noise variance like every
    architecture here.
    """

    image_size: int
    """Height and width of the (square) images in pixels."""
    channels: int
    """Image channels: 1 grey, 3 RGB."""
    architecture: Literal["ddpm"] = "ddpm"
    """Which U-Net: keras (residual blocks) or ddpm (GroupNorm, attention, dropout)."""
    conditioning: Conditioning = "noise_variance"
    """What the network is conditioned on: noise_variance (1 - alpha_bar; any schedule) or timestep (the integer
    step t of a discrete schedule, embedded as diffusers' UNet2DModel does)."""
    base_width: int = 128
    """Channels of the first level; level i has base_width * channel_mults[i]."""
    channel_mults: tuple[int, ...] = (1, 2, 2, 2)
    """Width multiplier of each resolution level, e.g. 1,2,2,2."""
    num_res_blocks: int = 2
    """Residual blocks per level."""
    attention_resolutions: tuple[int, ...] = (16,)
    """Resolutions (in pixels) whose levels get self-attention, e.g. 16; none for no attention."""
    dropout: float = 0.1
    """Dropout rate inside the residual blocks."""
    num_groups: int = 32
    """GroupNorm groups (must divide every width)."""
    num_heads: int = 1
    """Self-attention heads (must divide every width)."""
    embedding_min_frequency: float = 1.0
    """Lowest frequency of the sinusoidal embedding."""
    embedding_max_frequency: float = 1000.0
    """Highest frequency of the sinusoidal embedding."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_choice(self.architecture, ("ddpm",), "architecture")
        check_choice(self.conditioning, CONDITIONINGS, "conditioning")
        for name in ("image_size", "channels", "base_width", "num_res_blocks", "num_groups", "num_heads"):
            _check_positive_int(getattr(self, name), name)
        if not self.channel_mults:
            raise ConfigError("channel_mults must list at least one multiplier")
        for m in self.channel_mults:
            _check_positive_int(m, "every channel multiplier")
        _check_downsampling(self.image_size, len(self.channel_mults), f"channel_mults {list(self.channel_mults)}")
        resolutions = [self.image_size // 2**i for i in range(len(self.channel_mults))]
        for r in self.attention_resolutions:
            if r not in resolutions:
                raise ConfigError(f"attention resolution {r} is not a level of this U-Net; allowed: "
                                  f"{', '.join(map(str, resolutions))}")
        for w in sorted({self.base_width * m for m in self.channel_mults}):
            if w % self.num_groups or w % self.num_heads:
                raise ConfigError(f"width {w} is not divisible by num_groups {self.num_groups} "
                                  f"and num_heads {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must lie in [0, 1), got {self.dropout}")
        if not 0 < self.embedding_min_frequency < self.embedding_max_frequency:
            raise ConfigError("need 0 < embedding_min_frequency < embedding_max_frequency")


@dataclass(frozen=True)
class DiffusersUNetConfig:
    """A diffusers ``UNet2DModel`` brought in by ``ddim-export`` (not trainable here).

    The runtime needs only the image shape and the conditioning; ``unet`` keeps the source's own
    config (its ``config.json``) for the record. Whatever the source predicts, the exported graph
    outputs the noise (``prediction_type`` says what was converted).
    """

    image_size: int
    """Height and width of the (square) images in pixels."""
    channels: int
    """Image channels: 1 grey, 3 RGB."""
    architecture: Literal["diffusers"] = "diffusers"
    """A diffusers UNet2DModel."""
    conditioning: Literal["timestep"] = "timestep"
    """UNet2DModel is conditioned on the integer timestep."""
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "epsilon"
    """What the source UNet predicts (the exported graph always outputs the noise)."""
    unet: Mapping[str, Any] = field(default_factory=dict)
    """The source UNet2DModel's config.json, verbatim."""

    def __post_init__(self) -> None:
        check_choice(self.architecture, ("diffusers",), "architecture")
        check_choice(self.conditioning, ("timestep",), "conditioning")
        check_choice(self.prediction_type, ("epsilon", "sample", "v_prediction"), "prediction_type")
        _check_positive_int(self.image_size, "image_size")
        _check_positive_int(self.channels, "channels")
        if not isinstance(self.unet, Mapping):
            raise ConfigError("model.unet must be an object (the diffusers UNet's config)")


ModelConfig = Union[KerasUNetConfig, DDPMUNetConfig, DiffusersUNetConfig]
# The architectures the trainer builds (``fit --architecture``) ...
MODEL_CONFIGS: dict[str, type] = {"keras": KerasUNetConfig, "ddpm": DDPMUNetConfig}
# ... and every architecture a config may name (imported ones are exported and run, never trained).
ALL_MODEL_CONFIGS: dict[str, type] = {**MODEL_CONFIGS, "diffusers": DiffusersUNetConfig}


@dataclass(frozen=True)
class ScheduleConfig:
    """A noise schedule by name (see ``runtime/schedule.py``) and its parameters."""

    name: ScheduleName = "cosine-angle"
    """Noise schedule: cosine-angle (continuous, the Keras example's), linear (DDPM's), cosine (improved DDPM) or
    scaled-linear (linear in sqrt(beta), diffusers' scaled_linear)."""
    num_timesteps: int = 1000
    """T of the discrete schedules (linear, cosine, scaled-linear)."""
    beta_start: float = 1e-4
    """First beta of the linear and scaled-linear schedules."""
    beta_end: float = 0.02
    """Last beta of the linear and scaled-linear schedules."""
    cosine_s: float = 0.008
    """Offset s of the cosine schedule (Nichol & Dhariwal)."""
    min_signal_rate: float = 0.02
    """Signal rate at the noisiest time of the cosine-angle schedule."""
    max_signal_rate: float = 0.95
    """Signal rate at the cleanest time of the cosine-angle schedule."""
    clip_sample: bool = False
    """Clip each step's predicted clean image when sampling, unless ddim-run says otherwise (--clip-x0 /
    --no-clip-x0)."""
    clip_sample_range: float | None = None
    """Bound of |predicted clean image| in model space when clipping; none: the data range of the normalisation."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_choice(self.name, get_args(ScheduleName), "schedule")
        _check_positive_int(self.num_timesteps, "num_timesteps")
        if self.num_timesteps > MAX_TIMESTEPS:  # schedules, plans and timestep tables are O(T)
            raise ConfigError(f"num_timesteps must be at most {MAX_TIMESTEPS:,}, got {self.num_timesteps:,}")
        if not 0 < self.beta_start < self.beta_end < 1:
            raise ConfigError("need 0 < beta_start < beta_end < 1")
        if not 0 < self.min_signal_rate < self.max_signal_rate <= 1:
            raise ConfigError("need 0 < min_signal_rate < max_signal_rate <= 1")
        if self.cosine_s <= 0:
            raise ConfigError("cosine_s must be > 0")
        if self.clip_sample_range is not None and not self.clip_sample_range > 0:
            raise ConfigError(f"clip_sample_range must be > 0 (or none), got {self.clip_sample_range}")

    @property
    def discrete(self) -> bool:
        return self.name != "cosine-angle"


@dataclass(frozen=True)
class NormalizationConfig:
    """Per-channel ``x_model = (x - mean) / std`` for images x in [0, 1]."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        check_finite_fields(self)
        if not self.mean or len(self.mean) != len(self.std):
            raise ConfigError("normalization mean and std must list one value per channel")
        if any(s <= 0 for s in self.std):
            raise ConfigError("normalization std must be > 0")

    def x0_bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel model-space bounds of images in [0, 1] (for clipping pred_x0)."""
        lo = tuple(-m / s for m, s in zip(self.mean, self.std))
        hi = tuple((1 - m) / s for m, s in zip(self.mean, self.std))
        return lo, hi


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to run a model: what the runtime reads from any carrier of the config."""

    model: ModelConfig
    schedule: ScheduleConfig
    normalization: NormalizationConfig
    extra: Mapping[str, Any] = field(default_factory=dict)  # other packages' sections, verbatim

    def __post_init__(self) -> None:
        if len(self.normalization.mean) != self.model.channels:
            raise ConfigError(
                f"normalization has {len(self.normalization.mean)} channels, model has {self.model.channels}"
            )
        if self.model.conditioning == "timestep" and not self.schedule.discrete:
            raise ConfigError(f"conditioning 'timestep' needs a discrete schedule (linear, cosine, scaled-linear): "
                              f"{self.schedule.name!r} has no integer timesteps")

    def clip_bounds(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel model-space bounds that clipping holds pred_x0 to (``schedule.clip_sample_range`` when
        set, else the data range of the normalisation)."""
        r = self.schedule.clip_sample_range
        if r is None:
            return self.normalization.x0_bounds()
        return (-r,) * self.model.channels, (r,) * self.model.channels

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        out["model"] = dataclasses.asdict(self.model)
        out["schedule"] = dataclasses.asdict(self.schedule)
        out["normalization"] = dataclasses.asdict(self.normalization)
        out.update(self.extra)
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ModelSpec":
        if not isinstance(data, Mapping):
            raise ConfigError("config must be a JSON object")
        version = data.get("schema_version")
        if version is None:
            raise ConfigError("config has no schema_version: not a ddim-deploy config")
        if version not in SUPPORTED_SCHEMA_VERSIONS:
            raise ConfigError(
                f"config schema_version {version!r} is not supported "
                f"(this version reads {', '.join(map(str, SUPPORTED_SCHEMA_VERSIONS))})"
            )
        for key in ("model", "schedule", "normalization"):
            if not isinstance(data.get(key), Mapping):
                raise ConfigError(f"config has no {key!r} section")
        arch = data["model"].get("architecture", "keras")
        check_choice(arch, get_args(Architecture), "architecture")
        if version == 1:
            _check_v1(data)
        extra = {k: v for k, v in data.items() if k not in ("schema_version", "model", "schedule", "normalization")}
        return cls(
            model=dataclass_from_dict(ALL_MODEL_CONFIGS[arch], data["model"], "model"),
            schedule=dataclass_from_dict(ScheduleConfig, data["schedule"], "schedule"),
            normalization=dataclass_from_dict(NormalizationConfig, data["normalization"], "normalization"),
            extra=extra,
        )

    @classmethod
    def from_json(cls, text: str, source: str = "config") -> "ModelSpec":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{source} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: str | Path) -> "ModelSpec":
        p = Path(path)
        try:
            text = read_capped(p, what="config").decode("utf-8")
        except FileNotFoundError:
            raise ConfigError(f"no config at {p}") from None
        except ValueError as exc:  # not a regular file, too large, or not UTF-8
            raise ConfigError(f"cannot read config {p}: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read config {p}: {exc.strerror or exc}") from None
        return cls.from_json(text, source=str(p))


def _check_v1(data: Mapping[str, Any]) -> None:
    """A version-1 config has none of version 2's additions (a file that claims 1 but has them was edited)."""
    added = [("model", "conditioning"), ("schedule", "clip_sample"), ("schedule", "clip_sample_range")]
    found = [f"{sec}.{key}" for sec, key in added if key in data[sec]]
    if data["model"].get("architecture") == "diffusers" or data["schedule"].get("name") == "scaled-linear":
        found.append("a schema-2 architecture or schedule")
    if found:
        raise ConfigError(f"config schema_version 1 has no {', '.join(found)}: set schema_version 2")


def dataclass_from_dict(cls: type, data: Mapping[str, Any], where: str) -> Any:
    """Build a (frozen) dataclass from JSON data: unknown keys refused, lists become tuples."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"config section {where!r} must be an object")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(unknown)} in {where!r}; allowed: {', '.join(sorted(names))}")
    hints = get_type_hints(cls)
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required field is missing
        raise ConfigError(f"config section {where!r}: {exc}") from None


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """JSON value to the field's type: tuples from lists, ints accepted for floats."""
    origin = get_origin(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list")
        (item,) = {a for a in get_args(hint) if a is not Ellipsis}
        return tuple(_coerce(v, item, where) for v in value)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in get_args(hint):
            return None
        inner = [a for a in get_args(hint) if a is not type(None)]
        return _coerce(value, inner[0], where) if len(inner) == 1 else value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        if not math.isfinite(value):  # NaN / Infinity literals, or 1e999 read as inf
            raise ConfigError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if hint is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{where} must be an integer, got {value!r}")
    if hint is bool and not isinstance(value, bool):
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise ConfigError(f"{where} must be a string, got {value!r}")
    return value
