"""``ddim-run``: sample images from an exported model with the lean DDIM loop (torch-free on ONNX Runtime)."""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
from numpy.typing import NDArray

from runtime.choices import Device, RunPrecision, values
from runtime.common.cliconfig import with_flag_names
from runtime.common.clitools import friendly_errors, threads_option
from runtime.options import BackendChoice, sampling_options, sampling_settings
from runtime.exportdir import FP32_ONNX, latest_export
from runtime.common.hostinfo import physical_cores
from runtime.common.limits import check_image_count
from runtime.common.outputs import StagedOutputs, check_file, check_folder
from runtime.settings import SamplingSettings, SettingsError
from runtime.common.shipped import pick

log = logging.getLogger("runtime")
# What ddim-run holds per pixel value at its peak: float32 samples twice (the batches and their concatenation), two
# float64 temporaries of the uint8 conversion, the uint8 image and its place in the grid.
BYTES_PER_VALUE = 4 + 4 + 2 * 8 + 1 + 2


def check_outputs(out: Path, out_dir: Path | None, npz: Path | None) -> None:
    """Fail before loading and sampling, not after, when an output cannot be written."""
    from runtime.images import IMAGE_FORMATS, image_format

    check_file(out, "--out", tuple(IMAGE_FORMATS))
    image_format(out)  # a WebP-less Pillow refuses .webp now, not after sampling
    if out_dir is not None:
        check_folder(out_dir, "--out-dir")
    if npz is not None:
        check_file(npz, "--npz", ".npz")


@dataclass(frozen=True)
class RunOptions:
    """What ``ddim-run`` does besides sampling settings: how many images, from what, on what, into which files."""

    num_images: int
    batch_size: int
    seed: int
    backend: str
    device: Device | None
    precision: RunPrecision
    threads: int | None
    out: Path
    out_dir: Path | None
    npz: Path | None
    progress: bool
    latents: Path | None = None
    init_images: Path | None = None
    strength: float = 0.75
    interpolate: tuple[str, str] | None = None
    frames: int = 8
    resize: bool = False
    cluster: str | None = None
    shard_size: int = 64
    workers: int | None = None
    worker_cpus: float = 1.0


def engine_options(fn: Callable[..., None]) -> Callable[..., None]:
    """The options of every command that runs a model: batch size, backend, device, precision, threads, progress."""
    for option in reversed([
        click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True),
        click.option("--backend", type=BackendChoice(), default="auto", show_default=True,
                     help="torch takes a trainer run directory: the eager reference."),
        click.option("--device", type=click.Choice(values(Device)), default=None, help="[default: cuda when usable]"),
        click.option("--precision", type=click.Choice(values(RunPrecision)), default="auto", show_default=True,
                     help="Which exported file: model.onnx, model.fp16.onnx or model.int8.onnx (CPU); bf16: "
                          "model.onnx in bfloat16 (--backend openvino, CPUs with BF16); auto: the "
                          "TensorRT engine's (fp16) where one is picked, on ONNX Runtime CPU model.int8.onnx where "
                          "it passed its gate and is faster on this CPU, else model.onnx."),
        threads_option(f"CPU threads of ONNX Runtime / OpenVINO / torch, at most the logical CPUs this process may use "
                       f"[default: one per physical core, {physical_cores()} here]."),
        click.option("--progress/--no-progress", default=True, show_default=True),
    ]):
        fn = option(fn)
    return fn


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@sampling_options
@click.option("--num-images", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True,
              help="Noise seed (numpy seeds are non-negative).")
@engine_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("samples.png"), show_default=True,
              help="The grid: .png, .jpg or .webp (PNG and WebP lossless).")
@click.option("--out-dir", type=click.Path(path_type=Path), default=None,
              help="Also one PNG per image here. With --cluster: one .npz per shard and manifest.json instead, which "
                   "a rerun with the same settings resumes.")
@click.option("--npz", type=click.Path(path_type=Path), default=None, help="Also the raw arrays (samples, images).")
@click.option("--latents", type=click.Path(path_type=Path), default=None,
              help="Decode these x_T (an .npz from ddim-encode) instead of drawing noise.")
@click.option("--init-images", type=click.Path(path_type=Path), default=None,
              help="Image-to-image (SDEdit) from an image, a folder of images or an .npz of images: noised to "
                   "--strength, then the rest of the steps.")
@click.option("--strength", type=float, default=0.75, show_default=True,
              help="With --init-images: how far to noise, in (0, 1]; 1 starts from the noisiest step.")
