"""Reconstruction by DDIM inversion, per backend: real held-out images encoded (``Sampler.encode``, what
``ddim-encode`` runs) and decoded (``Sampler.decode``, ``ddim-run --latents``) with S steps.

The DDIM paper's measure (Song et al. 2021, Table 2): the per-dimension mean squared error with images in
[-1, 1]; beside it the mean absolute error in grey levels (0..255). Both images are 8-bit (the input as read, the
reconstruction as ddim-run writes it). Backends: eager PyTorch fp32 (the reference), ONNX Runtime CPU fp32,
fp16 and INT8 (the export made here with ddim-export's own gates, or ``--export``). Writes
``results/reconstruct-DATE-HOST.{json,md,png}`` (the error against S per backend), ``-grid.png`` (inputs and
each backend's reconstructions at the largest S) and ``-interpolation.png`` (spherical interpolation between the
latents of two test images).

    python benchmarks/reconstruct.py                      # 64 test images, S = 10, 20, 50, 100
    python benchmarks/reconstruct.py --quick              # 8 images, S = 10, 20
"""

from __future__ import annotations

import platform
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
from numpy.typing import NDArray

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import RESULTS, cpu_name, pyplot, save_figure, write_report  # noqa: E402
from benchmarks.fid import BACKENDS, EAGER, make_export, open_backends, reference_images  # noqa: E402
from runtime.api import Sampler  # noqa: E402
from runtime.common.clitools import friendly_errors  # noqa: E402
from runtime.common.shipped import SHIPPED_MODEL  # noqa: E402
from runtime.images import make_grid  # noqa: E402
from runtime.inputs import to_model_space  # noqa: E402
from runtime.latents import slerp  # noqa: E402
from runtime.settings import SamplingSettings  # noqa: E402
from trainer.rundir import read_spec  # noqa: E402


def errors(inputs: NDArray[np.uint8], outputs: NDArray[np.uint8]) -> dict[str, float]:
    """Per-dimension MSE with images in [-1, 1] (x / 127.5 - 1) and the mean absolute grey-level error."""
    a, b = inputs.astype(np.float64) / 127.5 - 1.0, outputs.astype(np.float64) / 127.5 - 1.0
    return {"mse": float(np.mean((a - b) ** 2)),
            "mae_grey": float(np.mean(np.abs(inputs.astype(np.int16) - outputs.astype(np.int16))))}


