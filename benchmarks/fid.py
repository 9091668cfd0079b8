"""Sample quality of every backend: FID / FD-classifier and KID against the data and against eager
PyTorch, same-noise parity (PSNR, max pixel difference), over a sweep of step counts and solvers.

    python benchmarks/fid.py                                # the shipped Fashion-MNIST model, 1,000 samples,
                                                            # eager PyTorch, ONNX Runtime float32 and INT8
    python benchmarks/fid.py --quick                        # smoke test: 64 samples, 10 and 20 steps
    python benchmarks/fid.py --solver ddim --solver dpmpp-2m --steps 5 --steps 10 --steps 20 --steps 50
    python benchmarks/fid.py --model runs/x --extractor inception --inception-weights pt_inception-2015-12-05.pth

Every backend samples the same N images from the same initial noise (per-image seeds, eta = 0), so
differences between backends are the backends' own. Scores use one feature extractor:
``classifier`` (the shipped Fashion-MNIST CNN: "FD-classifier", not comparable with published FIDs) or
``inception`` (pytorch-fid's InceptionV3 pool3, the standard FID; needs the ``fid`` extra and the
weights). The reference is the model's training split; the real-vs-real baseline scores N images of
the held-out split against it, so it carries the same small-sample bias as the models' rows.
Writes benchmarks/results/fid-DATE-HOST.{json,md} plus a plot of score against steps and against
images/s (one curve per backend and solver: pick the operating point there) and a PNG grid
of the same-noise samples of every backend side by side.
"""

from __future__ import annotations

import platform
import socket
import sys
import tempfile
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, cpu_name, pyplot, save_figure, write_report  # noqa: E402
from quality import (  # noqa: E402
    FeatureExtractor, feature_stats, frechet_distance, kernel_inception_distance, make_extractor, max_abs_diff, psnr,
)
from runtime.api import Sampler  # noqa: E402
from runtime.choices import Device, Solver, values  # noqa: E402
from runtime.clitools import friendly_errors  # noqa: E402
from runtime.config import ModelSpec  # noqa: E402
from runtime.images import make_grid  # noqa: E402
from runtime.shipped import SHIPPED_MODEL  # noqa: E402
from trainer.config import RunConfig, Split  # noqa: E402
from trainer.data import model_split_images  # noqa: E402
from trainer.rundir import load_model, read_spec  # noqa: E402

EAGER = "eager fp32"
BACKENDS = ("eager", "onnxruntime", "onnxruntime-fp16", "onnxruntime-int8")


def open_backends(names: tuple[str, ...], model_dir: Path, export_dir: Path, device: str) -> dict[str, Sampler]:
    """label -> Sampler; eager PyTorch first (the reference every other backend is compared with)."""
    from runtime.backends.ort_backend import OrtBackend
    from trainer.torch_backend import TorchBackend

    out = {}
    if "eager" in names:
        module, spec = load_model(model_dir)
        out[EAGER] = Sampler(TorchBackend(model=module, spec=spec, device=device))
    for name in names:
        if name == "eager":
            continue
        precision = {"onnxruntime": "fp32", "onnxruntime-fp16": "fp16", "onnxruntime-int8": "int8"}[name]
        out[f"onnxruntime cpu {precision}"] = Sampler(OrtBackend(export_dir, "cpu", precision))
    return out


def make_export(model_dir: Path, folder: Path, names: tuple[str, ...], data_path: Path | None,
                classifier: Path | None = None) -> Path:
    """The ONNX files users get, written by the exporter itself (with its parity and quality gates)."""
    from export.int8 import GateOptions
    from export.pipeline import ExportOptions, export_run

    out = folder / "export"
    # The INT8 file is calibrated as ddim-export does; its gate is relaxed here: this script measures quality.
    relaxed = GateOptions(images=4, steps=10, min_psnr_db=float("-inf"), max_fd_ratio=float("inf"),
                          classifier=str(classifier) if classifier is not None else None)
    export_run(model_dir, out, ExportOptions(fp16="onnxruntime-fp16" in names, int8="onnxruntime-int8" in names,
                                             data_path=data_path, int8_gate=relaxed))
    return out