@click.option("--interpolate", nargs=2, type=str, default=None, metavar="A B",
              help="A strip of --frames images between two x_T (spherical interpolation): each a seed (the x_T "
                   "ddim-run --seed draws for image 0) or a latents file (FILE or FILE:INDEX).")
@click.option("--frames", type=click.IntRange(min=2, max=256), default=8, show_default=True)
@click.option("--resize", is_flag=True, help="Centre-crop and resize input images to the model's size.")
@click.option("--cluster", metavar="local|auto|HOST:PORT", default=None,
              help="Sample in shards on Ray (the serve extra's): local starts an instance here, HOST:PORT joins "
                   "`ray start --head` there (the model must lie at the same path on every node).")
@click.option("--shard-size", type=click.IntRange(min=1), default=64, show_default=True,
              help="With --cluster: images per shard (one Ray task, one file in --out-dir).")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="With --cluster: most shards sampled at once [default: as many as the cluster's CPUs take].")
@click.option("--worker-cpus", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="With --cluster: CPUs Ray reserves per worker; its --threads default to them.")
@friendly_errors
@click.pass_context
def main(ctx: click.Context, model: Path | None, **options: Any) -> None:
    """Sample a PNG grid from MODEL: an export directory or ONNX file (default: the latest export under
    exports/, else the shipped Fashion-MNIST model). Or decode latents (--latents), edit images (--init-images),
    or interpolate between two latents (--interpolate)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = sampling_settings(ctx)
    o = RunOptions(**options)
    given = [flag for flag, v in (("--latents", o.latents), ("--init-images", o.init_images),
                                  ("--interpolate", o.interpolate)) if v]
    if len(given) > 1:
        raise click.UsageError(f"{' and '.join(given)} are different jobs: give one")
    _check_cluster_options(ctx, o, given)
    _run(ctx, model, settings, o)


CLUSTER_ONLY = ("shard_size", "workers", "worker_cpus")


def _check_cluster_options(ctx: click.Context, o: RunOptions, jobs: list[str]) -> None:
    """--cluster samples drawn noise on CPU workers; its options mean nothing without it."""
    from click.core import ParameterSource

    typed = [f"--{name.replace('_', '-')}" for name in CLUSTER_ONLY
             if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None)]
    if o.cluster is None:
        if typed:
            raise click.UsageError(f"{', '.join(typed)} only apply with --cluster")
        return
    if jobs:
        raise click.UsageError(f"--cluster samples drawn noise (--num-images); {jobs[0]} runs in one process")
    if o.device == "cuda":
        raise click.UsageError("--cluster runs its workers on CPUs: --device cuda is not supported with it")


def _run(ctx: click.Context, model: Path | None, settings: SamplingSettings, o: RunOptions) -> None:
    from runtime.api import load
    from runtime.common.progress import progress_bar

    model, why = pick(model, "MODEL", "export", "exports", latest_export, FP32_ONNX, "make one with ddim-export")
    log.info("ddim-run: %s%s", model, why)
    check_outputs(o.out, o.out_dir, o.npz)
    # --cluster: this process only picks the engine and precision (every worker then runs the same) and merges.
    sampler = load(model, o.backend, "cpu" if o.cluster else o.device, o.precision, o.threads)
    log.info("backend: %s", sampler.why)
    # Refuse what the schedule cannot take now, naming the flag; sampling reuses this plan.
    plan = with_flag_names(ctx, lambda: sampler.plan(settings), every_field_of="sampling")
    settings = sampler.resolve(settings)
    log.info("solver: %s, %d steps (%s spacing), eta %g, %s", settings.solver, len(plan), settings.spacing,
             settings.eta, "pred_x0 clipped" if settings.clip_x0 else "no clipping")
    if o.cluster:
        _run_on_cluster(sampler, model, settings, o)
        return
    job = _job(sampler, model, settings, o, len(plan))
    flag = "--latents" if o.latents else "--init-images" if o.init_images else "--frames" if o.interpolate else \
        "--num-images"
    check_image_count(job.count, sampler.image_shape, flag, BYTES_PER_VALUE)  # before sampling, not a MemoryError
    batches = -(-job.count // o.batch_size)
    with progress_bar(total=job.steps * batches, desc="sampling", unit="step", disable=not o.progress) as bar:
        result = with_precision(sampler, lambda: job.run(lambda i: bar.update(1)))
    write_outputs(o, result.images, result.samples, job.columns, o.out_dir)
    b = sampler.backend
    per_step = result.seconds / max(result.calls, 1)
    log.info("%s on %s: %d images in %.2f s, %.1f ms per step (batch %d), %.2f images/s, "
             "%.1f%% of the time outside the network; grid in %s",
             b.name, b.device, job.count, result.seconds, per_step * 1e3, min(o.batch_size, job.count),
             job.count / result.seconds, 100 * result.overhead_fraction, o.out)


def write_outputs(o: RunOptions, images: NDArray[np.uint8], samples: NDArray[np.float32], columns: int | None,
                  png_dir: Path | None) -> None:
    """The grid (``--out``), one PNG per image into ``png_dir`` and the arrays (``--npz``), all or nothing: a full
    disk at the npz must not leave a new grid beside the old per-image files."""
    from runtime.images import grid_bytes, grid_scale, image_format, png_bytes

    with StagedOutputs() as staged:
        scale = grid_scale(images.shape[1], len(images))
        staged.stage(o.out, grid_bytes(images, columns, scale=scale, fmt=image_format(o.out)), "--out")
        if png_dir is not None:
            for i, image in enumerate(images):
                staged.stage(png_dir / f"{i:05d}.png", png_bytes(image), "--out-dir")
        if o.npz is not None:
            staged.stage(o.npz, lambda fh: np.savez(fh, samples=samples, images=images), "--npz")
        staged.commit()


def _run_on_cluster(sampler: Any, model: Path, settings: SamplingSettings, o: RunOptions) -> None:
    """``--cluster``: the shards on Ray (:mod:`runtime.cluster.run`), then the merged grid and npz in index order;
    ``--out-dir`` holds the shards, not PNGs."""
    from runtime.cluster.run import ClusterOptions, sample_on_cluster

    check_image_count(o.num_images, sampler.image_shape, "--num-images", BYTES_PER_VALUE)
    options = ClusterOptions(o.cluster or "local", o.shard_size, o.workers, o.worker_cpus, o.threads, o.batch_size,
                             o.out_dir, o.progress)
    result = with_precision(sampler, lambda: sample_on_cluster(sampler, model, settings, o.seed, o.num_images,
                                                               options))
    write_outputs(o, result.data.images, result.data.samples, None, None)
    rate = f", {result.sampled / result.seconds:.2f} images/s" if result.sampled and result.seconds else ""
    log.info("cluster (%d node(s)): %d images, %d sampled now in %.2f s%s, %d shard(s)%s; grid in %s",
             result.nodes, o.num_images, result.sampled, result.seconds, rate, result.shards,
             f" in {o.out_dir}" if o.out_dir else "", o.out)


def with_precision(sampler: Any, run: Callable[[], Any]) -> Any:
    """``run()``; a NaN or Inf it meets is reported with the advice for the precision the backend ran in (no
    "try float32" for a float32 model: its weights are what is broken)."""
    from runtime.sampler import NonFiniteError

    try:
        return run()
    except NonFiniteError as exc:
        if exc.precision is not None:
            raise
        raise NonFiniteError(exc.where, getattr(sampler.backend, "precision", None)) from None


@dataclass
class RunJob:
    """What ``ddim-run`` will do: how many images, steps per batch, how to run it, the grid's columns."""

    count: int
    steps: int
    run: Callable[[Callable[[int], None]], Any]
    columns: int | None = None


