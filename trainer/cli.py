"""``python -m trainer``: train a denoiser (``fit``) or describe a preset (``info``).

``fit``'s options are generated from the run config's dataclasses (runtime/common/cliconfig.py); an option
left out keeps the preset's value. Errors print one line on stderr and exit non-zero (``--debug`` for tracebacks).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from runtime.choices import Device, values
from runtime.common.cliconfig import (
    ConfigOption, GroupedCommand, GroupedOption, add_options, allow_empty, config_options, flag_names_in, flag_of,
    overrides,
)
from runtime.common.clitools import friendly_errors, size_limit_options, size_limits, version_option
from runtime.config import MODEL_CONFIGS, ConfigError, DDPMUNetConfig, KerasUNetConfig, ScheduleConfig
from trainer.config import SECTIONS, DataConfig, RunConfig, TrainConfig
from trainer.presets import DEFAULT_PRESET, PRESETS, get_preset

log = logging.getLogger("trainer")


def _preset_of(ctx: click.Context) -> tuple[str, Any]:
    """The config whose values ``--help`` shows as defaults: ``--preset``'s if given before ``--help``."""
    name = ctx.meta.get("preset") or DEFAULT_PRESET
    return name, get_preset(name).config


def _remember_preset(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    ctx.meta["preset"] = value
    return value


_MODEL_FIELDS = {arch: {f.name for f in dataclasses.fields(cls)} for arch, cls in MODEL_CONFIGS.items()}
_SHARED = set.intersection(*_MODEL_FIELDS.values())


def _model_options() -> list[click.Option]:
    """The U-Nets' fields: the ones both share once, then each architecture's own under its heading."""
    shared = config_options(KerasUNetConfig, "model", "Model (both U-Nets)", _preset_of,
                            skip=set(_MODEL_FIELDS["keras"]) - _SHARED)
    for option in shared:
        if isinstance(option, ConfigOption) and option.field == "architecture":
            option.type = click.Choice(list(MODEL_CONFIGS))
    shared.sort(key=lambda o: not (isinstance(o, ConfigOption) and o.field == "architecture"))  # first
    keras = config_options(KerasUNetConfig, "model", "Model: Keras U-Net (--architecture keras)", _preset_of,
                           skip=_SHARED)
    ddpm = config_options(DDPMUNetConfig, "model", "Model: DDPM U-Net (--architecture ddpm)", _preset_of,
                          skip=_SHARED)
    allow_empty(ddpm, "attention_resolutions")
    return shared + keras + ddpm


CONFIG_OPTIONS: list[click.Option] = [
    *_model_options(),
    *config_options(ScheduleConfig, "schedule", "Noise schedule", _preset_of, rename={"name": "schedule"}),
    *config_options(DataConfig, "data", "Data", _preset_of, rename={"random_flip": "flip"}),
    *config_options(TrainConfig, "train", "Training", _preset_of),
]


def resolve_config(ctx: click.Context, preset: str | None, resume_from: Path | None) -> RunConfig:
    """The run config: the preset's (or the stored run's, on --resume) with the given options applied.

    Config errors name the flags typed (``--block-depth``), not the fields they set.
    """
    from trainer.rundir import load_run_config, with_train_overrides

    given = {k: v for k, v in overrides(ctx).items() if k[0] in SECTIONS}  # not the size limits
    try:
        if resume_from is not None:
            stored = load_run_config(resume_from)
            return with_train_overrides(stored, given, lambda section, field: flag_of(ctx, section, field))
        return get_preset(preset or DEFAULT_PRESET).config.with_overrides(given)
    except ConfigError as exc:
        raise ConfigError(flag_names_in(str(exc), ctx, [*given, ("model", "architecture")])) from None


class _EscapingFormatter(logging.Formatter):
    """Lines whose paths are not UTF-8 (``--out $'runs/bad\\377'``: surrogates) escaped, not a logging error."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).encode("utf-8", "backslashreplace").decode("utf-8")


def setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_EscapingFormatter("%(message)s"))
    for name in ("trainer", "runtime"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(handler)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option
def main() -> None:
    """Train DDIM denoisers (presets: python -m trainer info; docs/training.md)."""


_CHOICE = click.Choice


@main.command(cls=GroupedCommand)
@click.option("--preset", type=_CHOICE(list(PRESETS)), default=None, is_eager=True, callback=_remember_preset,
              cls=GroupedOption, group="Run",
              help=f"Training setup every option below starts from [default: {DEFAULT_PRESET}]; put it before "
                   "--help to see its values.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), cls=GroupedOption, group="Run",
              help="Dataset folder (else the preset's default).")
@click.option("--out", "out", type=click.Path(path_type=Path), cls=GroupedOption, group="Run",
              help="Run directory [default: runs/PRESET-TIME].")
@click.option("--resume", is_flag=True, cls=GroupedOption, group="Run",
              help="Continue the run in --out from its latest checkpoint.")
@click.option("--device", type=_CHOICE(["auto", *values(Device)]), default="auto", show_default=True,
              cls=GroupedOption, group="Run")
@click.option("--progress/--no-progress", default=True, show_default=True, cls=GroupedOption, group="Run",
              help="Progress bar.")
@click.option("--print-config", is_flag=True, cls=GroupedOption, group="Run",
              help="Print the resolved config as JSON and exit.")
@add_options(CONFIG_OPTIONS)
@size_limit_options
@friendly_errors
@click.pass_context
def fit(ctx: click.Context, preset: str | None, data_path: Path | None, out: Path | None, resume: bool, device: str,
        progress: bool, print_config: bool) -> None:
    """Train a denoiser into a run directory (under torchrun: one process per rank, DDP).

    Every option but the Run ones sets one field of the run config; left out, it keeps the preset's
    value (shown as the default; on --resume, the stored run's).
    """
    from trainer import distributed

    setup_logging()
    if resume:
        if out is None:
            raise click.UsageError("--resume needs --out RUN_DIR")
        if preset is not None:
            raise click.UsageError("--resume takes the preset stored in the run directory; drop --preset")
    limits = size_limits(ctx)
    cfg = resolve_config(ctx, preset, out if resume else None)
    if print_config:
        click.echo(json.dumps(cfg.to_dict(), indent=2))
        return
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
