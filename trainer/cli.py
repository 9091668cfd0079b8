"""``python -m trainer``: train a denoiser (``fit``) or describe a preset (``info``).

Options map onto the fields of the run config's dataclasses; an option left out keeps the
preset's value. Errors print one line on stderr and exit non-zero (``--debug`` for tracebacks).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, get_args

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from runtime.clitools import friendly_errors, size_limit_options
from runtime.config import ConfigError, ScheduleName
from runtime.limits import SizeLimits
from trainer.config import DataConfig, LossName, Normalization, Precision, RunConfig, Split, TrainConfig
from trainer.presets import DEFAULT_PRESET, PRESETS, get_preset

log = logging.getLogger("trainer")

# Which config section each option belongs to, and the field it sets (when named differently).
MODEL_FIELDS = {"image_size", "channels", "widths", "block_depth", "embedding_dims", "embedding_min_frequency",
                "embedding_max_frequency"}
SCHEDULE_FIELDS = {"schedule": "name", "num_timesteps": "num_timesteps", "min_signal_rate": "min_signal_rate",
                   "max_signal_rate": "max_signal_rate", "beta_start": "beta_start", "beta_end": "beta_end",
                   "cosine_s": "cosine_s"}
DATA_FIELDS = {f.name for f in dataclasses.fields(DataConfig)} - {"source"}
TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}


def parse_widths(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        widths = tuple(int(w) for w in value.split(","))
    except ValueError:
        raise click.BadParameter("give comma-separated integers, e.g. 32,64,96,128") from None
    return widths


def apply_overrides(cfg: RunConfig, opts: dict[str, Any]) -> RunConfig:
    """The preset's config with every given option replacing its field."""
    given = {k: v for k, v in opts.items() if v is not None}
    if "steps" in given:
        given.setdefault("epochs", None)
    elif "epochs" in given:
        given.setdefault("steps", None)
    model = {k: v for k, v in given.items() if k in MODEL_FIELDS}
    schedule = {SCHEDULE_FIELDS[k]: v for k, v in given.items() if k in SCHEDULE_FIELDS}
    data = {k: v for k, v in given.items() if k in DATA_FIELDS}
    train = {k: v for k, v in given.items() if k in TRAIN_FIELDS}
    return dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, **model),
        schedule=dataclasses.replace(cfg.schedule, **schedule),
        data=dataclasses.replace(cfg.data, **data),
        train=dataclasses.replace(cfg.train, **train),
    )


