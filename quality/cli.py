"""``python -m quality``: the Fashion-MNIST classifier behind the FD-classifier score (``classifier``).

A classifier is trained into a new folder (``runs/classifier-DATE-TIME`` unless ``--out`` names
another new or empty one); the shipped ``models/fashion-mnist-classifier`` is replaced only with
``--replace-shipped``, atomically. Errors print one line on stderr and exit non-zero (``--debug``
for tracebacks).
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from runtime.clitools import friendly_errors, version_option


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option
def main() -> None:
    """Sample-quality tools (the FD-classifier's feature network)."""


@main.command()
@click.option("--data", "data_path", type=click.Path(path_type=Path), default=None,
              help="Folder of Fashion-MNIST IDX files [default: the Debian package, else the cache/download].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="New (or empty) folder to write [default: runs/classifier-YYYYmmdd-HHMMSS].")
@click.option("--replace-shipped", is_flag=True,
              help="Write models/fashion-mnist-classifier instead, replacing the shipped classifier atomically.")
@click.option("--epochs", type=click.IntRange(min=1), default=4, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar.")
@friendly_errors
def classifier(data_path: Path | None, out: Path | None, replace_shipped: bool, epochs: int, seed: int,
               progress: bool) -> None:
    """Train the Fashion-MNIST classifier whose features give the FD-classifier score."""
    from quality import classifier as qc
    from trainer.data import fit_idx_images
    from trainer.data.fashion_mnist import load_fashion_mnist

    if replace_shipped and out is not None:
        raise click.UsageError("--out and --replace-shipped are exclusive: --replace-shipped writes " + str(qc.SHIPPED))
    if replace_shipped:
        out = qc.SHIPPED
    elif out is None:
        out = Path("runs") / f"classifier-{time.strftime('%Y%m%d-%H%M%S')}"
    qc.check_out(out, replace=replace_shipped)  # before hours of training, not after
    click.echo(f"classifier: Fashion-MNIST, {epochs} epochs, seed {seed} -> {out}"
               f"{' (replacing the shipped classifier)' if replace_shipped else ''}", err=True)
    (xtr, ytr), (xte, yte) = (load_fashion_mnist(data_path, s) for s in ("train", "test"))
    model, info = qc.train_classifier((fit_idx_images(xtr, 32), ytr), (fit_idx_images(xte, 32), yte),
                                      epochs=epochs, seed=seed, progress=progress)
    qc.write_classifier_folder(model, info, out, replace=replace_shipped)
    click.echo(f"test accuracy {100 * info.test_accuracy:.2f}% ({len(yte)} images) in {info.train_seconds:.0f} s; "
               f"wrote {out}")
