"""``ddim-export``: a trainer run directory to ONNX / FP16 ONNX / TensorRT files."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("run_dir", required=False)
@click.option("--out", "out_dir", default=None, help="Export directory.")
@click.option("--fp16", is_flag=True, help="Also write FP16 ONNX (and a TensorRT engine on a GPU).")
def main(run_dir: str | None, out_dir: str | None, fp16: bool) -> None:
    """Export the model of RUN_DIR (a trainer checkpoint directory)."""
    click.echo("ddim-export: not implemented yet (the exporter lands with the ddim-export issue)", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
