"""``ddim-export``: a trainer run directory to ONNX / FP16 ONNX / TensorRT files, behind a parity gate."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from runtime.clitools import friendly_errors

log = logging.getLogger("export")


def latest_run(root: Path = Path("runs")) -> Path | None:
    """The most recently written run directory under ``root`` (by its config.json), if any."""
    configs = [p for p in root.glob("*/config.json") if p.is_file()] if root.is_dir() else []
    return max(configs, key=lambda p: p.stat().st_mtime).parent if configs else None


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), help="Export directory [default: exports/RUN_NAME].")
@click.option("--fp16", is_flag=True, help="Also write model.fp16.onnx, and model.plan where TensorRT and a GPU exist.")
@click.option("--raw-weights", is_flag=True, help="Export the raw weights instead of the EMA weights.")
@click.option("--force", is_flag=True, help="Replace a non-empty --out directory.")
@click.option("--require-engine", is_flag=True, help="Fail when the TensorRT engine cannot be built here.")
@click.option("--min-batch", type=int, default=1, show_default=True, help="TensorRT profile: smallest batch.")
@click.option("--opt-batch", type=int, default=16, show_default=True, help="TensorRT profile: batch tuned for.")
@click.option("--max-batch", type=int, default=64, show_default=True, help="TensorRT profile: largest batch.")
@click.option("--static-batch", type=int, default=None, help="A fixed-batch engine (CUDA-graph friendly).")
@click.option("--builder-optimization-level", type=click.IntRange(0, 5), default=3, show_default=True)
@click.option("--timing-cache", type=click.Path(path_type=Path), default=None,
              help="TensorRT timing cache [default: ~/.cache/ddim-deploy/tensorrt/timing.cache].")
@friendly_errors
def main(run_dir: Path | None, out: Path | None, fp16: bool, raw_weights: bool, force: bool, require_engine: bool,
         min_batch: int, opt_batch: int, max_batch: int, static_batch: int | None, builder_optimization_level: int,
         timing_cache: Path | None) -> None:
    """Export the model of RUN_DIR (a trainer run directory; default: the latest under runs/)."""
    from export.io_spec import BatchProfile
    from export.pipeline import ExportOptions, export_run

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if run_dir is None:
        run_dir = latest_run()
        if run_dir is None:
            raise ValueError("no RUN_DIR given and no run under runs/; train one with python -m trainer fit")
    out = out or Path("exports") / run_dir.resolve().name
    log.info("ddim-export: %s -> %s%s", run_dir, out, " (fp32 + fp16)" if fp16 else " (fp32)")
    profile = BatchProfile.static(static_batch) if static_batch else BatchProfile(min_batch, opt_batch, max_batch)
    opts = ExportOptions(fp16=fp16, raw_weights=raw_weights, force=force, require_engine=require_engine,
                         profile=profile, optimization_level=builder_optimization_level, timing_cache=timing_cache)
    report = export_run(run_dir, out, opts)
    for note in report.notes:
        log.info("note: %s", note)
    for name, size in report.files.items():
        secs = report.seconds.get(name)
        log.info("  %-20s %10s bytes%s", name, f"{size:,}", f"  ({secs:.1f} s)" if secs is not None else "")
    if report.float32_in_fp16:
        log.info("kept in float32 in the FP16 graph: %s", ", ".join(report.float32_in_fp16))
    log.info("exported %s", out)


if __name__ == "__main__":
    main()
