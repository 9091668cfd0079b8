"""Sample quality along a training run: FD-classifier (or FID) of each checkpoint's EMA weights.

    python benchmarks/fd_by_step.py runs/fm-long                       # the run's kept checkpoints
    python benchmarks/fd_by_step.py runs/fm-long snaps/step-*.safetensors --out models/fashion-mnist

Every checkpoint samples the same N images (per-image seeds, eta = 0, DDIM, 20 steps by default) with eager
PyTorch and is scored as ``benchmarks/fid.py`` scores a backend (FD-classifier against the training split, FID
against the held-out one). A
weight file's training step is read from its name (``step-0003000/model.safetensors`` or
``step-3000.safetensors``). Results accumulate: a step already in ``OUT/fd_by_step.json`` (same N, steps,
solver, seed and extractor) is not sampled again, so the script can follow a run that is still training.
Writes ``OUT/fd_by_step.{json,md,png}``: the score against the training step with the real-vs-real baseline.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.fid import environment, reference_images  # noqa: E402
from benchmarks.common import pyplot, save_figure  # noqa: E402
from quality import feature_stats, frechet_distance, make_extractor  # noqa: E402
from quality.statscache import cached_features  # noqa: E402
from runtime.settings import SamplingSettings  # noqa: E402
from runtime.api import Sampler  # noqa: E402
from runtime.choices import Solver, values  # noqa: E402
from runtime.common.clitools import friendly_errors  # noqa: E402
from trainer.config import RunConfig  # noqa: E402
from trainer.models import build_model  # noqa: E402
from trainer.rundir import WEIGHTS, load_state_dicts, load_weights, read_spec, step_dirs  # noqa: E402
from trainer.torch_backend import TorchBackend  # noqa: E402

STEP_IN_NAME = re.compile(r"step-0*(\d+)")
STEM = "fd_by_step"


def step_of(path: Path) -> int:
    """The training step a weight file belongs to, from its own or its folder's name."""
    for part in (path.stem, path.parent.name):
        if m := STEP_IN_NAME.fullmatch(part):
            return int(m.group(1))
    raise click.BadParameter(f"{path}: no training step in its name (expected step-N.safetensors or "
                             f"step-N/{WEIGHTS})", param_hint="WEIGHTS")


def weight_files(run_dir: Path, given: tuple[Path, ...]) -> dict[int, Path]:
    """step -> weight file: the files given (folders mean their model.safetensors), else the run's checkpoints."""
    files = [p / WEIGHTS if p.is_dir() else p for p in given] or [d / WEIGHTS for _, d in step_dirs(run_dir)]
    out = {}
    for path in files:
        if not path.is_file():
            raise click.BadParameter(f"{path} is not a file", param_hint="WEIGHTS")
        out[step_of(path)] = path
    return dict(sorted(out.items()))


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    env = meta["environment"]
    lines = [f"# {meta['extractor']} along training ({Path(meta['run']).name})", "",
             f"{meta['n']} samples per checkpoint (EMA weights, eager PyTorch on {env['cpu']}), {meta['solver']}, "
             f"{meta['steps']} steps, eta 0, seed {meta['seed']}, against the "
             f"{'held-out' if meta.get('reference') == 'val' else 'training'} split; real vs real "
             f"(N = {meta['n']} images of the other split): {meta['real']:.3f}.", "",
             f"| training step | epoch | {meta['extractor']} |", "|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['step']:,} | {r['epoch']:.1f} | {r['fd_data']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(meta: dict[str, Any], rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([r["step"] for r in rows], [r["fd_data"] for r in rows], marker="o", label="EMA weights")
    ax.axhline(meta["real"], color="grey", ls="--", lw=1, label=f"real vs real (N={meta['n']})")
    ax.set(title=f"{meta['extractor']} along training ({meta['solver']}, {meta['steps']} steps, N={meta['n']})",
           xlabel="training step", ylabel=meta["extractor"], yscale="log")
    from matplotlib.ticker import FormatStrFormatter

    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FormatStrFormatter("%g"))  # plain numbers on the log axis, not 4 x 10^1
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    save_figure(fig, path)


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("weights", nargs=-1, type=click.Path(path_type=Path, exists=True))
@click.option("--num-images", "n", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=20, show_default=True, help="Sampling steps.")
@click.option("--solver", type=click.Choice(values(Solver)), default="ddim", show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--extractor", type=click.Choice(["classifier", "inception"]), default=None,
              help="[default: classifier for Fashion-MNIST runs, else inception]")
