"""INT8 options side by side: speed on the keras-flowers architecture against quality on the
Fashion-MNIST model, for each choice of what stays float32, calibration set and range method.

    python benchmarks/int8_tradeoff.py                      # the shipped model, 500 samples, 50 steps
    python benchmarks/int8_tradeoff.py --num-images 64 --batch 8 --out /tmp/x     # a quick look

For every option: ``model.int8.onnx`` is written as ``ddim-export --int8`` would (same calibration
code), then (1) the speed-up of one forward over ONNX Runtime float32 at ``--batch`` on the
keras-flowers architecture (initial weights, calibrated on its own sampling trajectories: speed
does not depend on the weights' values), and (2) for the Fashion-MNIST model, N samples from the
same noise as the float32 ONNX file: same-noise PSNR and the FD-classifier against the training
split, next to float32's. Writes benchmarks/results/int8-tradeoff-DATE-HOST.{json,md,png}.
"""

from __future__ import annotations

import dataclasses
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, cpu_name, pyplot, report_stem, save_figure, write_json  # noqa: E402
from benchmarks.latency import forward_inputs, load_subject, ort_export, timed  # noqa: E402
from export.io_spec import input_names_of  # noqa: E402
from export.int8 import Int8Options, quantize_int8  # noqa: E402
from quality import (  # noqa: E402
    ClassifierFeatures, feature_stats, frechet_distance, max_abs_diff, psnr, reference_stats,
)
from runtime.settings import SamplingSettings  # noqa: E402
from runtime.exportdir import FP32_ONNX, INT8_ONNX  # noqa: E402
from runtime.api import Sampler  # noqa: E402
from runtime.backends.ort_backend import OrtBackend  # noqa: E402
from runtime.common.clitools import friendly_errors  # noqa: E402
from runtime.common.shipped import SHIPPED_MODEL  # noqa: E402
from trainer.data import model_split_images  # noqa: E402

_8BIT = Int8Options(reduce_range=False)
OPTIONS: dict[str, Int8Options] = {
    "8-bit weights, everything int8": dataclasses.replace(_8BIT, keep_float=()),
    "8-bit weights, embedding float32": dataclasses.replace(_8BIT, keep_float=("embedding",)),
    "8-bit weights, embedding + first/last conv float32": _8BIT,
    "8-bit weights, ... + percentile ranges": dataclasses.replace(_8BIT, method="percentile"),
    "8-bit weights, ... calibrated on noised data only": dataclasses.replace(_8BIT, calibration="data"),
    "8-bit weights, ... calibrated on sampler trajectories only": dataclasses.replace(_8BIT, calibration="sampler"),
    "8-bit weights, convolutions only": dataclasses.replace(_8BIT, op_types=("Conv",)),
    "7-bit weights, embedding + first/last conv float32 (default)": Int8Options(),
    "7-bit weights, ... + percentile ranges": Int8Options(method="percentile"),
    "7-bit weights, convolutions only": Int8Options(op_types=("Conv",)),
}
# Labels of earlier reports (same configurations) -> the labels above.
RENAMED = {
    "everything int8": "8-bit weights, everything int8",
    "embedding float32": "8-bit weights, embedding float32",
    "embedding + first/last conv float32 (default)": "8-bit weights, embedding + first/last conv float32",
    "default, percentile ranges": "8-bit weights, ... + percentile ranges",
    "default, calibrated on noised data only": "8-bit weights, ... calibrated on noised data only",
    "default, calibrated on sampler trajectories only": "8-bit weights, ... calibrated on sampler trajectories only",
    "convolutions only": "8-bit weights, convolutions only",
    "default, 7-bit weights (reduce_range)": "7-bit weights, embedding + first/last conv float32 (default)",
    "default, 7-bit weights, percentile ranges": "7-bit weights, ... + percentile ranges",
    "convolutions only, 7-bit weights": "7-bit weights, convolutions only",
}


def forward_speedup(folder: Path, opts: Int8Options, batch: int, repeats: int) -> tuple[float, float]:
    """(float32 ms, INT8 ms) of one forward at ``batch`` for the model in ``folder``/model.onnx."""
    spec = OrtBackend(folder, "cpu").spec
    quantize_int8(folder / FP32_ONNX, folder / INT8_ONNX, spec, lambda: None,  # type: ignore[arg-type]
                  dataclasses.replace(opts, calibration="sampler", calibration_size=128))
    x, cond = forward_inputs(spec, batch, np.random.default_rng(0))
    feed = dict(zip(input_names_of(spec.model), (x, cond)))
    out = []
    for precision in ("fp32", "int8"):
        session = OrtBackend(folder, "cpu", precision).session
        out.append(timed(lambda s=session: s.run(None, feed), "cpu", 3, repeats)["median_s"] * 1e3)
    return out[0], out[1]


