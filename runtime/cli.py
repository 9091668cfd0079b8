"""``ddim-run``: sample images from an exported model (the lean runtime's command line)."""

from __future__ import annotations

import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False)
@click.option("--steps", type=int, default=50, show_default=True, help="DDIM sampling steps.")
def main(model: str | None, steps: int) -> None:
    """Sample a PNG grid from MODEL (an export directory or ONNX file) with the DDIM loop."""
    click.echo("ddim-run: not implemented yet (the runtime backends land with the ddim-run issue)", err=True)
    sys.exit(2)


if __name__ == "__main__":
    main()
