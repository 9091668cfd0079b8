"""Images/s of the standard FID's InceptionV3 on each engine, against the machine's matmul peak.

    python benchmarks/inception_speed.py                  # ONNX Runtime vs TorchScript, batch 50, 2 timed batches
    python benchmarks/inception_speed.py --quick          # smoke test: batch 2, 1 timed batch

The network costs 5.71 G multiply-adds (11.4 GFLOP) an image at 299x299 (its convolutions, counted from the ONNX
graph); the preprocessing (resize, scaling) is timed with it, as ``python -m quality fid`` runs it. Engines run in
turn in one process with the same threads, so their ratio is this machine's. Writes
benchmarks/results/inception-speed-DATE-HOST.{json,md,png}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import click
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, cpu_name, pyplot, save_figure, write_report  # noqa: E402
from runtime.common.clitools import friendly_errors  # noqa: E402

GFLOP_PER_IMAGE = 2 * 5.711168  # multiply-adds of its convolutions, x2


def matmul_peak(threads: int) -> float:
    """float32 GFLOP/s of a 2048^2 torch matmul (oneDNN/MKL kernels: numpy's may be held to AVX2 here)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    start = time.perf_counter()
    for _ in range(10):
        a @ b
    return 10 * 2 * 2048**3 / (time.perf_counter() - start) / 1e9


def time_engine(engine: str, batch: int, repeats: int, threads: int) -> dict[str, Any]:
    from quality.inception import InceptionFeatures

    ext = InceptionFeatures(engine=engine, threads=threads, batch_size=batch)  # type: ignore[arg-type]
    images = np.random.default_rng(0).integers(0, 256, (batch, 32, 32, 1), dtype=np.uint8)
    ext.features(images)  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        ext.features(images)
    seconds = (time.perf_counter() - start) / repeats
    return {"engine": ext.engine, "batch": batch, "threads": threads, "seconds_per_batch": seconds,
            "images_per_s": batch / seconds, "gflop_s": batch * GFLOP_PER_IMAGE / seconds}


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# InceptionV3 (FID) images/s ({env['cpu']}, {env['threads']} threads, matmul peak "
             f"{env['matmul_peak_gflop_s']:.1f} GFLOP/s)", "",
             "| engine | batch | images/s | GFLOP/s | share of peak | vs TorchScript |",
             "|---|---:|---:|---:|---:|---:|"]
    base = {r["batch"]: r["images_per_s"] for r in rows if r["engine"] == "torchscript"}
    for r in rows:
        ratio = r["images_per_s"] / base[r["batch"]] if r["batch"] in base else None
        lines.append(f"| {r['engine']} | {r['batch']} | {r['images_per_s']:.2f} | {r['gflop_s']:.1f} | "
                     f"{100 * r['gflop_s'] / env['matmul_peak_gflop_s']:.0f}% | "
                     f"{'' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5, 3))
    labels = [f"{r['engine']}\nbatch {r['batch']}" for r in rows]
    ax.bar(labels, [r["images_per_s"] for r in rows], color=["tab:blue", "tab:orange"] * len(rows))
    ax.set(ylabel="images/s", title="InceptionV3 (FID features) on this CPU")
    save_figure(fig, path)


@click.command()
@click.option("--batch", type=click.IntRange(min=1), default=50, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="[default: one per physical core]")
@click.option("--quick", is_flag=True, help="Smoke test: batch 2, one timed batch.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@friendly_errors
def main(batch: int, repeats: int, threads: int | None, quick: bool, out: Path) -> None:
    """Time the FID's InceptionV3 on ONNX Runtime and on TorchScript."""
    from runtime.common.hostinfo import check_threads

    threads = check_threads(threads)
    if quick:
        batch, repeats = 2, 1
    env = {"cpu": cpu_name(), "threads": threads, "matmul_peak_gflop_s": matmul_peak(threads)}
    rows = []
    for engine in ("onnxruntime", "torchscript"):
        rows.append(time_engine(engine, batch, repeats, threads))
        click.echo(f"  {engine:12s} batch {batch}: {rows[-1]['images_per_s']:.2f} images/s", err=True)
    write_report("inception-speed", out, env, rows, ("engine", "batch"), markdown, plot)


if __name__ == "__main__":
    main()
