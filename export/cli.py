"""``ddim-export``: a trainer run directory to ONNX / FP16 ONNX / TensorRT files, behind a parity gate."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from runtime.clitools import friendly_errors, size_limit_options
from runtime.shipped import pick

log = logging.getLogger("export")


def latest_run(root: Path = Path("runs")) -> Path | None:
    """The most recently written run directory under ``root`` (by its config.json), if any."""
    # Hidden names are staging or lock files, never a run.
    configs = [p for p in root.glob("*/config.json") if p.is_file() and not p.parent.name.startswith(".")] \
        if root.is_dir() else []
    return max(configs, key=lambda p: p.stat().st_mtime).parent if configs else None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), help="Export directory [default: exports/RUN_NAME].")
@click.option("--fp16", is_flag=True, help="Also write model.fp16.onnx, and model.plan where TensorRT and a GPU exist.")
@click.option("--raw-weights", is_flag=True, help="Export the raw weights instead of the EMA weights.")
@click.option("--force", is_flag=True, help="Replace an earlier export in --out (a default --out is replaced "
              "anyway); run directories, other folders and files are never replaced.")
@click.option("--require-engine", is_flag=True, help="Fail when the TensorRT engine cannot be built here.")
@click.option("--min-batch", type=click.IntRange(min=1), default=1, show_default=True, help="TensorRT profile: smallest batch.")
@click.option("--opt-batch", type=click.IntRange(min=1), default=16, show_default=True, help="TensorRT profile: batch tuned for.")
@click.option("--max-batch", type=click.IntRange(min=1), default=64, show_default=True, help="TensorRT profile: largest batch.")
@click.option("--static-batch", type=click.IntRange(min=1), default=None, help="A fixed-batch engine (CUDA-graph friendly).")
@click.option("--builder-optimization-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="TensorRT timing cache [default: one per TensorRT version and GPU under ~/.cache/ddim-deploy/tensorrt/].")
@click.option("--int8", is_flag=True, help="Also write model.int8.onnx (static QDQ INT8 for CPUs), behind a quality "
              "gate.")
@click.option("--int8-calibration", type=click.Choice(["both", "data", "sampler"]), default="both", show_default=True,
              help="Calibration inputs: training images noised across the schedule, the float32 model's own DDIM "
                   "trajectories, or half of each.")
@click.option("--int8-calibration-size", type=click.IntRange(min=8), default=512, show_default=True,
              help="Calibration (image, noise variance) pairs.")
@click.option("--int8-method", type=click.Choice(["minmax", "percentile", "entropy"]), default="minmax",
              show_default=True, help="How activation ranges are chosen from the calibration set.")
@click.option("--int8-keep-float", type=click.Choice(["embedding", "first-conv", "last-conv", "none"]), multiple=True,
              help="Parts left in float32 [default: embedding, first-conv, last-conv].")
@click.option("--int8-reduce-range/--int8-full-range", default=True, show_default=True,
              help="7-bit weights (no int16 saturation on CPUs without VNNI) or the full 8 bits.")
@click.option("--int8-gate-images", type=click.IntRange(min=2), default=256, show_default=True,
              help="Same-noise samples (50 steps) the quality gate compares.")
@click.option("--int8-min-psnr", type=click.FloatRange(min=0), default=20.0, show_default=True,
              help="Gate: least same-noise PSNR (dB) of INT8 samples against float32 ONNX ones.")
@click.option("--int8-max-fd-ratio", type=click.FloatRange(min=0, min_open=True), default=1.5, show_default=True,
              help="Gate: largest FD-classifier of INT8 samples over float32's (Fashion-MNIST models).")
@click.option("--int8-classifier", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Gate: classifier folder whose features give the FD-classifier [default: the shipped one].")
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="Where the training data lies, for INT8 calibration [default: where the trainer finds it].")
@size_limit_options
@friendly_errors
def main(run_dir: Path | None, out: Path | None, fp16: bool, raw_weights: bool, force: bool, require_engine: bool,
         min_batch: int, opt_batch: int, max_batch: int, static_batch: int | None, builder_optimization_level: int,
         timing_cache: Path | None, int8: bool, int8_calibration: str, int8_calibration_size: int, int8_method: str,
         int8_keep_float: tuple[str, ...], int8_reduce_range: bool, int8_gate_images: int, int8_min_psnr: float,
         int8_max_fd_ratio: float, int8_classifier: Path | None, data_path: Path | None, max_image_size: int, max_parameters: int,
         max_memory_gib: float) -> None:
    """Export the model of RUN_DIR (a trainer run directory or shipped model folder; default: the latest
    run under runs/, else the shipped Fashion-MNIST model)."""
    from export.int8 import KEEP_FLOAT, GateOptions, Int8Options
    from export.io_spec import BatchProfile
    from export.pipeline import REPORT, ExportOptions, export_run
    from runtime.limits import SizeLimits

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    run_dir, why = pick(run_dir, "RUN_DIR", "run", "runs", latest_run, "config.json",
                        "train one with python -m trainer fit")
    if out is None:
        out = Path("exports") / run_dir.resolve().name
        # A default folder holding an earlier export of ours is replaced (atomically, after the gates pass).
        force = force or (out / REPORT).is_file()
    what = " + ".join(["fp32"] + ["fp16"] * fp16 + ["int8"] * int8)
    log.info("ddim-export: %s%s -> %s (%s)", run_dir, why, out, what)
    profile = BatchProfile.static(static_batch) if static_batch else BatchProfile(min_batch, opt_batch, max_batch)
    opts = ExportOptions(fp16=fp16, raw_weights=raw_weights, force=force, require_engine=require_engine,
                         profile=profile, optimization_level=builder_optimization_level, timing_cache=timing_cache,
                         int8=int8, data_path=data_path,
                         limits=SizeLimits(max_image_size, max_parameters, max_memory_gib),
                         int8_options=Int8Options(calibration=int8_calibration, calibration_size=int8_calibration_size,  # type: ignore[arg-type]
                                                  method=int8_method,  # type: ignore[arg-type]
                                                  reduce_range=int8_reduce_range,
                                                  keep_float=tuple(k for k in int8_keep_float if k != "none")
                                                  if int8_keep_float else KEEP_FLOAT),
                         int8_gate=GateOptions(images=int8_gate_images, min_psnr_db=int8_min_psnr,
                                               max_fd_ratio=int8_max_fd_ratio,
                                               classifier=str(int8_classifier) if int8_classifier else None))
    report = export_run(run_dir, out, opts)
    for note in report.notes:
        log.info("note: %s", note)
    for name, size in report.files.items():
        secs = report.seconds.get(name)
        log.info("  %-20s %10s bytes%s", name, f"{size:,}", f"  ({secs:.1f} s)" if secs is not None else "")
    if report.int8:
        log.info("kept in float32 in the INT8 graph: %s", "; ".join(report.int8["kept_float32"]) or "nothing")
    if report.float32_in_fp16:
        log.info("kept in float32 in the FP16 graph: %s", ", ".join(report.float32_in_fp16))
    for tool, command in report.tensorrt_commands.items():
        log.info("the same engine with %s (run in %s): %s", tool, out, command)
    log.info("exported %s", out)


if __name__ == "__main__":
    main()
