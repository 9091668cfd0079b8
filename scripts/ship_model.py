"""Turn a finished trainer run into the shipped model folder (``models/fashion-mnist/`` by default).

    .venv/bin/python scripts/ship_model.py runs/fm-ship

Writes, all small enough for the repository:
  model.safetensors   the EMA weights only (what every command samples with; keys ``ema.*``)
  config.json         the run's config, unchanged (schema-versioned; the trainer and runtime read it)
  model.onnx          the deployed float32 ONNX, written by the exporter itself (BatchNorm folded, config
                      inside, parity gate), so ``ddim-run`` samples the shipped model with nothing but the runtime
  model.int8.onnx, export_report.json   with --int8: the INT8 file and the report of its gates (ONNX Runtime INT8,
                      OpenVINO int8/bf16/fp32) and of every gated pair's timing on the shipping host, so
                      ``ddim-run --backend auto`` picks the fastest gated engine and precision on each host
  samples.png         64 images, 50 DDIM steps, seed 0, sampled by the runtime on that ONNX file
  loss.csv, loss.png, train.log   the training log and loss curve
  fd_by_step.{json,md,png}        FD-classifier along training, when the run has them
                                  (``benchmarks/fd_by_step.py RUN_DIR``)
OUT/README.md, the model card, is written by hand: it is carried over unchanged, and its figures are yours to update.
OUT is replaced as a whole (staged beside it, then one rename): a failure leaves the old folder untouched.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from export.pipeline import ExportOptions, export_run  # noqa: E402
from runtime.settings import SamplingSettings
from runtime.exportdir import FP32_ONNX, INT8_ONNX, REPORT
from runtime.api import load  # noqa: E402
from runtime.common.clitools import friendly_errors  # noqa: E402
from runtime.common.files import replace_dir  # noqa: E402
from runtime.images import grid_scale, save_grid  # noqa: E402
from runtime.common.shipped import SHIPPED_MODEL  # noqa: E402
from trainer.rundir import CONFIG, WEIGHTS, load_weights  # noqa: E402


@click.command()
@click.argument("run_dir", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.option("--out", type=click.Path(path_type=Path), default=SHIPPED_MODEL, show_default=True)
@click.option("--int8/--no-int8", default=False, show_default=True,
              help="Also ship model.int8.onnx and export_report.json (ddim-export --int8: its gates and timings).")
@click.option("--data", type=click.Path(path_type=Path, exists=True), default=None,
              help="The INT8 calibration and gate data [default: the run's dataset where ddim-export finds it].")
@friendly_errors
def main(run_dir: Path, out: Path, int8: bool, data: Path | None) -> None:
    """Ship RUN_DIR's EMA weights, config, ONNX, sample grid and training log into OUT."""
    click.echo(f"ship: {run_dir} -> {out}", err=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Everything is written into a staging folder beside OUT and swapped in by one rename at the end, so a
    # failed parity gate or an interrupt leaves the shipped folder as it was (weights, ONNX and grid together).
    # The staged folder carries OUT's name: the export records it as the ONNX file's source.
    holder = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.staging-"))
    try:
        stage = holder / out.name
        stage.mkdir()
        build(run_dir, out, stage, int8, data)
        replace_dir(stage, out)
    finally:
        shutil.rmtree(holder, ignore_errors=True)
    for path in sorted(out.iterdir()):
        click.echo(f"  {path.name:20s} {path.stat().st_size:>10,} bytes", err=True)
    if (out / "README.md").is_file():
        click.echo("  README.md kept as it was: the card is written by hand, bring its figures up to date", err=True)


def build(run_dir: Path, out: Path, stage: Path, int8: bool = False, data: Path | None = None) -> None:
    from safetensors.torch import save_file

    tensors = {k: v for k, v in load_weights(run_dir / WEIGHTS).items() if k.startswith("ema.")}
    meta = {"format": "ddim-deploy", "weights": "ema", "source_run": run_dir.name}
    save_file(tensors, stage / WEIGHTS, metadata=meta)
    for name in (CONFIG, "loss.csv", "loss.png", "train.log", "fd_by_step.json", "fd_by_step.md", "fd_by_step.png"):
        if (run_dir / name).is_file():
            shutil.copyfile(run_dir / name, stage / name)
    if (out / "README.md").is_file():
        shutil.copyfile(out / "README.md", stage / "README.md")
    # The shipped folder is exported as ddim-export would (parity gate included) into the staging holder beside
    # it, and its model.onnx kept.
    export = stage.parent / "export"
    report = export_run(stage, export, ExportOptions(int8=int8, data_path=data))
    click.echo(f"  {report.parity[0].line()}", err=True)
    os.replace(export / FP32_ONNX, stage / FP32_ONNX)
    if int8:
        os.replace(export / INT8_ONNX, stage / INT8_ONNX)
        # The report travels with the files it gated; where they were exported from is the shipped folder's name,
        # not this machine's staging path.
        body = json.loads((export / REPORT).read_text())
        body["source"]["folder"] = out.name
        (stage / REPORT).write_text(json.dumps(body, indent=2) + "\n")
    result = load(stage / FP32_ONNX, "onnxruntime", "cpu").sample(64, SamplingSettings(50), seed=0)
    save_grid(stage / "samples.png", result.images, scale=grid_scale(result.images.shape[1], 64))


if __name__ == "__main__":
    main()