def _job(sampler: Any, model: Path, settings: SamplingSettings, o: RunOptions, steps: int) -> RunJob:
    """The job the options ask for (sample, decode latents, image-to-image, interpolate; ``steps`` per batch of a
    whole plan), its input read and checked before any sampling."""
    from runtime.latents import model_identity, read_latents, slerp

    shape = sampler.image_shape
    kw = {"batch_size": o.batch_size}
    if o.latents is not None:
        latents, encoded = read_latents(o.latents, shape, model_identity(model))
        _note_encoding(encoded, settings)
        return RunJob(len(latents), steps, lambda tick: sampler.decode(latents, settings, seed=o.seed, on_step=tick,
                                                                       **kw))
    if o.init_images is not None:
        from runtime.inputs import read_images, to_model_space

        try:  # strength refused now, before the images are read
            tail = sampler.plan(settings).tail(o.strength)
        except SettingsError as exc:
            raise ValueError(str(exc).replace("strength", "--strength", 1)) from None
        m, norm = sampler.spec.model, sampler.spec.normalization
        images, _ = read_images(o.init_images, m.image_size, m.channels, resize=o.resize)
        x0 = to_model_space(images, norm.mean, norm.std)
        return RunJob(len(x0), len(tail), lambda tick: sampler.image_to_image(x0, o.strength, settings, seed=o.seed,
                                                                              on_step=tick, **kw))
    if o.interpolate is not None:
        files = [v for v in o.interpolate if not v.isdigit()]
        identity = model_identity(model) if files else ""  # hashed once, for both ends
        ends = [_endpoint(v, shape, identity) for v in o.interpolate]
        path = slerp(ends[0], ends[1], o.frames)
        return RunJob(o.frames, steps, lambda tick: sampler.decode(path, settings, seed=o.seed, on_step=tick, **kw),
                      columns=o.frames)
    return RunJob(o.num_images, steps, lambda tick: sampler.sample(o.num_images, settings, seed=o.seed,
                                                                   on_step=tick, **kw))