@click.command()
@click.option("--model", "model_dir", type=click.Path(path_type=Path), default=SHIPPED_MODEL, show_default=True)
@click.option("--option", "names", type=click.Choice(list(OPTIONS)), multiple=True, help="[default: all]")
@click.option("--num-images", "n", type=click.IntRange(min=2), default=500, show_default=True)
@click.option("--steps", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--batch", type=click.IntRange(min=1), default=8, show_default=True, help="Forward batch timed.")
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True)
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None)
@click.option("--classifier", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Classifier folder of the FD-classifier [default: the shipped one].")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@friendly_errors
def main(model_dir: Path, names: tuple[str, ...], n: int, steps: int, batch: int, repeats: int,
         data_path: Path | None, classifier: Path | None, out: Path) -> None:
    """Speed against quality for each INT8 option; JSON, Markdown and a scatter plot."""
    import onnxruntime as ort

    names = names or tuple(OPTIONS)
    click.echo(f"int8-tradeoff: {model_dir} ({n} images x {steps} steps) and keras-flowers (batch {batch}); "
               f"{len(names)} options", err=True)
    subject, flowers = load_subject(str(model_dir)), load_subject("keras-flowers")
    images = model_split_images(subject.spec, "train", data_path)
    ext = ClassifierFeatures(classifier)
    ref = reference_stats(ext, images)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for sub in ("fm", "fl"):
            (Path(tmp) / sub).mkdir()
        fm_dir, fl_dir = ort_export(subject, Path(tmp) / "fm", False), ort_export(flowers, Path(tmp) / "fl", False)
        base = Sampler(OrtBackend(fm_dir, "cpu")).sample(n, SamplingSettings(steps), seed=0, batch_size=50).images
        fd_fp32 = frechet_distance(feature_stats(ext.features(base)), ref)
        click.echo(f"  float32: FD-classifier {fd_fp32:.3f}", err=True)
        for name in names:
            opts = OPTIONS[name]
            start = time.perf_counter()
            quantize_int8(fm_dir / FP32_ONNX, fm_dir / INT8_ONNX, subject.spec, lambda: images, opts)
            seconds = time.perf_counter() - start
            got = Sampler(OrtBackend(fm_dir, "cpu", "int8")).sample(n, SamplingSettings(steps), seed=0,
                                                                batch_size=50).images
            fd = frechet_distance(feature_stats(ext.features(got)), ref)
            fp32_ms, int8_ms = forward_speedup(fl_dir, opts, batch, repeats)
            rows.append({"option": name, "n": n, "steps": steps, "fd_int8": fd, "fd_fp32": fd_fp32,
                         "fd_ratio": fd / fd_fp32, "psnr_vs_fp32": psnr(got, base),
                         "max_abs_diff_vs_fp32": max_abs_diff(got, base), "quantize_seconds": seconds,
                         "flowers_batch": batch, "flowers_fp32_ms": fp32_ms, "flowers_int8_ms": int8_ms,
                         "speedup": fp32_ms / int8_ms})
            r = rows[-1]
            click.echo(f"  {name:50s} FD {fd:7.3f} ({r['fd_ratio']:.3f}x)  PSNR {r['psnr_vs_fp32']:5.1f} dB  "
                       f"speed-up {r['speedup']:.2f}x", err=True)
    env = {"cpu": cpu_name(), "onnxruntime": ort.__version__}
    stem = report_stem("int8-tradeoff")
    out.mkdir(parents=True, exist_ok=True)
    rows = write_json(out / f"{stem}.json", env, rows, ("option", "n", "steps"))
    for r in rows:
        r["option"] = RENAMED.get(r["option"], r["option"])
    click.echo(report(env, rows, out / stem))
    click.echo(f"wrote {out / stem}.json, .md and .png")


def report(env: dict[str, Any], rows: list[dict[str, Any]], stem: Path) -> str:
    """Markdown table and scatter plot of ``rows``; returns the Markdown."""
    md = [f"# INT8 options: speed against quality ({env['cpu']}, onnxruntime {env['onnxruntime']})", "",
          "Speed: one forward of the keras-flowers architecture, ONNX Runtime CPU INT8 vs float32. Quality: the "
          "Fashion-MNIST model's samples from the same noise as float32 ONNX; FD-classifier against 10,000 "
          "training images.", "",
          "| option | FD-classifier INT8 | float32 | ratio | PSNR vs float32 | max diff | flowers fp32 ms | INT8 ms "
          "| speed-up |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    md += [f"| {r['option']} | {r['fd_int8']:.3f} | {r['fd_fp32']:.3f} | {r['fd_ratio']:.3f} | "
           f"{r['psnr_vs_fp32']:.1f} dB | {r['max_abs_diff_vs_fp32']} | {r['flowers_fp32_ms']:.1f} | "
           f"{r['flowers_int8_ms']:.1f} | {r['speedup']:.2f}x |" for r in rows]
    stem.with_suffix(".md").write_text("\n".join(md) + "\n")
    plot(rows, stem.with_suffix(".png"))
    return "\n".join(md)


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ax.scatter(r["speedup"], r["fd_ratio"], s=40)
        ax.annotate(r["option"], (r["speedup"], r["fd_ratio"]), fontsize=6, xytext=(4, 3), textcoords="offset points")
    ax.axhline(1.1, color="grey", ls="--", lw=1, label="FD-classifier target: within 10% of float32")
    ax.axvline(1.5, color="grey", ls=":", lw=1, label="speed target: 1.5x")
    ax.set(xlabel="speed-up over ONNX Runtime float32 (keras-flowers, one forward)",
           ylabel="FD-classifier INT8 / float32 (fashion-mnist)", title="INT8 options", yscale="log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_figure(fig, path)


if __name__ == "__main__":
    main()