def with_flag_names(build: Callable[[], RunConfig], opts: dict[str, Any]) -> RunConfig:
    """``build()``, its config errors naming the flags the user typed (``--block-depth``) rather than
    the fields they set (``block_depth``)."""
    try:
        return build()
    except ConfigError as exc:
        text = str(exc)
        for name in sorted((k for k, v in opts.items() if v is not None), key=len, reverse=True):
            field = SCHEDULE_FIELDS.get(name, name)
            text = re.sub(rf"(?<![\w.-]){re.escape(field)}(?![\w-])", "--" + name.replace("_", "-"), text)
        raise ConfigError(text) from None


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("trainer", "runtime"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(handler)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train DDIM denoisers (see README for the presets)."""


_CHOICE = click.Choice


@main.command()
@click.option("--preset", type=_CHOICE(list(PRESETS)), default=None, help=f"Training setup [default: {DEFAULT_PRESET}].")
@click.option("--data", "data_path", type=click.Path(path_type=Path), help="Dataset folder (else the preset's default).")
@click.option("--out", "out", type=click.Path(path_type=Path), help="Run directory [default: runs/PRESET-TIME].")
@click.option("--resume", is_flag=True, help="Continue the run in --out from its latest checkpoint.")
@click.option("--device", type=_CHOICE(["auto", "cpu", "cuda"]), default="auto", show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar.")
# training (TrainConfig)
@click.option("--steps", type=click.IntRange(min=1), help="Total optimiser steps.")
@click.option("--epochs", type=click.IntRange(min=1), help="Total epochs (each of dataset_repetitions passes).")
@click.option("--dataset-repetitions", type=click.IntRange(min=1))
@click.option("--batch-size", type=click.IntRange(min=1))
@click.option("--lr", type=click.FloatRange(0, 1, min_open=True, max_open=True))
@click.option("--weight-decay", type=click.FloatRange(min=0))
@click.option("--ema-decay", type=click.FloatRange(0, 1, max_open=True))
@click.option("--ema-warmup/--no-ema-warmup", default=None, help="Ramp the EMA decay up over the first steps.")
@click.option("--loss", type=_CHOICE(get_args(LossName)))
@click.option("--warmup-steps", type=click.IntRange(min=0))
@click.option("--grad-clip", type=click.FloatRange(min=0, min_open=True), help="Max gradient norm.")
@click.option("--precision", type=_CHOICE(get_args(Precision)), help="bf16 = bfloat16 autocast.")
@click.option("--seed", type=click.IntRange(min=0))
@click.option("--sample-every", type=click.IntRange(min=1), help="Steps between sample grids.")
@click.option("--sample-steps", type=click.IntRange(min=1), help="DDIM steps of those grids.")
@click.option("--num-samples", type=click.IntRange(min=1), help="Images per grid.")
@click.option("--checkpoint-every", type=click.IntRange(min=1))
@click.option("--keep-checkpoints", type=click.IntRange(min=1), help="How many checkpoints to keep.")
@click.option("--log-every", type=click.IntRange(min=1), help="Steps per loss.csv row.")
# model (KerasUNetConfig)
@click.option("--image-size", type=click.IntRange(min=1))
@click.option("--channels", type=click.IntRange(min=1))
@click.option("--widths", callback=parse_widths, help="Block widths, e.g. 32,64,96,128.")
@click.option("--block-depth", type=click.IntRange(min=1))
@click.option("--embedding-dims", type=click.IntRange(min=2))
@click.option("--embedding-min-frequency", type=float)
@click.option("--embedding-max-frequency", type=float)
# schedule (ScheduleConfig)
@click.option("--schedule", type=_CHOICE(get_args(ScheduleName)))
@click.option("--num-timesteps", type=click.IntRange(min=1), help="T of discrete schedules.")
@click.option("--beta-start", type=float)
@click.option("--beta-end", type=float)
@click.option("--cosine-s", type=float, help="Offset s of the cosine schedule.")
@click.option("--min-signal-rate", type=float)
@click.option("--max-signal-rate", type=float)
# data (DataConfig)
@click.option("--split", type=_CHOICE(get_args(Split)))
@click.option("--val-fraction", type=float)
@click.option("--split-seed", type=click.IntRange(min=0))
@click.option("--flip/--no-flip", "random_flip", default=None, help="Random horizontal flips.")
@click.option("--normalization", type=_CHOICE(get_args(Normalization)))
@size_limit_options
@friendly_errors
def fit(preset: str | None, data_path: Path | None, out: Path | None, resume: bool, device: str, progress: bool,
        max_image_size: int, max_parameters: int, max_memory_gib: float, **opts: Any) -> None:
    """Train a denoiser into a run directory (under torchrun: one process per rank, DDP)."""
    from trainer import distributed
    from trainer.rundir import load_run_config, with_train_overrides

    setup_logging()
    if resume:
        if out is None:
            raise click.UsageError("--resume needs --out RUN_DIR")
        if preset is not None:
            raise click.UsageError("--resume takes the preset stored in the run directory; drop --preset")
        cfg = with_train_overrides(load_run_config(out), {k: v for k, v in opts.items() if v is not None})
    else:
        cfg = with_flag_names(lambda: apply_overrides(get_preset(preset or DEFAULT_PRESET).config, opts), opts)
    limits = SizeLimits(max_image_size, max_parameters, max_memory_gib)
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if multi and out is None:
        raise click.UsageError("under torchrun pass --out RUN_DIR: every process must agree on the run directory")
    run_dir = out or Path("runs") / f"{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    dist, dev = distributed.setup(resolve_device(device))
    if not dist.is_main:  # rank 0 speaks for the job
        for name in ("trainer", "runtime"):
            logging.getLogger(name).setLevel(logging.WARNING)
    procs = f" x {dist.world} processes" if dist.enabled else ""
    picked = " (the default preset)" if preset is None and not resume else ""
    log.info("fit: preset %s%s -> %s on %s%s%s", cfg.preset, picked, run_dir, dev, procs,
             " (resuming)" if resume else "")
    from trainer.train import fit as run_fit

    try:
        with logging_redirect_tqdm(loggers=[logging.getLogger("trainer"), logging.getLogger("runtime")]):
            result = run_fit(cfg, run_dir, data_path, resume=resume, device=dev, progress=progress, dist=dist,
                             limits=limits)
    finally:
        distributed.teardown(dist)
    state = "stopped" if result.interrupted else "done"
    log.info("%s at step %d/%d (%.1f images/s); checkpoint in %s", state, result.step, result.total_steps,
             result.images_per_second, run_dir)
    if result.interrupted:
        log.info("resume with: python -m trainer fit --resume --out %s", run_dir)
        sys.exit(130)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this PyTorch has no usable CUDA GPU; use --device cpu")
    return device


@main.command()
@click.option("--preset", type=_CHOICE(list(PRESETS)), multiple=True, help="Preset(s) to describe [default: all].")
@friendly_errors
def info(preset: tuple[str, ...]) -> None:
    """Parameter count and GFLOPs per forward of each preset's model."""
    from trainer.models import build_model, count_parameters, forward_gflops

    for name in preset or tuple(PRESETS):
        p = get_preset(name)
        model = build_model(p.config.model)
        m = p.config.model
        click.echo(f"{name:16s} {m.image_size}x{m.image_size}x{m.channels}  params {count_parameters(model):>10,}  "
                   f"GFLOPs/forward {forward_gflops(model, m):7.3f}  {p.summary}")


@main.command()
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="Folder of Fashion-MNIST IDX files [default: the Debian package, else the cache/download].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Where to write it [default: models/fashion-mnist-classifier, the shipped one].")
@click.option("--epochs", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True)
@friendly_errors
def classifier(data_path: Path | None, out: Path | None, epochs: int, seed: int, progress: bool) -> None:
    """Train the Fashion-MNIST classifier whose features give the FD-classifier score."""
    from trainer.classifier import SHIPPED, save_classifier, train_classifier
    from trainer.data import fit_idx_images
    from trainer.data.fashion_mnist import load_fashion_mnist

    out = out or SHIPPED
    click.echo(f"classifier: Fashion-MNIST, {epochs} epochs, seed {seed} -> {out}", err=True)
    (xtr, ytr), (xte, yte) = (load_fashion_mnist(data_path, s) for s in ("train", "test"))
    model, info = train_classifier((fit_idx_images(xtr, 32), ytr), (fit_idx_images(xte, 32), yte), epochs=epochs,
                                   seed=seed, progress=progress)
    save_classifier(model, info, out)
    click.echo(f"test accuracy {100 * info.test_accuracy:.2f}% ({len(yte)} images) in {info.train_seconds:.0f} s; "
               f"wrote {out}")
