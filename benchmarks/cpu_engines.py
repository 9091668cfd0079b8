"""Whole-process ``ddim-run`` on the CPU: the default (``--backend auto``) against every explicit engine and precision,
and against eager PyTorch, each a fresh process as a user runs it.

    python benchmarks/cpu_engines.py                     # shipped model: 64 images x 20 steps, batch 16; 50 vs eager
    python benchmarks/cpu_engines.py --model exports/x --repeats 5

Two checks, printed with their figures:
  1. auto within 5% of the fastest explicit pair: ``ddim-run`` (no backend, no precision) against ``--backend
     onnxruntime|openvino --precision fp32|int8|bf16`` (those the export and the CPU can run), 64 images x 20 steps at
     batch 16, median wall time of --repeats interleaved rounds (order rotating each round);
  2. auto against eager PyTorch (``--backend torch`` on the run's weights, beside the export), 64 x 50 steps, batch
     16: the issue's target is 5x on a CPU with VNNI (printed with the CPU's flags; on AVX2 without VNNI INT8 does
     not pay and the figure is what it is).
The first ``ddim-run`` on a host where the export's timing does not apply times the engines once (cached per host):
it is run once before the rounds and reported apart (``first run on this host``).
Writes benchmarks/results/cpu-engines-DATE-HOST.{json,md,png}.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import (RESULTS, cpu_name, pyplot, round_robin, save_figure, summarize,  # noqa: E402
                               theoretical_peak, write_report)
from runtime.common.shipped import SHIPPED_MODEL  # noqa: E402

EXPLICIT = (("onnxruntime", "fp32"), ("onnxruntime", "int8"), ("openvino", "fp32"), ("openvino", "bf16"),
            ("openvino", "int8"))
TOLERANCE = 1.05  # auto may be at most 5% slower than the fastest explicit pair
EAGER_TARGET = 5.0  # auto against eager at 50 steps, on a CPU with VNNI


def ddim_run(model: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", str(model), "--out", str(out), "--no-progress", *args]


def runnable(model: Path, engine: str, prec: str) -> str | None:
    """Why ``--backend engine --precision prec`` cannot run here (None: it can)."""
    from runtime.backends.base import BackendError
    from runtime.backends.registry import open_backend

    try:
        open_backend(model, engine, "cpu", prec)  # type: ignore[arg-type]
    except BackendError as exc:
        return str(exc).splitlines()[0]
    return None


def backend_line(cmd: list[str]) -> str:
    proc = subprocess.run(cmd + ["--num-images", "1", "--steps", "1"], capture_output=True, text=True, timeout=600,
                          cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return next((line for line in proc.stderr.splitlines() if line.startswith("backend:")), "")


def process(cmd: list[str]) -> Any:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def run() -> None:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
        if proc.returncode != 0:
            raise click.ClickException(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")

    return run


def explicit_verdict(stats: dict[str, dict[str, float]], steps: int) -> str:
    """Check 1 from the medians: auto's time over the fastest explicit pair's (at most :data:`TOLERANCE`)."""
    best = min((k for k in stats if k != "auto"), key=lambda k: stats[k]["p50_s"])
    ratio = stats["auto"]["p50_s"] / stats[best]["p50_s"]
    return (f"auto vs the fastest explicit pair ({best}) at {steps} steps: {ratio:.3f}x its time "
            f"({'within' if ratio <= TOLERANCE else 'NOT within'} 5%)")


def eager_verdict(stats: dict[str, dict[str, float]], steps: int, vnni: bool) -> str:
    """Check 2: how many times faster auto is than eager PyTorch; the 5x target applies on a CPU with VNNI."""
    speed = stats["eager torch"]["p50_s"] / stats["auto"]["p50_s"]
    target = (f"target {EAGER_TARGET:.0f}x on a VNNI CPU: {'met' if speed >= EAGER_TARGET else 'NOT met'}"
              if vnni else "no VNNI here: the 5x target does not apply")
    return f"auto vs eager PyTorch at {steps} steps: {speed:.2f}x faster ({target})"


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Whole-process ddim-run on the CPU ({env['cpu']})", "",
             f"{env['python']}, ONNX Runtime {env['onnxruntime']}, OpenVINO {env['openvino']}; ISA flags: "
             f"{' '.join(env['isa_flags']) or 'none listed'}; VNNI: {'yes' if env['vnni'] else 'no'}; "
             f"{env['repeats']} interleaved rounds per configuration, fresh processes, median (p10-p90) wall seconds.",
             f"Model {env['model']}; first run on this host (may time the engines): {env['first_run_s']:.2f} s.", "",
             "| check | steps | configuration | backend line | p50 s | p10-p90 s | vs auto |",
             "|---|---:|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['check']} | {r['steps']} | {r['config']} | {r['backend'][:90]} | {r['p50_s']:.2f} | "
                     f"{r['p10_s']:.2f}-{r['p90_s']:.2f} | {r['vs_auto']:.2f}x |")
    lines += ["", *verdicts_of(rows, env["vnni"]), ""]
    return "\n".join(lines)


def verdicts_of(rows: list[dict[str, Any]], vnni: bool) -> list[str]:
    """Both checks from the report's rows (a run with --no-explicit or --no-eager keeps the same day's other rows)."""
    out = []
    for check, verdict in (("auto-vs-explicit", explicit_verdict), ("auto-vs-eager", eager_verdict)):
        sub = {r["config"]: r for r in rows if r["check"] == check}
        if "auto" in sub and len(sub) > 1:
            steps = sub["auto"]["steps"]
            out.append(verdict(sub, steps) if check == "auto-vs-explicit" else verdict(sub, steps, vnni))
    return out


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    plt = pyplot()
    checks = sorted({r["check"] for r in rows})
    fig, axes = plt.subplots(1, len(checks), figsize=(6 * len(checks), 4), squeeze=False)
    for ax, check in zip(axes[0], checks):
        sub = [r for r in rows if r["check"] == check]
        names = [r["config"] for r in sub]
        p50 = [r["p50_s"] for r in sub]
        err = [[r["p50_s"] - r["p10_s"] for r in sub], [r["p90_s"] - r["p50_s"] for r in sub]]
        colors = ["tab:green" if n == "auto" else "tab:blue" for n in names]
        ax.barh(names, p50, xerr=err, color=colors)
        ax.set_xlabel("wall seconds per ddim-run (p50, p10-p90)")
        ax.set_title(f"{check}: {sub[0]['steps']} steps, 64 images, batch 16")
    save_figure(fig, path)


@click.command()
@click.option("--model", type=click.Path(path_type=Path, exists=True), default=SHIPPED_MODEL, show_default=True,
              help="An export folder (with model.int8.onnx and its gates, for the INT8 and bf16 pairs).")
@click.option("--num-images", type=int, default=64, show_default=True)
@click.option("--steps", type=int, default=20, show_default=True, help="Steps of the auto-vs-explicit check.")
@click.option("--eager-steps", type=int, default=50, show_default=True, help="Steps of the auto-vs-eager check.")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option("--repeats", type=int, default=3, show_default=True)
@click.option("--eager/--no-eager", default=True, show_default=True, help="Run the auto-vs-eager check.")
@click.option("--explicit/--no-explicit", default=True, show_default=True, help="Run the auto-vs-explicit check.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
def main(model: Path, num_images: int, steps: int, eager_steps: int, batch_size: int, repeats: int, eager: bool,
         explicit: bool, out: Path) -> None:
    """Time ddim-run's default against every explicit CPU engine and precision, and against eager PyTorch."""
    import onnxruntime as ort

    from runtime.backends.engine_choice import openvino_version

    isa = theoretical_peak(Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else "",
                           os.cpu_count() or 1)
    flags = set(isa["isa_flags"])
    env: dict[str, Any] = {"cpu": cpu_name(), "python": f"Python {platform.python_version()}",
                           "onnxruntime": ort.__version__, "openvino": openvino_version(),
                           "isa_flags": sorted(flags), "vnni": bool(flags & {"avx512_vnni", "avx_vnni"}),
                           "repeats": repeats, "model": str(model), "num_images": num_images,
                           "batch_size": batch_size}
    rows: list[dict[str, Any]] = []
    verdicts: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        png = Path(tmp) / "grid.png"
        common = ("--num-images", str(num_images), "--batch-size", str(batch_size))
        t0 = time.perf_counter()
        process(ddim_run(model, png, *common, "--steps", "1"))()
        env["first_run_s"] = time.perf_counter() - t0
        configs: dict[str, list[str]] = {"auto": ddim_run(model, png, *common, "--steps", str(steps))}
        for engine, prec in EXPLICIT if explicit else ():
            why = runnable(model, engine, prec)
            if why:
                click.echo(f"{engine}/{prec}: not run here ({why})", err=True)
                continue
            configs[f"{engine}/{prec}"] = ddim_run(model, png, *common, "--steps", str(steps), "--backend", engine,
                                                   "--precision", prec)
        if len(configs) > 1:
            lines = {name: backend_line(cmd) for name, cmd in configs.items()}
            click.echo(f"auto-vs-explicit: {len(configs)} configurations x {repeats} rounds", err=True)
            times = round_robin({k: process(v) for k, v in configs.items()}, repeats)
            stats = {k: summarize(v) for k, v in times.items()}
            auto = stats["auto"]["p50_s"]
            for name, s in stats.items():
                rows.append({"check": "auto-vs-explicit", "steps": steps, "config": name, "backend": lines[name],
                             "p10_s": s["p10_s"], "p50_s": s["p50_s"], "p90_s": s["p90_s"], "n": s["n"],
                             "vs_auto": s["p50_s"] / auto})
            verdicts.append(explicit_verdict(stats, steps))
        if eager:
            run_dir = model if (model / "model.safetensors").is_file() else None
            if run_dir is None:
                verdicts.append("auto vs eager: not run (no model.safetensors beside the export)")
            else:
                pair = {"auto": ddim_run(model, png, *common, "--steps", str(eager_steps)),
                        "eager torch": ddim_run(run_dir, png, *common, "--steps", str(eager_steps), "--backend",
                                                "torch")}
                lines2 = {k: backend_line(v) for k, v in pair.items()}
                click.echo(f"auto-vs-eager: 2 configurations x {repeats} rounds", err=True)
                times2 = round_robin({k: process(v) for k, v in pair.items()}, repeats)
                stats2 = {k: summarize(v) for k, v in times2.items()}
                for name, s in stats2.items():
                    rows.append({"check": "auto-vs-eager", "steps": eager_steps, "config": name,
                                 "backend": lines2[name], "p10_s": s["p10_s"], "p50_s": s["p50_s"],
                                 "p90_s": s["p90_s"], "n": s["n"], "vs_auto": s["p50_s"] / stats2["auto"]["p50_s"]})
                verdicts.append(eager_verdict(stats2, eager_steps, env["vnni"]))
    for line in verdicts:
        click.echo(line, err=True)
    write_report("cpu-engines", out, env, rows, ("check", "config"), markdown, plot)


if __name__ == "__main__":
    main()
