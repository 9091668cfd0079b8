"""``ddim-run``: sample images from an exported model with the lean DDIM loop (torch-free on ONNX Runtime)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click
import numpy as np

from runtime.choices import BackendName, Device, RunPrecision, Solver, Spacing, values
from runtime.clitools import friendly_errors
from runtime.hostinfo import physical_cores
from runtime.outputs import StagedOutputs, check_file, check_folder
from runtime.shipped import pick

log = logging.getLogger("runtime")


def latest_export(root: Path = Path("exports")) -> Path | None:
    """The most recently completed export folder under ``root``, if any.

    Only folders of ours that ``ddim-export`` finished count: ``export_report.json`` is written last,
    inside a staging folder renamed into place. Hidden names are skipped: a killed export leaves its
    ``.NAME.partial-PID`` staging folder (an ungated model) or ``.NAME.old-PID`` (the replaced one).
    """
    found: list[tuple[float, Path]] = []
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        report = folder / "export_report.json"
        if folder.name.startswith(".") or not (report.is_file() and (folder / "model.onnx").is_file()):
            continue
        try:
            found.append((report.stat().st_mtime, folder))
        except OSError:  # removed meanwhile
            continue
    return max(found)[1] if found else None


def check_outputs(out: Path, out_dir: Path | None, npz: Path | None) -> None:
    """Fail before loading and sampling, not after, when an output cannot be written."""
    from runtime.images import IMAGE_FORMATS, image_format

    check_file(out, "--out", tuple(IMAGE_FORMATS))
    image_format(out)  # a WebP-less Pillow refuses .webp now, not after sampling
    if out_dir is not None:
        check_folder(out_dir, "--out-dir")
    if npz is not None:
        check_file(npz, "--npz", ".npz")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True, help="DDIM sampling steps.")
@click.option("--eta", type=click.FloatRange(min=0.0), default=0.0, show_default=True,
              help="0 = deterministic DDIM, 1 = DDPM-like.")
@click.option("--num-images", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Noise seed (numpy seeds are non-negative).")
@click.option("--backend", type=click.Choice(values(BackendName)), default="auto",
              show_default=True, help="torch takes a trainer run directory: the eager reference.")
@click.option("--device", type=click.Choice(values(Device)), default=None, help="[default: cuda when usable]")
@click.option("--precision", type=click.Choice(values(RunPrecision)), default="auto", show_default=True,
              help="Which exported file: model.onnx, model.fp16.onnx or model.int8.onnx (CPU); auto: the TensorRT "
                   "engine's (fp16) where one is picked, on ONNX Runtime CPU model.int8.onnx where it passed its "
                   "gate and is faster on this CPU, else model.onnx.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help=f"CPU threads of ONNX Runtime / torch [default: one per physical core, {physical_cores()} here].")
@click.option("--spacing", type=click.Choice(values(Spacing)), default=None,
              help="How the steps spread over the schedule [default: uniform; trailing for dpmpp-2m on a discrete "
                   "schedule].")
@click.option("--solver", type=click.Choice(values(Solver)), default="ddim", show_default=True,
              help="ddim, or dpmpp-2m (DPM-Solver++(2M), eta 0: on the shipped model 10 steps score as 50 DDIM steps).")
@click.option("--clip-x0/--no-clip-x0", default=None,
              help="Clip each step's predicted clean image to the pixel range (or the model's clip range) "
                   "[default: the model's setting, off for models trained here].")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples.png"), show_default=True,
              help="The grid: .png, .jpg or .webp (PNG and WebP lossless).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, help="Also one PNG per image here.")
@click.option("--npz", type=click.Path(path_type=Path), default=None, help="Also the raw arrays (samples, images).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@friendly_errors
def main(model: Path | None, steps: int, eta: float, num_images: int, batch_size: int, seed: int, backend: str,
         device: str | None, precision: str | None, threads: int | None, spacing: str | None, clip_x0: bool | None,
         out: Path, out_dir: Path | None, npz: Path | None, progress: bool, solver: str = "ddim") -> None:
    """Sample a PNG grid from MODEL: an export directory or ONNX file (default: the latest export under
    exports/, else the shipped Fashion-MNIST model)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _run(model, steps, eta, num_images, batch_size, seed, backend, device, precision, threads, spacing, clip_x0,
         out, out_dir, npz, progress, solver)


def _run(model: Path | None, steps: int, eta: float, num_images: int, batch_size: int, seed: int, backend: str,
         device: str | None, precision: str | None, threads: int | None, spacing: str | None, clip_x0: bool | None,
         out: Path, out_dir: Path | None, npz: Path | None, progress: bool, solver: str = "ddim") -> None:
    from tqdm import tqdm

    from runtime.api import load
    from runtime.images import grid_bytes, grid_scale, image_format, png_bytes

    model, why = pick(model, "MODEL", "export", "exports", latest_export, "model.onnx", "make one with ddim-export")
    log.info("ddim-run: %s%s", model, why)
    check_outputs(out, out_dir, npz)
    sampler = load(model, backend, device, precision, threads)  # type: ignore[arg-type]
    log.info("backend: %s", sampler.why)
    sampler.plan(steps, eta, spacing, solver)  # type: ignore[arg-type]  # refuse what the schedule cannot take, now
    log.info("solver: %s, %d steps (%s spacing), eta %g, %s", solver, steps, sampler.spacing(spacing, solver), eta,  # type: ignore[arg-type]
             "pred_x0 clipped" if sampler.clips(clip_x0) else "no clipping")
    batches = -(-num_images // batch_size)
    with tqdm(total=steps * batches, desc="sampling", unit="step", disable=not progress) as bar:
        result = sampler.sample(num_images, steps, seed, eta, spacing, clip_x0, batch_size,  # type: ignore[arg-type]
                                on_step=lambda i: bar.update(1), solver=solver)  # type: ignore[arg-type]
    # All or nothing: a full disk at the npz must not leave a new grid beside the old per-image files.
    with StagedOutputs() as staged:
        scale = grid_scale(result.images.shape[1], len(result.images))
        staged.stage(out, grid_bytes(result.images, scale=scale, fmt=image_format(out)), "--out")
        if out_dir is not None:
            for i, image in enumerate(result.images):
                staged.stage(out_dir / f"{i:05d}.png", png_bytes(image), "--out-dir")
        if npz is not None:
            staged.stage(npz, lambda fh: np.savez(fh, samples=result.samples, images=result.images), "--npz")
        staged.commit()
    b = sampler.backend
    per_step = result.seconds / max(result.calls, 1)
    log.info("%s on %s: %d images in %.2f s, %.1f ms per step (batch %d), %.2f images/s, "
             "%.1f%% of the time outside the network; grid in %s",
             b.name, b.device, num_images, result.seconds, per_step * 1e3, min(batch_size, num_images),
             num_images / result.seconds, 100 * result.overhead_fraction, out)


if __name__ == "__main__":
    main()
