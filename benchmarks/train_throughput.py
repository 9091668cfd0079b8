"""Training throughput of each preset on this machine: images/s, GFLOPs, achieved GFLOP/s.

    python benchmarks/train_throughput.py                       # every preset, fp32
    python benchmarks/train_throughput.py --preset fashion-mnist --precision bf16 --steps 30

Times the trainer's own optimiser step (loss, backward, AdamW, EMA) on random images of the
preset's size (throughput does not depend on the pixels). Training FLOPs are counted as 3x the
forward (forward + two backward matmuls per layer). Writes JSON and Markdown to
benchmarks/results/.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
import sys
import time
from pathlib import Path

import click
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_name, report_stem, write_json  # noqa: E402
from runtime.choices import Device, values  # noqa: E402
from runtime.common.clitools import version_option  # noqa: E402
from runtime.schedule import build_schedule  # noqa: E402
from trainer.models import build_model, count_parameters, forward_gflops  # noqa: E402
from trainer.config import Precision as TrainPrecision  # noqa: E402
from trainer.presets import PRESETS, get_preset  # noqa: E402
from trainer.step import Trainee, optimizer_step  # noqa: E402


def measure(preset: str, precision: str, batch: int | None, steps: int, warmup: int, device: str) -> dict:
    cfg = get_preset(preset).config
    train = dataclasses.replace(cfg.train, precision=precision, batch_size=batch or cfg.train.batch_size)
    torch.manual_seed(0)
    model = build_model(cfg.model).to(device)
    gflops = forward_gflops(model, cfg.model)
    trainee = Trainee.create(model, model, build_schedule(cfg.schedule), train)
    m = cfg.model
    x0 = torch.randn(train.batch_size, m.channels, m.image_size, m.image_size, device=device)
    times = []
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        optimizer_step(trainee, x0, train.lr, i)
        if device == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    images_s = train.batch_size / step_s
    return {
        "preset": preset, "precision": precision, "batch_size": train.batch_size,
        "image": f"{m.image_size}x{m.image_size}x{m.channels}", "parameters": count_parameters(model),
        "gflops_forward": round(gflops, 4), "median_step_s": round(step_s, 5), "images_per_s": round(images_s, 2),
        "achieved_gflop_s": round(3 * gflops * images_s, 1), "steps_timed": steps,
    }


@click.command()
@click.option("--preset", type=click.Choice(list(PRESETS)), multiple=True, help="[default: all]")
@click.option("--precision", type=click.Choice(values(TrainPrecision)), multiple=True, help="[default: fp32]")
@click.option("--batch-size", type=int, default=None, help="[default: the preset's]")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--device", type=click.Choice(values(Device)), default="cpu", show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=ROOT / "benchmarks" / "results")
@version_option
def main(preset: tuple[str, ...], precision: tuple[str, ...], batch_size: int | None, steps: int, warmup: int,
         device: str, out: Path) -> None:
    rows = []
    for name in preset or tuple(PRESETS):
        for prec in precision or ("fp32",):
            row = measure(name, prec, batch_size, steps, warmup, device)
            rows.append(row)
            click.echo(f"{name:15s} {prec:5s} batch {row['batch_size']:3d}  {row['images_per_s']:8.1f} img/s  "
                       f"{row['achieved_gflop_s']:7.1f} GFLOP/s  ({row['parameters']:,} params, "
                       f"{row['gflops_forward']:.3f} GFLOPs/forward)")
    env = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "device": device,
           "gpu": torch.cuda.get_device_name() if device == "cuda" else None}
    stem = report_stem("train-throughput")
    rows = write_json(out / f"{stem}.json", env, rows, ("preset", "precision", "batch_size"))
    lines = [f"# Training throughput ({env['cpu']}, {env['threads']} threads, torch {env['torch']}, {device})", "",
             "| preset | precision | batch | images/s | GFLOPs/forward | achieved GFLOP/s | parameters |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['preset']} | {r['precision']} | {r['batch_size']} | {r['images_per_s']} | {r['gflops_forward']} "
              f"| {r['achieved_gflop_s']} | {r['parameters']:,} |" for r in rows]
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    click.echo(f"wrote {out / stem}.json and .md")


if __name__ == "__main__":
    main()