def measure(sampler: Sampler, x0: NDArray[np.float32], images: NDArray[np.uint8], steps: int,
            batch_size: int) -> tuple[dict[str, Any], NDArray[np.float32], NDArray[np.uint8]]:
    """Encode and decode ``x0`` with ``steps`` steps: the errors, the latents and the reconstructions."""
    settings = SamplingSettings(steps)
    start = time.perf_counter()
    latents = sampler.encode(x0, settings, batch_size=batch_size).samples
    back = sampler.decode(latents, settings, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return ({"steps": steps, **errors(images, back.images), "seconds": seconds,
             "latent_std": float(latents.std())}, latents, back.images)


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Reconstruction by DDIM inversion ({env['model']}, {env['n']} held-out images, {env['cpu']})", "",
             "Encode with S steps (`ddim-encode`), decode with the same S (`ddim-run --latents`). MSE: per dimension, "
             "images in [-1, 1] (the DDIM paper's Table 2); MAE in grey levels (0..255). Command: "
             f"`{env['command']}`.", "",
             "| backend | S | MSE [-1, 1] | MAE (grey levels) | latent std | seconds (encode + decode) |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['steps']} | {r['mse']:.5f} | {r['mae_grey']:.2f} | "
                     f"{r['latent_std']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for backend in dict.fromkeys(r["backend"] for r in rows):
        mine = sorted((r for r in rows if r["backend"] == backend), key=lambda r: r["steps"])
        for ax, key in zip(axes, ("mse", "mae_grey")):
            ax.plot([r["steps"] for r in mine], [r[key] for r in mine], marker="o", label=backend)
    for ax, title in zip(axes, ("per-dimension MSE, images in [-1, 1]", "mean absolute error, grey levels")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("steps S (encode and decode)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend()
    fig.suptitle("Reconstruction by DDIM inversion: error falls as S grows")
    save_figure(fig, path)


def labelled_rows(panels: dict[str, NDArray[np.uint8]], path: Path, scale: int = 3) -> None:
    """One row per panel (its label on the left): the inputs, then each backend's reconstructions."""
    from PIL import Image, ImageDraw

    tiles = {k: Image.fromarray(make_grid(v, len(v)).squeeze()) for k, v in panels.items()}
    tiles = {k: t.resize((t.width * scale, t.height * scale), Image.NEAREST) for k, t in tiles.items()}
    left, w, h = 190, max(t.width for t in tiles.values()), max(t.height for t in tiles.values())
    canvas = Image.new("RGB", (left + w, len(tiles) * h), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, tile) in enumerate(tiles.items()):
        canvas.paste(tile.convert("RGB"), (left, i * h))
        draw.text((4, i * h + h // 2 - 6), label, fill="black")
    canvas.save(path)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--model", "model_dir", type=click.Path(path_type=Path, exists=True), default=None,
              help="A trainer run directory [default: the shipped model].")
@click.option("--export", "export_dir", type=click.Path(path_type=Path, exists=True), default=None,
              help="Its export with model.fp16.onnx and model.int8.onnx [default: made here by ddim-export].")
@click.option("--backend", "backends", type=click.Choice(BACKENDS), multiple=True,
              help="[default: all four]")
@click.option("--steps", "steps_list", type=click.IntRange(min=1), multiple=True, help="[default: 10 20 50 100]")
@click.option("--num-images", "n", type=click.IntRange(min=2), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True, help="Which held-out images.")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None, help="The dataset's folder.")
@click.option("--quick", is_flag=True, help="8 images, S = 10 and 20.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@friendly_errors
def main(model_dir: Path | None, export_dir: Path | None, backends: tuple[str, ...], steps_list: tuple[int, ...],
         n: int, batch_size: int, seed: int, data_path: Path | None, quick: bool, out: Path) -> None:
    """Encode and decode held-out images on every backend; the error against the number of steps."""
    model_dir = model_dir or SHIPPED_MODEL
    names = backends or BACKENDS
    if quick:
        n, steps_list = min(n, 8), steps_list or (10, 20)
    steps_all = sorted(set(steps_list or (10, 20, 50, 100)))
    spec = read_spec(model_dir)
    held_out = reference_images(spec, "val", data_path)
    pick = np.sort(np.random.default_rng(seed).choice(len(held_out), min(n, len(held_out)), replace=False))
    images = np.ascontiguousarray(held_out[pick])
    x0 = to_model_space(images, spec.normalization.mean, spec.normalization.std)
    click.echo(f"reconstruct: {model_dir}, {len(images)} held-out images, S = {steps_all}, {', '.join(names)}",
               err=True)
    rows: list[dict[str, Any]] = []
    panels: dict[str, NDArray[np.uint8]] = {"input (held-out)": images[:8]}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = export_dir or make_export(model_dir, Path(tmp), names, data_path)
        samplers = open_backends(names, model_dir, export_dir, "cpu")
        for label, sampler in samplers.items():
            for steps in steps_all:
                row, latents, back = measure(sampler, x0, images, steps, batch_size)
                rows.append({"model": str(model_dir), "backend": label, "n": len(images), **row})
                click.echo(f"  {label:24s} S = {steps:4d}: MSE {row['mse']:.5f}, MAE {row['mae_grey']:6.2f} grey "
                           f"levels, {row['seconds']:.1f} s", err=True)
                if steps == steps_all[-1]:
                    panels[f"{label}, S = {steps}"] = back[:8]
                    if label == EAGER or (EAGER not in samplers and "interp" not in panels):
                        frames = slerp(latents[0], latents[1], 8)
                        panels["interp"] = sampler.decode(frames, SamplingSettings(steps)).images
    env = {"host": socket.gethostname(), "cpu": cpu_name(), "python": platform.python_version(),
           "model": model_dir.name, "n": len(images),
           "command": "python benchmarks/reconstruct.py" + (" --quick" if quick else "")}
    _, stem = write_report("reconstruct", out, env, rows, ("model", "backend", "steps", "n"), markdown, plot)
    strip = panels.pop("interp", None)
    labelled_rows(panels, Path(f"{stem}-grid.png"))
    if strip is not None:
        labelled_rows({"slerp between two encoded test images": strip}, Path(f"{stem}-interpolation.png"))
    click.echo(f"wrote {stem}.json, .md, .png, -grid.png and -interpolation.png")


if __name__ == "__main__":
    main()
