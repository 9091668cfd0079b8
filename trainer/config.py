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
    ConfigError, ModelConfig, ModelSpec, NormalizationConfig, ScheduleConfig, check_choice, dataclass_from_dict,
)

DataSource = Literal["fashion-mnist", "cifar10", "oxford-flowers", "folder"]
Split = Literal["train", "val", "all"]
Normalization = Literal["dataset-stats", "minus-one-one"]
LossName = Literal["mae", "mse"]
Precision = Literal["fp32", "bf16", "fp16"]  # fp16: CUDA only, with a gradient scaler


def _at_least(value: float | int | None, low: float, what: str) -> None:
    if value is not None and (isinstance(value, bool) or value < low):
        raise ConfigError(f"{what} must be >= {low:g}, got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the images come from and how they become model inputs."""

    source: DataSource = "fashion-mnist"
    split: Split = "train"  # fashion-mnist, cifar10: official train / test; folders: seeded random split
    val_fraction: float = 0.2
    split_seed: int = 0
    random_flip: bool = False
    normalization: Normalization = "dataset-stats"  # per-channel mean/std of the training images

    def __post_init__(self) -> None:
        check_choice(self.source, get_args(DataSource), "data source")
        check_choice(self.split, get_args(Split), "split")
        check_choice(self.normalization, get_args(Normalization), "normalization")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, EMA, loss, duration and bookkeeping of one training run."""

    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    ema_warmup: bool = True  # decay min(ema_decay, (1 + n) / (10 + n)) after n steps
    loss: LossName = "mae"
    steps: int | None = None  # total optimiser steps; or derive them from epochs
    epochs: int | None = None
    dataset_repetitions: int = 1  # the Keras example repeats the dataset within an epoch
    warmup_steps: int = 0
    grad_clip: float | None = None
    precision: Precision = "fp32"
    seed: int = 0
    sample_every: int = 500
    sample_steps: int = 20
    num_samples: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10

    def __post_init__(self) -> None:
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
        if not 0.0 < self.lr < 1.0:
            raise ConfigError(f"lr must lie in (0, 1), got {self.lr}")
        _at_least(self.weight_decay, 0.0, "weight_decay")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ConfigError(f"grad_clip must be > 0, got {self.grad_clip}")


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
