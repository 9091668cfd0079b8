"""The trainer's sections of a run's config: data and training hyper-parameters.

A run's ``config.json`` is a :class:`runtime.config.ModelSpec` (model, schedule, normalisation,
schema version) whose ``extra`` holds the preset name and these two sections, so a checkpoint
directory rebuilds its own model and training setup (like nanoGPT's ``model_args``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal, Mapping, get_args

from runtime import __version__
from runtime.schedule import MAX_CONTINUOUS_STEPS
from runtime.config import (
    MODEL_CONFIGS, ConfigError, ModelConfig, ModelSpec, NormalizationConfig, ScheduleConfig, check_choice,
    check_finite_fields, dataclass_from_dict,
)

DataSource = Literal["fashion-mnist", "cifar10", "oxford-flowers", "folder"]
Split = Literal["train", "val", "all"]
Normalization = Literal["dataset-stats", "minus-one-one"]
LossName = Literal["mae", "mse"]
Precision = Literal["fp32", "bf16", "fp16"]  # fp16: CUDA only, with a gradient scaler
# Images of one sample grid: a 32 x 32 grid is already more than a glance at progress shows, and every image is
# sampled (and held) at each --sample-every.
MAX_SAMPLES = 1024


def _at_least(value: float | int | None, low: float, what: str) -> None:
    if value is not None and (isinstance(value, bool) or value < low):
        raise ConfigError(f"{what} must be >= {low:g}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they become model inputs."""

    source: DataSource = "fashion-mnist"
    """Dataset: fashion-mnist, cifar10, oxford-flowers, or a folder of images (--data)."""
    split: Split = "train"
    """Images to train on: fashion-mnist and cifar10 use their official train/test; folders a seeded split."""
    val_fraction: float = 0.2
    """Share of a folder's images held out as val (split train / val)."""
    split_seed: int = 0
    """Seed of a folder's train/val split."""
    random_flip: bool = False
    """Random horizontal flips."""
    normalization: Normalization = "dataset-stats"
    """dataset-stats: per-channel mean/std of the training images; minus-one-one: pixels to [-1, 1]."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_choice(self.source, get_args(DataSource), "data source")
        check_choice(self.split, get_args(Split), "split")
        check_choice(self.normalization, get_args(Normalization), "normalization")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, EMA, loss, duration and bookkeeping of one training run."""

    batch_size: int = 64
    """Images per optimiser step (split across processes under torchrun)."""
    lr: float = 1e-3
    """Peak learning rate of AdamW."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights (the exported ones)."""
    ema_warmup: bool = True
    """Ramp the EMA decay up: min(ema_decay, (1 + n) / (10 + n)) after n steps."""
    loss: LossName = "mae"
    """Loss on the predicted noise: mae (the Keras example's) or mse (DDPM's)."""
    steps: int | None = None
    """Total optimiser steps (or give --epochs)."""
    epochs: int | None = None
    """Total epochs, each of dataset_repetitions passes (or give --steps)."""
    dataset_repetitions: int = 1
    """Passes over the dataset per epoch (the Keras example repeats it 5 times)."""
    warmup_steps: int = 0
    """Steps of linear learning-rate warm-up."""
    grad_clip: float | None = None
    """Largest gradient norm; none for no clipping."""
    precision: Precision = "fp32"
    """Training precision: fp32, bf16 autocast, or fp16 autocast with a gradient scaler (CUDA only)."""
    seed: int = 0
    """Seed of weights, batches and noise."""
    sample_every: int = 500
    """Steps between sample grids (samples.png)."""
    sample_steps: int = 20
    """DDIM steps of those grids."""
    num_samples: int = 64
    """Images per sample grid."""
    checkpoint_every: int = 500
    """Steps between checkpoints."""
    keep_checkpoints: int = 3
    """How many checkpoints to keep (older ones are pruned)."""
    log_every: int = 10
    """Steps per loss.csv row."""

    def __post_init__(self) -> None:
        check_finite_fields(self)
        check_choice(self.loss, get_args(LossName), "loss")
        check_choice(self.precision, get_args(Precision), "precision")
        if self.steps is None and self.epochs is None:
            raise ConfigError("give the training length as steps or epochs")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give the training length as steps or as epochs, not both")
        for name in ("batch_size", "steps", "epochs", "dataset_repetitions", "sample_every", "sample_steps",
                     "num_samples", "checkpoint_every", "keep_checkpoints", "log_every"):
            _at_least(getattr(self, name), 1, name)
        _at_least(self.warmup_steps, 0, "warmup_steps")
        if isinstance(self.num_samples, int) and self.num_samples > MAX_SAMPLES:
            raise ConfigError(f"num_samples must be at most {MAX_SAMPLES:,} (one sample grid), "
                              f"got {self.num_samples:,}")
        if not 0.0 < self.lr < 1.0:
            raise ConfigError(f"lr must lie in (0, 1), got {self.lr}")
        _at_least(self.weight_decay, 0.0, "weight_decay")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be > 0, got {self.grad_clip}")