@click.option("--inception-weights", type=click.Path(path_type=Path, dir_okay=False), default=None)
@click.option("--classifier", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Classifier folder for the FD-classifier [default: models/fashion-mnist-classifier].")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="Where the run's dataset lies [default: where the trainer finds it].")
@click.option("--out", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Folder of the report [default: RUN_DIR].")
@friendly_errors
def main(run_dir: Path, weights: tuple[Path, ...], n: int, steps: int, solver: str, batch_size: int, seed: int,
         extractor: str | None, inception_weights: Path | None, classifier: Path | None, data_path: Path | None,
         out: Path | None) -> None:
    """Score every checkpoint of RUN_DIR (or the WEIGHTS files given) and plot the score against the step."""
    out = out or run_dir
    spec = read_spec(run_dir)
    cfg = RunConfig.from_spec(spec)
    files = weight_files(run_dir, weights)
    if not files:
        raise click.UsageError(f"{run_dir} has no checkpoints and no WEIGHTS were given")
    # FD-classifier by default for Fashion-MNIST runs: a training run is followed often, and FID's network costs
    # about 30x the classifier's per image; --extractor inception scores FID as benchmarks/fid.py does.
    extractor = extractor or ("classifier" if cfg.data.source == "fashion-mnist" else "inception")
    ext = make_extractor(extractor, inception_weights, classifier, device="cpu")
    # As benchmarks/fid.py: FID against the held-out split (its features cached), FD-classifier against training.
    ref_split, other = ("val", "train") if extractor == "inception" else ("train", "val")
    ref = reference_images(spec, ref_split, data_path)
    ref_stats = feature_stats(cached_features(ext, ref))
    held_out = reference_images(spec, other, data_path)
    pick = np.random.default_rng(seed).choice(len(held_out), min(n, len(held_out)), replace=False)
    meta = {"run": str(run_dir), "extractor": ext.score_name, "identity": getattr(ext, "identity", ext.name), "n": n,
            "steps": steps, "solver": solver, "seed": seed,
            "batch_size_trained": cfg.train.batch_size, "reference": ref_split,
            "images_per_epoch": len(reference_images(spec, "train", data_path)) if ref_split == "val" else len(ref),
            "real": frechet_distance(feature_stats(ext.features(held_out[pick])), ref_stats),
            "environment": environment("cpu")}
    path = out / f"{STEM}.json"
    same = ("extractor", "identity", "reference", "n", "steps", "solver", "seed")  # else scored anew
    rows: list[dict[str, Any]] = []
    if path.is_file():
        old = json.loads(path.read_text())
        if all(old.get("meta", {}).get(k) == meta[k] for k in same):
            rows = old["results"]
    done = {r["step"] for r in rows}
    click.echo(f"fd_by_step: {run_dir}, {len(files)} checkpoints ({len(set(files) - done)} to score), {n} images, "
               f"{solver} {steps} steps; real vs real {meta['real']:.3f}", err=True)
    model = build_model(spec.model)
    for step, file in files.items():
        if step in done:
            continue
        load_state_dicts(model, load_weights(file), "ema", file)
        sampler = Sampler(TorchBackend(model=model.eval(), spec=spec, device="cpu"))
        result = sampler.sample(n, SamplingSettings(steps, solver=solver), seed=seed, batch_size=batch_size)
        fd = frechet_distance(feature_stats(ext.features(result.images)), ref_stats)
        rows.append({"step": step, "epoch": step * cfg.train.batch_size / meta["images_per_epoch"], "fd_data": fd,
                     "weights": str(file), "seconds": result.seconds})
        rows.sort(key=lambda r: r["step"])
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")
        click.echo(f"  step {step:7,d}: {ext.score_name} {fd:8.3f}  ({result.seconds:.0f} s)", err=True)
    (out / f"{STEM}.md").write_text(markdown(meta, rows))
    plot(meta, rows, out / f"{STEM}.png")
    click.echo(markdown(meta, rows))
    click.echo(f"wrote {out / STEM}.json, .md and .png")


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
