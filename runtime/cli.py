"""``ddim-run``: sample images from an exported model with the lean DDIM loop (torch-free on ONNX Runtime)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from runtime.choices import Device, RunPrecision, values
from runtime.common.cliconfig import with_flag_names
from runtime.common.clitools import BackendChoice, friendly_errors, sampling_options, sampling_settings
from runtime.exportdir import FP32_ONNX, latest_export
from runtime.common.hostinfo import physical_cores
from runtime.common.outputs import StagedOutputs, check_file, check_folder
from runtime.settings import SamplingSettings
from runtime.common.shipped import pick

log = logging.getLogger("runtime")


def check_outputs(out: Path, out_dir: Path | None, npz: Path | None) -> None:
    """Fail before loading and sampling, not after, when an output cannot be written."""
    from runtime.images import IMAGE_FORMATS, image_format

    check_file(out, "--out", tuple(IMAGE_FORMATS))
    image_format(out)  # a WebP-less Pillow refuses .webp now, not after sampling
    if out_dir is not None:
        check_folder(out_dir, "--out-dir")
    if npz is not None:
        check_file(npz, "--npz", ".npz")


@dataclass(frozen=True)
class RunOptions:
    """What ``ddim-run`` does besides sampling settings: how many images, on what, into which files."""

    num_images: int
    batch_size: int
    seed: int
    backend: str
    device: Device | None
    precision: RunPrecision
    threads: int | None
    out: Path
    out_dir: Path | None
    npz: Path | None
    progress: bool


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@sampling_options
@click.option("--num-images", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Noise seed (numpy seeds are non-negative).")
@click.option("--backend", type=BackendChoice(), default="auto",
              show_default=True, help="torch takes a trainer run directory: the eager reference.")
@click.option("--device", type=click.Choice(values(Device)), default=None, help="[default: cuda when usable]")
@click.option("--precision", type=click.Choice(values(RunPrecision)), default="auto", show_default=True,
              help="Which exported file: model.onnx, model.fp16.onnx or model.int8.onnx (CPU); auto: the TensorRT "
                   "engine's (fp16) where one is picked, on ONNX Runtime CPU model.int8.onnx where it passed its "
                   "gate and is faster on this CPU, else model.onnx.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help=f"CPU threads of ONNX Runtime / torch [default: one per physical core, {physical_cores()} here].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples.png"), show_default=True,
              help="The grid: .png, .jpg or .webp (PNG and WebP lossless).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, help="Also one PNG per image here.")
@click.option("--npz", type=click.Path(path_type=Path), default=None, help="Also the raw arrays (samples, images).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@friendly_errors
@click.pass_context
def main(ctx: click.Context, model: Path | None, **options: Any) -> None:
    """Sample a PNG grid from MODEL: an export directory or ONNX file (default: the latest export under
    exports/, else the shipped Fashion-MNIST model)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = sampling_settings(ctx)
    _run(ctx, model, settings, RunOptions(**options))


def _run(ctx: click.Context, model: Path | None, settings: SamplingSettings, o: RunOptions) -> None:
    from runtime.api import load
    from runtime.common.progress import progress_bar
    from runtime.images import grid_bytes, grid_scale, image_format, png_bytes

    model, why = pick(model, "MODEL", "export", "exports", latest_export, FP32_ONNX, "make one with ddim-export")
    log.info("ddim-run: %s%s", model, why)
    check_outputs(o.out, o.out_dir, o.npz)
    sampler = load(model, o.backend, o.device, o.precision, o.threads)
    log.info("backend: %s", sampler.why)
    # Refuse what the schedule cannot take now, naming the flag; sampling reuses this plan.
    plan = with_flag_names(ctx, lambda: sampler.plan(settings), every_field_of="sampling")
    settings = sampler.resolve(settings)
    log.info("solver: %s, %d steps (%s spacing), eta %g, %s", settings.solver, len(plan), settings.spacing,
             settings.eta, "pred_x0 clipped" if settings.clip_x0 else "no clipping")
    batches = -(-o.num_images // o.batch_size)
    with progress_bar(total=len(plan) * batches, desc="sampling", unit="step", disable=not o.progress) as bar:
        result = sampler.sample(o.num_images, settings, seed=o.seed, batch_size=o.batch_size,
                                on_step=lambda i: bar.update(1))
    # All or nothing: a full disk at the npz must not leave a new grid beside the old per-image files.
    with StagedOutputs() as staged:
        scale = grid_scale(result.images.shape[1], len(result.images))
        staged.stage(o.out, grid_bytes(result.images, scale=scale, fmt=image_format(o.out)), "--out")
        if o.out_dir is not None:
            for i, image in enumerate(result.images):
                staged.stage(o.out_dir / f"{i:05d}.png", png_bytes(image), "--out-dir")
        if o.npz is not None:
            staged.stage(o.npz, lambda fh: np.savez(fh, samples=result.samples, images=result.images), "--npz")
        staged.commit()
    b = sampler.backend
    per_step = result.seconds / max(result.calls, 1)
    log.info("%s on %s: %d images in %.2f s, %.1f ms per step (batch %d), %.2f images/s, "
             "%.1f%% of the time outside the network; grid in %s",
             b.name, b.device, o.num_images, result.seconds, per_step * 1e3, min(o.batch_size, o.num_images),
             o.num_images / result.seconds, 100 * result.overhead_fraction, o.out)


if __name__ == "__main__":
    main()