def reference_images(spec: ModelSpec, split: Split, data_path: Path | None) -> NDArray[np.uint8]:
    """The model's dataset (its own data config), as (N, H, W, C) uint8."""
    return model_split_images(spec, split, data_path).transpose(0, 2, 3, 1)


def scores(ext: FeatureExtractor, feats: NDArray[np.float64], ref_stats: Any, ref_feats: NDArray[np.float64],
           kid_subset: int) -> dict[str, float]:
    kid, kid_std = kernel_inception_distance(feats, ref_feats, subsets=50, subset_size=kid_subset)
    return {"fd_data": frechet_distance(feature_stats(feats), ref_stats), "kid": kid, "kid_std": kid_std}


def run(model_dir: Path, spec: ModelSpec, export_dir: Path | None, names: tuple[str, ...], steps_list: list[int],
        n: int, batch_size: int, seed: int, extractor: str, inception_weights: Path | None, classifier: Path | None,
        data_path: Path | None, reference_size: int | None, device: str, grid_steps: int,
        solvers: tuple[str, ...] = ("ddim",)) -> tuple[list[dict[str, Any]], dict[int, dict[str, NDArray[np.uint8]]]]:
    source = RunConfig.from_spec(spec).data.source
    ext = make_extractor(extractor, inception_weights, classifier, device=device)
    ref = reference_images(spec, "train", data_path)
    if reference_size is not None and reference_size < len(ref):
        ref = ref[np.random.default_rng(seed + 1).choice(len(ref), reference_size, replace=False)]
    click.echo(f"  reference: {len(ref)} images of the {source} training split; features: "
               f"{ext.score_name}", err=True)
    ref_feats = ext.features(ref)
    ref_stats = feature_stats(ref_feats)
    kid_subset = min(1000, n)
    held_out = reference_images(spec, "val", data_path)
    pick = np.random.default_rng(seed).choice(len(held_out), min(n, len(held_out)), replace=False)
    base = {"model": str(model_dir), "extractor": ext.score_name, "n": len(pick)}
    rows = [{**base, "backend": "real (held-out split)", "solver": "-", "steps": 0,
             **scores(ext, ext.features(held_out[pick]), ref_stats, ref_feats, kid_subset)}]
    click.echo(f"  real vs real: {ext.score_name} {rows[0]['fd_data']:.3f} ({len(pick)} held-out images vs "
               f"{len(ref)} training images)", err=True)
    grids: dict[int, dict[str, NDArray[np.uint8]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = export_dir or make_export(model_dir, Path(tmp), names, data_path, classifier)
        samplers = open_backends(names, model_dir, export_dir, device)
        for solver, steps in ((s, k) for s in solvers for k in steps_list):
            eager_images: NDArray[np.uint8] | None = None
            eager_feats: NDArray[np.float64] | None = None
            for label, sampler in samplers.items():
                result = sampler.sample(n, steps=steps, seed=seed, batch_size=batch_size, solver=solver)
                images = result.images
                feats = ext.features(images)
                row = {**base, "n": n, "backend": label, "solver": solver, "steps": steps,
                       "seconds": result.seconds, "images_per_s": n / result.seconds,
                       **scores(ext, feats, ref_stats, ref_feats, kid_subset)}
                if label == EAGER:
                    eager_images, eager_feats = images, feats
                elif eager_images is not None and eager_feats is not None:
                    row.update(fd_vs_eager=frechet_distance(feature_stats(feats), feature_stats(eager_feats)),
                               psnr_vs_eager=psnr(images, eager_images),
                               max_abs_diff_vs_eager=max_abs_diff(images, eager_images),
                               pixels_off_by_more_than_1=float((np.abs(images.astype(np.int16) - eager_images) > 1)
                                                               .mean()))
                rows.append(row)
                if steps == grid_steps:
                    grids.setdefault(steps, {})[label if len(solvers) == 1 else f"{label}, {solver}"] = images[:16]
                click.echo(f"  {label:24s} {solver:8s} {steps:4d} steps: {ext.score_name} {row['fd_data']:8.3f}  "
                           f"KID {row['kid']:.4f}  {row['images_per_s']:6.1f} images/s"
                           + (f"  PSNR vs eager {row['psnr_vs_eager']:.1f} dB, max diff {row['max_abs_diff_vs_eager']}"
                              if "psnr_vs_eager" in row else ""), err=True)
    return rows, grids


def environment(device: str) -> dict[str, Any]:
    import onnxruntime as ort

    return {"host": socket.gethostname(), "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else ("inf" if v == float("inf") else format(v, spec))


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Sample quality ({env['cpu']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
             f"{env['device']})", "",
             "Same initial noise for every backend (eta = 0). `FD-classifier` uses the shipped Fashion-MNIST "
             "classifier's features and is not comparable with published FIDs. KID: mean ± std over 50 subsets. "
             "The real row scores "
             "held-out images against the training split with the same N.", "",
             "| model | features | backend | solver | steps | N | score vs data | KID vs data | score vs eager "
             "| PSNR vs eager | max diff | pixels off > 1 | images/s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        steps = "-" if r["steps"] == 0 else r["steps"]
        off = r.get("pixels_off_by_more_than_1")
        lines.append(
            f"| {Path(r['model']).name} | {r['extractor']} | {r['backend']} | {r.get('solver', 'ddim')} | {steps} | "
            f"{r['n']} | "
            f"{r['fd_data']:.3f} | "
            f"{r['kid']:.3g} ± {r['kid_std']:.2g} | {_fmt(r.get('fd_vs_eager'), '.4f')} | "
            f"{_fmt(r.get('psnr_vs_eager'), '.1f')} | {_fmt(r.get('max_abs_diff_vs_eager'), 'd')} | "
            f"{'' if off is None else f'{100 * off:.3f}%'} | {_fmt(r.get('images_per_s'), '.1f')} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Score against steps, and score against images/s (the operating points), one curve per backend and
    solver; the real-vs-real baseline as a line in both."""
    plt = pyplot()
    fig, (ax_q, ax_s) = plt.subplots(1, 2, figsize=(11, 4))
    sampled = [r for r in rows if r["steps"] > 0]
    for backend, solver in sorted({(r["backend"], r.get("solver", "ddim")) for r in sampled}):
        pts = sorted((r["steps"], r["fd_data"], r["images_per_s"]) for r in sampled
                     if r["backend"] == backend and r.get("solver", "ddim") == solver)
        label = f"{backend}, {solver}"
        ax_q.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax_s.plot([p[2] for p in pts], [p[1] for p in pts], marker="o", label=label)
        for steps, fd, speed in pts:
            ax_s.annotate(str(steps), (speed, fd), fontsize=6, xytext=(2, 2), textcoords="offset points")
    for r in rows:
        if r["steps"] == 0:
            for ax in (ax_q, ax_s):
                ax.axhline(r["fd_data"], color="grey", ls="--", lw=1, label=f"real vs real (N={r['n']})")
    name = rows[0]["extractor"] if rows else "score"
    ax_q.set(title=f"{name} against the training split", xlabel="sampling steps", ylabel=name, xscale="log")
    ax_s.set(title="quality per speed (points: steps)", xlabel="images/s", ylabel=name, xscale="log")
    for ax in (ax_q, ax_s):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def comparison_grid(panels: dict[str, NDArray[np.uint8]], path: Path, scale: int = 3) -> None:
    """The same-noise samples of every backend side by side, each panel titled, plus |backend - eager| x 10."""
    from PIL import Image, ImageDraw

    labelled = dict(panels)
    reference = panels.get(EAGER)
    if reference is not None:
        for label, imgs in panels.items():
            if label != EAGER:
                diff = np.clip(np.abs(imgs.astype(np.int16) - reference) * 10, 0, 255).astype(np.uint8)
                labelled[f"|{label} - eager| x10"] = diff
    tiles = [Image.fromarray(make_grid(imgs, 4).squeeze()).resize(
        (make_grid(imgs, 4).shape[1] * scale, make_grid(imgs, 4).shape[0] * scale), Image.NEAREST) for imgs in
        labelled.values()]
    w, h, top, gap = max(t.width for t in tiles), max(t.height for t in tiles), 18, 8
    canvas = Image.new("RGB", (len(tiles) * (w + gap) - gap, h + top), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (label, tile) in enumerate(zip(labelled, tiles)):
        canvas.paste(tile.convert("RGB"), (i * (w + gap), top))
        draw.text((i * (w + gap) + 2, 3), label, fill="black")
    canvas.save(path)


@click.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="A trainer run directory or shipped model folder [default: models/fashion-mnist].")
@click.option("--export", "export_dir", type=click.Path(path_type=Path), default=None,
              help="Score these exported files [default: export the model into a temporary folder].")
@click.option("--backend", "backends", type=click.Choice(BACKENDS), multiple=True,
              help="Backends besides eager PyTorch [default: onnxruntime and onnxruntime-int8].")
@click.option("--eager/--no-eager", default=True, show_default=True,
              help="Sample with eager PyTorch too: the reference of the parity columns.")
@click.option("--steps", "steps_list", type=click.IntRange(min=1), multiple=True, help="[default: 10 20 50 100]")
@click.option("--num-images", "n", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--extractor", type=click.Choice(["classifier", "inception"]), default=None,
              help="[default: classifier for Fashion-MNIST models, else inception]")
@click.option("--inception-weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="pt_inception-2015-12-05-6726825d.pth, for machines without internet.")
@click.option("--classifier", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Classifier folder for the FD-classifier [default: models/fashion-mnist-classifier].")
@click.option("--reference-size", type=click.IntRange(min=2), default=None,
              help="Score against this many training images, drawn at random [default: all].")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="Where the model's dataset lies [default: where the trainer finds it].")
@click.option("--device", type=click.Choice(values(Device)), default=None, help="[default: cuda when available]")
@click.option("--solver", "solvers", type=click.Choice(values(Solver)), multiple=True,
              help="Solvers to sweep (repeat the option) [default: ddim].")
@click.option("--quick", is_flag=True, help="Smoke test: 64 images, 10 and 20 steps.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@friendly_errors
def main(model_dir: Path | None, export_dir: Path | None, backends: tuple[str, ...], steps_list: tuple[int, ...],
         eager: bool, n: int, batch_size: int, seed: int, extractor: str | None, inception_weights: Path | None,
         classifier: Path | None, reference_size: int | None, data_path: Path | None, device: str | None,
         solvers: tuple[str, ...], quick: bool, out: Path) -> None:
    """Score the samples of every backend and write JSON, Markdown, a plot and a comparison grid."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = model_dir or SHIPPED_MODEL
    names = ("eager",) * eager + tuple(b for b in (backends or ("onnxruntime", "onnxruntime-int8")) if b != "eager")
    if quick:
        n, steps_list = min(n, 64), steps_list or (10, 20)
    steps = sorted(set(steps_list or (10, 20, 50, 100)))
    spec = read_spec(model_dir)
    if extractor is None:
        fashion = RunConfig.from_spec(spec).data.source == "fashion-mnist"
        extractor = "classifier" if fashion else "inception"
    grid_steps = 50 if 50 in steps else steps[-1]
    click.echo(f"fid: {model_dir}, backends {', '.join(names)}, {n} images, steps {steps}, {extractor} features",
               err=True)
    rows, grids = run(model_dir, spec, export_dir, names, steps, n, batch_size, seed, extractor, inception_weights,
                      classifier, data_path, reference_size, device, grid_steps, solvers or ("ddim",))
    env = environment(device)
    _, stem = write_report("fid", out, env, rows, ("model", "extractor", "backend", "solver", "steps", "n"), markdown,
                           plot)
    comparison_grid(grids[grid_steps], Path(f"{stem}-samples-{grid_steps}-steps.png"))
    click.echo(f"wrote {stem}.json, .md, .png and -samples-{grid_steps}-steps.png")


if __name__ == "__main__":
    main()