def _endpoint(value: str, shape: tuple[int, int, int], identity: str) -> NDArray[np.float32]:
    """One end of --interpolate: a seed (image 0's x_T under that seed) or a latents file (FILE or FILE:INDEX) of
    the model whose sha256 is ``identity``."""
    from runtime.latents import read_latents
    from runtime.noise import ImageNoise

    if value.isdigit():
        return ImageNoise(int(value), [0]).draw(shape)[0]
    path, _, index = value.rpartition(":") if value.rpartition(":")[2].isdigit() else (value, "", "0")
    latents, _ = read_latents(Path(path), shape, identity)
    if int(index) >= len(latents):
        raise ValueError(f"--interpolate {value}: {path} holds {len(latents)} latents (index 0..{len(latents) - 1})")
    return latents[int(index)]


def _note_encoding(encoded: dict[str, Any], settings: SamplingSettings) -> None:
    """Say so when latents are decoded with other steps or spacing than they were encoded with: the images then
    differ from the encoded ones."""
    changed = [f"{k} {encoded[k]} -> {getattr(settings, k)}" for k in ("steps", "spacing")
               if k in encoded and encoded[k] != getattr(settings, k)]
    if changed:
        log.warning("note: these latents were encoded with other settings (%s): the decoded images will differ "
                    "from the encoded ones", ", ".join(changed))


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.argument("images", type=click.Path(path_type=Path))
@sampling_options
@engine_options
@click.option("--out", type=click.Path(path_type=Path), default=Path("latents.npz"), show_default=True,
              help="The latents (.npz): latents (N, C, H, W) float32, the settings, the model's sha256, names.")
@click.option("--resize", is_flag=True, help="Centre-crop and resize input images to the model's size.")
@friendly_errors
@click.pass_context
def encode_main(ctx: click.Context, model: Path | None, images: Path, **options: Any) -> None:
    """DDIM inversion: encode IMAGES (an image, a folder of images, or an .npz of images as ddim-run --npz writes)
    into the x_T that ddim-run --latents decodes back into them, with MODEL (an export directory or ONNX file;
    default as ddim-run). The plan ddim-run uses for --steps/--spacing, walked backwards; eta 0, no clipping."""
    from runtime.api import load
    from runtime.common.progress import progress_bar
    from runtime.inputs import read_images, to_model_space
    from runtime.latents import latents_bytes, model_identity

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    settings = sampling_settings(ctx)
    out: Path = options["out"]
    model, why = pick(model, "MODEL", "export", "exports", latest_export, FP32_ONNX, "make one with ddim-export")
    log.info("ddim-encode: %s%s", model, why)
    check_file(out, "--out", ".npz")
    sampler = load(model, options["backend"], options["device"], options["precision"], options["threads"])
    log.info("backend: %s", sampler.why)
    plan = with_flag_names(ctx, lambda: sampler.plan(settings).inverse(), every_field_of="sampling")
    settings = SamplingSettings.of(sampler.resolve(settings), clip_x0=False)
    m, norm = sampler.spec.model, sampler.spec.normalization
    pixels, names = read_images(images, m.image_size, m.channels, resize=options["resize"])
    x0 = to_model_space(pixels, norm.mean, norm.std)
    batches = -(-len(x0) // options["batch_size"])
    with progress_bar(total=len(plan) * batches, desc="encoding", unit="step",
                      disable=not options["progress"]) as bar:
        result = with_precision(sampler, lambda: sampler.encode(x0, settings, batch_size=options["batch_size"],
                                                                on_step=lambda i: bar.update(1)))
    data = latents_bytes(result.samples, settings, model_identity(model), names)
    with StagedOutputs() as staged:
        staged.stage(out, data, "--out")
        staged.commit()
    log.info("%s on %s: %d images encoded in %.2f s (%d steps, %s spacing); latents in %s",
             sampler.backend.name, sampler.backend.device, len(x0), result.seconds, len(plan), settings.spacing, out)


if __name__ == "__main__":
    main()
