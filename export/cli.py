"""``ddim-export``: a trainer run directory or a diffusers folder to ONNX / FP16 ONNX / INT8 ONNX / TensorRT files,
behind a parity gate."""

from __future__ import annotations

import dataclasses
import logging
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import click

from runtime.common.cliconfig import (
    GroupedCommand, GroupedOption, add_options, config_options, flag_of, overrides, section, with_flag_names,
)
from runtime.common.clitools import friendly_errors, size_limit_options, size_limits
from runtime.exportdir import REPORT, RUN_CONFIG, latest_run
from runtime.common.shipped import pick

log = logging.getLogger("export")


def _options() -> list[click.Option]:
    """ddim-export's options, generated from the option dataclasses the pipeline takes."""
    from export.int8 import GateOptions, Int8Options
    from export.io_spec import BatchProfile
    from export.pipeline import ExportOptions

    defaults = SimpleNamespace(export=ExportOptions(), profile=BatchProfile(), int8=Int8Options(), gate=GateOptions())

    def default_of(ctx: click.Context) -> tuple[str, Any]:
        return "", defaults

    return [
        *config_options(ExportOptions, "export", "Export", default_of, skip=SUB_OPTIONS | {"opset"},
                        rename={"optimization_level": "builder_optimization_level", "data_path": "data"}),
        *config_options(BatchProfile, "profile", "TensorRT batch profile", default_of,
                        rename={"min": "min_batch", "opt": "opt_batch", "max": "max_batch"}),
        *config_options(Int8Options, "int8", "INT8 calibration (with --int8)", default_of, prefix="int8_",
                        rename={"batch": "int8_calibration_batch", "seed": "int8_calibration_seed"}),
        *config_options(GateOptions, "gate", "INT8 quality gate (with --int8)", default_of, prefix="int8_gate_",
                        rename={"min_psnr_db": "int8_min_psnr", "max_fd_ratio": "int8_max_fd_ratio",
                                "classifier": "int8_classifier"}),
    ]


def default_name(run_dir: Path) -> str:
    """The default export folder's name: the model folder's, its parent's for a diffusers ``unet/`` folder."""
    folder = run_dir.resolve()
    return folder.parent.name if folder.name == "unet" and folder.parent.name else folder.name


# ExportOptions fields that are option objects of their own (generated from their dataclasses).
SUB_OPTIONS = {"profile", "int8_options", "int8_gate", "limits"}


@click.command(cls=GroupedCommand, context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", required=False, type=click.Path(path_type=Path))
@click.option("--out", "out", type=click.Path(path_type=Path), cls=GroupedOption, group="Export",
              help="Export directory [default: exports/NAME, NAME the folder's (its parent's for a unet/ folder)].")
@click.option("--diffusers", "diffusers_out", type=click.Path(path_type=Path), cls=GroupedOption, group="Export",
              help="Write only a diffusers DDIMPipeline folder here, no ONNX (a UNet2DModel where our net is one, "
                   "else ddim-deploy's DDIMDeployUNet; see docs/diffusers-export.md).")
@add_options(_options())
@click.option("--static-batch", type=click.IntRange(min=1), default=None, cls=GroupedOption,
              group="TensorRT batch profile", help="A fixed-batch engine (CUDA-graph friendly): min = opt = max.")
@size_limit_options
@friendly_errors
@click.pass_context
def main(ctx: click.Context, run_dir: Path | None, out: Path | None, diffusers_out: Path | None,
         static_batch: int | None) -> None:
    """Export the model of RUN_DIR: a trainer run directory or shipped model folder (config.json +
    model.safetensors), or a diffusers folder (a pipeline's model_index.json, or a UNet2DModel folder's
    config.json + diffusion_pytorch_model.safetensors: see docs/diffusers.md). Default: the latest run
    under runs/, else the shipped Fashion-MNIST model."""
    from export.int8 import GateOptions, Int8Options
    from export.io_spec import BatchProfile
    from export.pipeline import ExportOptions, export_run

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    if diffusers_out is not None:
        _diffusers(ctx, run_dir, diffusers_out, out, static_batch)
        return
    if static_batch and section(ctx, "profile"):
        raise click.UsageError("--static-batch sets min = opt = max: drop --min-batch/--opt-batch/--max-batch")
    settings = section(ctx, "export")
    profile = BatchProfile.static(static_batch) if static_batch else \
        with_flag_names(ctx, lambda: BatchProfile(**section(ctx, "profile")))
    opts = with_flag_names(ctx, lambda: ExportOptions(
        **settings, profile=profile, limits=size_limits(ctx),
        int8_options=Int8Options(**section(ctx, "int8")), int8_gate=GateOptions(**section(ctx, "gate"))))
    if opts.int8_gate.classifier is not None and not Path(opts.int8_gate.classifier).is_dir():
        raise click.BadParameter(f"{opts.int8_gate.classifier} is not a folder", param_hint="'--int8-classifier'")
    run_dir, why = pick(run_dir, "RUN_DIR", "run", "runs", latest_run, RUN_CONFIG,
                        "train one with python -m trainer fit")
    from export.from_diffusers import diffusers_layout

    layout = diffusers_layout(run_dir)
    why += f" (a diffusers {layout} folder)" if layout else ""
    if out is None:
        out = Path("exports") / default_name(run_dir)
        # A default folder holding an earlier export of ours is replaced (atomically, after the gates pass).
        opts = dataclasses.replace(opts, force=opts.force or (out / REPORT).is_file())
    what = " + ".join(["fp32"] + ["fp16"] * opts.fp16 + ["int8"] * opts.int8)
    log.info("ddim-export: %s%s -> %s (%s)", run_dir, why, out, what)
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


# The only ExportOptions that mean something for a diffusers folder.
DIFFUSERS_FIELDS = {("export", "raw_weights"), ("export", "force"), ("export", "progress")}


def _diffusers(ctx: click.Context, run_dir: Path | None, out: Path, onnx_out: Path | None,
               static_batch: int | None) -> None:
    """``--diffusers OUT``: the diffusers folder only (export/to_diffusers.py), nothing else."""
    given = [flag_of(ctx, *key) for key in overrides(ctx) if key not in DIFFUSERS_FIELDS and key[0] != "limits"]
    given += ["--out"] * (onnx_out is not None) + ["--static-batch"] * (static_batch is not None)
    if given:
        raise click.UsageError(f"--diffusers writes only the diffusers folder: drop {', '.join(given)}")
    try:
        from export.to_diffusers import export_diffusers
    except ModuleNotFoundError as exc:
        if exc.name != "diffusers":
            raise
        from runtime.common.extras import install_hint

        raise click.ClickException(f"--diffusers needs diffusers ({install_hint('diffusers')})") from None
    run_dir, why = pick(run_dir, "RUN_DIR", "run", "runs", latest_run, RUN_CONFIG,
                        "train one with python -m trainer fit")
    settings = section(ctx, "export")
    log.info("ddim-export: %s%s -> %s (a diffusers DDIMPipeline folder)", run_dir, why, out)
    report = export_diffusers(run_dir, out, settings.get("raw_weights", False), settings.get("force", False),
                              size_limits(ctx))
    for note in report.notes:
        log.info("note: %s", note)
    load = "import trainer.diffusers_model, then " if report.kind == "DDIMDeployUNet" else ""
    log.info("exported %s; load it with %sdiffusers.DDIMPipeline.from_pretrained(%r)", out, load, str(out))


if __name__ == "__main__":
    main()