# The sections of a run config that options may set, in the order --help shows them.
SECTIONS = ("model", "schedule", "data", "train")

# Fields that may change when a run is resumed: they do not alter the trained weights' path.
RESUMABLE_FIELDS = frozenset(
    {"steps", "epochs", "sample_every", "sample_steps", "num_samples", "checkpoint_every", "keep_checkpoints", "log_every"}
)


@dataclass(frozen=True)
class RunConfig:
    """A whole training run: what a preset gives and CLI options override."""

    preset: str
    model: ModelConfig
    schedule: ScheduleConfig
    data: DataConfig
    train: TrainConfig

    def __post_init__(self) -> None:
        most = self.schedule.num_timesteps if self.schedule.discrete else MAX_CONTINUOUS_STEPS
        if self.train.sample_steps > most:  # refused now, not at the first sample grid
            raise ConfigError(f"sample_steps {self.train.sample_steps} is more than the {self.schedule.name!r} "
                              f"schedule takes ({most:,})")
        if self.model.conditioning == "timestep" and not self.schedule.discrete:  # refused before any data loads
            raise ConfigError(f"conditioning 'timestep' needs a discrete schedule (linear, cosine, scaled-linear): "
                              f"{self.schedule.name!r} has no integer timesteps")

    def to_spec(self, normalization: NormalizationConfig) -> ModelSpec:
        """The config that travels with the checkpoint."""
        extra = {
            "toolkit_version": __version__,
            "preset": self.preset,
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }
        return ModelSpec(self.model, self.schedule, normalization, extra)

    @classmethod
    def from_spec(cls, spec: ModelSpec) -> "RunConfig":
        """Rebuild the run config stored in a checkpoint's ``config.json``."""
        extra: Mapping[str, Any] = spec.extra
        for key in ("preset", "data", "train"):
            if key not in extra:
                raise ConfigError(f"config has no {key!r} section: not a trainer run config")
        return cls(
            preset=str(extra["preset"]),
            model=spec.model,
            schedule=spec.schedule,
            data=dataclass_from_dict(DataConfig, extra["data"], "data"),
            train=dataclass_from_dict(TrainConfig, extra["train"], "train"),
        )

    def with_overrides(self, overrides: Mapping[tuple[str, str], Any]) -> "RunConfig":
        """This config with ``{(section, field): value}`` replaced (``("model", "widths")``...).

        ``("model", "architecture")`` switches U-Nets: the new one keeps the fields both share
        (image size, channels, embedding frequencies) and takes its own defaults for the rest. A
        training length given as steps drops one given as epochs, and back.
        """
        by_section: dict[str, dict[str, Any]] = {}
        for (section, name), value in overrides.items():
            if section not in SECTIONS:
                raise ConfigError(f"unknown config section {section!r}; allowed: {', '.join(SECTIONS)}")
            by_section.setdefault(section, {})[name] = value
        train = by_section.get("train", {})
        if "steps" in train:
            train.setdefault("epochs", None)
        elif "epochs" in train:
            train.setdefault("steps", None)
        model = self.model
        wanted = by_section.get("model", {})
        arch = wanted.pop("architecture", model.architecture)
        check_choice(arch, tuple(MODEL_CONFIGS), "architecture")
        cls = MODEL_CONFIGS[arch]
        names = {f.name for f in dataclasses.fields(cls)}
        foreign = sorted(set(wanted) - names)
        if foreign:
            other = next((a for a, c in MODEL_CONFIGS.items() if set(foreign) <= {f.name for f in dataclasses.fields(c)}),
                         None)
            hint = f"; they set the {other} U-Net: add architecture {other}" if other else ""
            raise ConfigError(f"the {arch} U-Net (preset {self.preset}) has no {', '.join(foreign)}{hint}")
        if arch != model.architecture:
            kept = {k: v for k, v in dataclasses.asdict(model).items() if k in names and k != "architecture"}
            model = cls(**{**kept, **wanted})
        else:
            model = dataclasses.replace(model, **wanted)
        return dataclasses.replace(
            self,
            model=model,
            schedule=dataclasses.replace(self.schedule, **by_section.get("schedule", {})),
            data=dataclasses.replace(self.data, **by_section.get("data", {})),
            train=dataclasses.replace(self.train, **train),
        )

    def to_dict(self) -> dict[str, Any]:
        """The resolved config, section by section (what ``fit --print-config`` prints)."""
        return {"preset": self.preset, "model": dataclasses.asdict(self.model),
                "schedule": dataclasses.asdict(self.schedule), "data": dataclasses.asdict(self.data),
                "train": dataclasses.asdict(self.train)}

    def differences(self, other: "RunConfig", ignore: frozenset[str] = frozenset()) -> list[str]:
        """Dotted names of the fields that differ (``train.lr``...), skipping ``ignore``d train fields."""
        mine, theirs = _flatten(dataclasses.asdict(self)), _flatten(dataclasses.asdict(other))
        keys = sorted(set(mine) | set(theirs))
        return [k for k in keys if mine.get(k) != theirs.get(k) and not (k.startswith("train.") and k[6:] in ignore)]


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
    return out
