"""``ddim-run``: sample images from an exported model with the lean DDIM loop (torch-free on ONNX Runtime)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import get_args

import click
import numpy as np

from runtime.clitools import friendly_errors
from runtime.shipped import pick
from runtime.schedule import Spacing

log = logging.getLogger("runtime")


def latest_export(root: Path = Path("exports")) -> Path | None:
    """The most recently written export directory under ``root``, if any."""
    found = [p for p in root.glob("*/model.onnx") if p.is_file()] if root.is_dir() else []
    return max(found, key=lambda p: p.stat().st_mtime).parent if found else None


def check_writable(path: Path | None, what: str) -> None:
    """Fail before sampling, not after, when an output cannot be written."""
    if path is None:
        return
    parent = path if what == "--out-dir" else path.parent
    ancestor = next((p for p in [parent, *parent.absolute().parents] if p.exists()), None)
    if ancestor is None or not ancestor.is_dir():
        raise ValueError(f"cannot write {what} {path}: {ancestor} is not a folder")
    if path.is_dir() and what != "--out-dir":
        raise ValueError(f"cannot write {what} {path}: it is a folder")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--steps", type=int, default=50, show_default=True, help="DDIM sampling steps.")
@click.option("--eta", type=float, default=0.0, show_default=True, help="0 = deterministic DDIM, 1 = DDPM-like.")
@click.option("--num-images", type=int, default=64, show_default=True)
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--backend", type=click.Choice(["auto", "tensorrt", "onnxruntime", "torch"]), default="auto",
              show_default=True, help="torch takes a trainer run directory: the eager reference.")
@click.option("--device", type=click.Choice(["cpu", "cuda"]), default=None, help="[default: cuda when usable]")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default=None,
              help="Which exported file: model.onnx, model.fp16.onnx or model.int8.onnx (CPU) [default: the "
                   "TensorRT engine's (fp16) where one is picked, else fp32].")
@click.option("--spacing", type=click.Choice(get_args(Spacing)), default="uniform", show_default=True)
@click.option("--clip-x0", is_flag=True, help="Clip each step's predicted clean image to the pixel range.")
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples.png"), show_default=True,
              help="PNG grid.")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None, help="Also one PNG per image here.")
@click.option("--npz", type=click.Path(path_type=Path), default=None, help="Also the raw arrays (samples, images).")
@click.option("--progress/--no-progress", default=True, show_default=True)
@friendly_errors
def main(model: Path | None, steps: int, eta: float, num_images: int, batch_size: int, seed: int, backend: str,
         device: str | None, precision: str | None, spacing: str, clip_x0: bool, out: Path, out_dir: Path | None,
         npz: Path | None, progress: bool) -> None:
    """Sample a PNG grid from MODEL: an export directory or ONNX file (default: the latest export under
    exports/, else the shipped Fashion-MNIST model)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    _run(model, steps, eta, num_images, batch_size, seed, backend, device, precision, spacing, clip_x0, out,
         out_dir, npz, progress)


def _run(model: Path | None, steps: int, eta: float, num_images: int, batch_size: int, seed: int, backend: str,
         device: str | None, precision: str | None, spacing: str, clip_x0: bool, out: Path, out_dir: Path | None,
         npz: Path | None, progress: bool) -> None:
    from tqdm import tqdm

    from runtime.api import load
    from runtime.files import atomic_path
    from runtime.images import grid_scale, png_bytes, save_grid

    model, why = pick(model, "MODEL", "export", "exports", latest_export, "model.onnx", "make one with ddim-export")
    log.info("ddim-run: %s%s", model, why)
    for path, what in ((out, "--out"), (out_dir, "--out-dir"), (npz, "--npz")):
        check_writable(path, what)
    sampler = load(model, backend, device, precision)  # type: ignore[arg-type]
    log.info("backend: %s", sampler.why)
    batches = -(-num_images // batch_size)
    with tqdm(total=steps * batches, desc="sampling", unit="step", disable=not progress) as bar:
        result = sampler.sample(num_images, steps, seed, eta, spacing, clip_x0, batch_size,  # type: ignore[arg-type]
                                on_step=lambda i: bar.update(1))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_grid(out, result.images, scale=grid_scale(result.images.shape[1], len(result.images)))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(result.images):
            with atomic_path(out_dir / f"{i:05d}.png") as tmp:
                tmp.write_bytes(png_bytes(image))
    if npz is not None:
        with atomic_path(npz) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, samples=result.samples, images=result.images)
    b = sampler.backend
    per_step = result.seconds / max(result.calls, 1)
    log.info("%s on %s: %d images in %.2f s, %.1f ms per step (batch %d), %.2f images/s, "
             "%.1f%% of the time outside the network; grid in %s",
             b.name, b.device, num_images, result.seconds, per_step * 1e3, min(batch_size, num_images),
             num_images / result.seconds, 100 * result.overhead_fraction, out)


if __name__ == "__main__":
    main()
