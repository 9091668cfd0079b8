"""Latency of every backend side by side: one network forward, and a whole DDIM sampling call.

    python benchmarks/latency.py                      # keras-flowers architecture + the shipped fashion-mnist model
    python benchmarks/latency.py --quick              # about a minute on 2 cores: a smoke test
    python benchmarks/latency.py --model runs/fm --batch 1 --batch 16 --steps 50

Backends (each where available): eager PyTorch float32, eager channels_last, torch.compile,
ONNX Runtime CPU float32 and INT8 (QDQ, as `ddim-export --int8` writes it), and on a GPU eager
float16, eager float32/float16 replayed from CUDA graphs, ONNX Runtime CUDA float32 (TF32 off) and
float16 with I/O binding, and TensorRT built from model.fp16.onnx (strongly typed: a dynamic-batch
engine, and a batch-8 static engine replayed from a CUDA graph).
Latency does not depend on training, so presets are timed with their initial weights. Every
figure is the median (with p90 and p99) of repeated runs after warm-up; speed-ups are against
eager float32 measured in the same run. Writes benchmarks/results/latency-DATE-HOST.{json,md,png}.
"""

from __future__ import annotations

import contextlib
import copy
import platform
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import click
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import RESULTS, cpu_name, pyplot, save_figure, write_report  # noqa: E402
from export.int8 import Int8Options, quantize_int8  # noqa: E402
from export.io_spec import feed, input_names_of  # noqa: E402
from export.onnx_graph import write_deployed_onnx, write_fp16_onnx  # noqa: E402
from runtime.exportdir import ENGINE, FP16_ONNX, FP32_ONNX, INT8_ONNX, MANIFEST  # noqa: E402
from runtime.api import Sampler  # noqa: E402
from runtime.choices import Device, values  # noqa: E402
from runtime.common.clitools import version_option  # noqa: E402
from runtime.backends.ort_backend import OrtBackend  # noqa: E402
from runtime.config import ModelSpec, NormalizationConfig  # noqa: E402
from runtime.common.hostinfo import check_threads, physical_cores  # noqa: E402
from runtime.schedule import build_schedule, noise_variance  # noqa: E402
from runtime.settings import SamplingSettings  # noqa: E402
from runtime.common.shipped import SHIPPED_MODEL  # noqa: E402
from runtime.metadata import spec_to_metadata  # noqa: E402
from trainer.rundir import load_model  # noqa: E402
from trainer.models import build_model, forward_gflops  # noqa: E402
from trainer.presets import PRESETS, get_preset  # noqa: E402
from trainer.torch_backend import TorchBackend  # noqa: E402

Forward = Callable[[np.ndarray, np.ndarray], Any]


@dataclass
class Model:
    name: str
    module: torch.nn.Module
    spec: ModelSpec
    gflops: float


def load_subject(name: str) -> Model:
    """A preset (initial weights) or a trainer run directory."""
    if name in PRESETS:
        cfg = get_preset(name).config
        torch.manual_seed(0)
        module = build_model(cfg.model).eval()
        c = cfg.model.channels
        spec = cfg.to_spec(NormalizationConfig(mean=(0.5,) * c, std=(0.5,) * c))
    else:
        module, spec = load_model(Path(name))
        with contextlib.suppress(ValueError):
            name = str(Path(name).resolve().relative_to(ROOT))
    return Model(name, module, spec, forward_gflops(module, spec.model))


def matmul_peak(device: str, size: int = 2048, n: int = 10) -> float:
    """GFLOP/s of a float32 matmul, the best of torch and numpy (CPU): the machine's practical peak."""
    best = 0.0
    candidates: list[Callable[[], Any]] = []
    a = torch.randn(size, size, device=device)
    candidates.append(lambda: a @ a)
    if device == "cpu":
        b = np.random.default_rng(0).random((size, size), dtype=np.float32)
        candidates.append(lambda: b @ b)
    for fn in candidates:
        for _ in range(2):
            fn()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync(device)
        best = max(best, 2 * size**3 * n / (time.perf_counter() - t0) / 1e9)
    return best


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ort_export(m: Model, folder: Path, int8: bool, fp16: bool = False) -> Path:
    """The subject as ``model.onnx`` (BatchNorm folded, config inside) as ddim-export writes it, with
    ``model.fp16.onnx`` (GPU rows) and ``model.int8.onnx`` quantized the exporter's way (calibrated on the
    model's own sampling trajectories: latency does not depend on the calibration values, and presets
    have no training data here)."""
    graph, _ = write_deployed_onnx(m.module, m.spec, folder / FP32_ONNX,
                                   spec_to_metadata(m.spec, {"precision": "fp32"}))
    if fp16:
        write_fp16_onnx(graph, folder / FP16_ONNX, spec_to_metadata(m.spec, {"precision": "fp16"}))
    if int8:
        quantize_int8(folder / FP32_ONNX, folder / INT8_ONNX, m.spec, lambda: None,  # type: ignore[arg-type]
                      Int8Options(calibration="sampler", calibration_size=128))
    return folder


def forward_runners(m: Model, export_dir: Path, device: str, compile_: bool,
                    threads: int | None = None) -> dict[str, tuple[Forward, Any]]:
    """name -> (forward on host arrays, Sampler or None) for every backend available here."""
    out: dict[str, tuple[Forward, Any]] = {}

    def eager(module: torch.nn.Module, dtype: torch.dtype = torch.float32,
              fmt: torch.memory_format = torch.contiguous_format) -> Forward:
        @torch.no_grad()
        def run(x: np.ndarray, v: np.ndarray) -> Any:
            xt = torch.from_numpy(x).to(device, dtype).contiguous(memory_format=fmt)
            return module(xt, torch.from_numpy(v).to(device))
        return run

    base = m.module.to(device)
    out[f"eager fp32 ({device})"] = (eager(base), Sampler(TorchBackend(model=base, spec=m.spec, device=device,
                                                                       threads=threads)))
    cl = copy.deepcopy(base).to(memory_format=torch.channels_last)
    out[f"eager channels_last ({device})"] = (eager(cl, fmt=torch.channels_last), None)
    if device == "cuda":
        half = copy.deepcopy(base).half()
        out["eager fp16 (cuda)"] = (eager(half, torch.float16), None)
        out["eager fp32 + CUDA graph (cuda)"] = (graphed(base, torch.float32), None)
        out["eager fp16 + CUDA graph (cuda)"] = (graphed(half, torch.float16), None)
        out.update(gpu_onnx_runners(m, export_dir))
    if compile_:
        out[f"torch.compile ({device})"] = (eager(torch.compile(copy.deepcopy(base))), None)
    for precision in ("fp32", "int8"):
        if precision == "int8" and not (export_dir / INT8_ONNX).is_file():
            continue
        ort_b = OrtBackend(export_dir, "cpu", precision, threads)
        out[f"onnxruntime cpu {precision}"] = (
            lambda x, v, s=ort_b.session, n=ort_b.inputs: s.run(None, dict(zip(n, (x, v)))), Sampler(ort_b))
    return out


def graphed(module: torch.nn.Module, dtype: torch.dtype) -> Forward:
    """Eager forward captured once per input shape in a CUDA graph, then replayed (static buffers)."""
    cache: dict[tuple[int, ...], tuple[Any, torch.Tensor, torch.Tensor, Any]] = {}

    @torch.no_grad()
    def run(x: np.ndarray, v: np.ndarray) -> Any:
        if x.shape not in cache:
            sx = torch.from_numpy(x).to("cuda", dtype)
            sv = torch.from_numpy(v).to("cuda")
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (allocations, autotuning)
                for _ in range(3):
                    module(sx, sv)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = module(sx, sv)
            cache[x.shape] = (graph, sx, sv, out)
        graph, sx, sv, out = cache[x.shape]
        sx.copy_(torch.from_numpy(x))
        sv.copy_(torch.from_numpy(v))
        graph.replay()
        return out
    return run


def device_forward(backend: Any) -> Forward:
    """One forward of a GPU backend from host arrays, on the backend's stream like the sampling loop's."""
    def run(x: np.ndarray, v: np.ndarray) -> Any:
        with backend.context():
            return backend.denoise(backend.from_host(x), float(v.flat[0]))
    return run


def gpu_onnx_runners(m: Model, export_dir: Path) -> dict[str, tuple[Forward, Any]]:
    """ONNX Runtime CUDA fp32 and fp16 (I/O binding), and TensorRT from model.fp16.onnx where TensorRT is
    installed: a dynamic-batch engine, and a batch-8 static engine that the runtime replays from a CUDA graph."""
    from export.io_spec import BatchProfile
    from export.tensorrt_build import build_engine, unavailable_reason, write_manifest
    from runtime.backends.ort_backend import OrtCudaBackend, cuda_available
    from runtime.backends.tensorrt_backend import TensorRTBackend

    out: dict[str, tuple[Forward, Any]] = {}
    if cuda_available():
        for precision in ("fp32", "fp16"):
            b = OrtCudaBackend(export_dir, "cuda", precision)
            out[f"onnxruntime cuda {precision}"] = (device_forward(b), Sampler(b))
    reason = unavailable_reason()
    if reason is not None:
        click.echo(f"  TensorRT rows skipped: {reason}", err=True)
        return out
    for label, profile in (("tensorrt fp16", BatchProfile(1, 8, 64)), ("tensorrt fp16 static-8 + CUDA graph",
                                                                      BatchProfile.static(8))):
        folder = export_dir / label.replace(" ", "_")
        folder.mkdir()
        (folder / FP16_ONNX).write_bytes((export_dir / FP16_ONNX).read_bytes())
        manifest = build_engine(folder / FP16_ONNX, folder / ENGINE, m.spec, profile)
        write_manifest(folder / MANIFEST, manifest)
        b = TensorRTBackend(folder, "cuda")
        out[label] = (device_forward(b), Sampler(b))
    return out


def timed(fn: Callable[[], Any], device: str, warmup: int, repeats: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    arr = np.array(times)
    return {"median_s": float(np.median(arr)), "p90_s": float(np.percentile(arr, 90)),
            "p99_s": float(np.percentile(arr, 99)), "repeats": repeats}


def forward_inputs(spec: ModelSpec, batch: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Random images and random steps' conditioning (noise variances or timesteps) for one forward."""
    schedule = build_schedule(spec.schedule)
    total = schedule.num_timesteps
    t = rng.integers(0, total, batch) if total else rng.random(batch)
    m = spec.model
    x = rng.standard_normal((batch, m.channels, m.image_size, m.image_size), dtype=np.float32)
    inputs = feed(m, x, noise_variance(schedule, t), t)
    return x, inputs[input_names_of(m)[1]]


@dataclass(frozen=True)
class Bench:
    """How each model is timed: forward batches, sampling batches and settings, repeats, which engines."""

    device: str
    batches: tuple[int, ...]
    sample_batches: tuple[int, ...]
    settings: SamplingSettings
    warmup: int
    repeats: int
    compile_: bool
    int8: bool
    threads: int | None = None


def bench_model(m: Model, bench: Bench, peak: float) -> list[dict[str, Any]]:
    device, warmup, repeats, threads = bench.device, bench.warmup, bench.repeats, bench.threads
    steps = bench.settings.steps
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runners = forward_runners(m, ort_export(m, Path(tmp), bench.int8, fp16=device == "cuda"), device,
                                  bench.compile_, threads)
        for batch in bench.batches:
            x, v = forward_inputs(m.spec, batch, np.random.default_rng(0))
            for name, (forward, sampler) in runners.items():
                if "static-8" in name and batch != 8:
                    continue
                stats = timed(lambda: forward(x, v), device, warmup, repeats)  # noqa: B023
                row = {"model": m.name, "backend": name, "kind": "forward", "batch": batch, **stats,
                       "images_per_s": batch / stats["median_s"],
                       "gflop_s": m.gflops * batch / stats["median_s"]}
                row["share_of_peak"] = row["gflop_s"] / peak
                rows.append(row)
                click.echo(f"  {m.name:14s} {name:30s} forward  batch {batch:3d}: {stats['median_s'] * 1e3:9.2f} ms",
                           err=True)
                if sampler is None or batch not in bench.sample_batches:
                    continue
                result: list[Any] = []
                st = timed(lambda: result.append(sampler.sample(batch, bench.settings, seed=0,  # noqa: B023
                                                                batch_size=batch)),  # noqa: B023
                           device, 1, max(1, repeats // 5))
                rows.append({"model": m.name, "backend": name, "kind": f"sample {steps} steps", "batch": batch, **st,
                             "images_per_s": batch / st["median_s"],
                             "loop_overhead": result[-1].overhead_fraction})
                click.echo(f"  {m.name:14s} {name:30s} sampling batch {batch:3d}: {st['median_s']:9.2f} s "
                           f"({100 * result[-1].overhead_fraction:.1f}% outside the network)", err=True)
    reference = f"eager fp32 ({device})"
    base = {(r["model"], r["kind"], r["batch"]): r["median_s"] for r in rows if r["backend"] == reference}
    for r in rows:
        r["speedup_vs_eager_fp32"] = base[(r["model"], r["kind"], r["batch"])] / r["median_s"]
    return rows


def environment(device: str, peak: float) -> dict[str, Any]:
    import onnxruntime as ort

    return {"host": socket.gethostname(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "matmul_peak_gflop_s": round(peak, 1)}


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# Latency ({env['cpu']}, {env['threads']} threads (torch and ONNX Runtime), torch {env['torch']}, "
             f"onnxruntime {env['onnxruntime']}, {env['device']}{', ' + env['gpu'] if env['gpu'] else ''})", "",
             f"Practical peak, the best 2048^2 float32 matmul of torch and numpy: {env['matmul_peak_gflop_s']} GFLOP/s. "
             "GFLOPs count convolutions and matmuls only.", "",
             "| model | backend | what | batch | median | p90 | images/s | speed-up vs eager fp32 | GFLOP/s (share of peak) "
             "| outside the network |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        gf = f"{r['gflop_s']:.1f} ({100 * r['share_of_peak']:.0f}%)" if "gflop_s" in r else ""
        ov = f"{100 * r['loop_overhead']:.1f}%" if "loop_overhead" in r else ""
        unit = (1e3, "ms") if r["kind"] == "forward" else (1.0, "s")
        lines.append(f"| {r['model']} | {r['backend']} | {r['kind']} | {r['batch']} | {r['median_s'] * unit[0]:.2f} "
                     f"{unit[1]} | {r['p90_s'] * unit[0]:.2f} {unit[1]} | {r['images_per_s']:.2f} | "
                     f"{r['speedup_vs_eager_fp32']:.2f}x | {gf} | {ov} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Forward latency and speed-up against batch size, one panel pair per model."""
    plt = pyplot()
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for (ax_lat, ax_up), model in zip(axes, models):
        sel = [r for r in rows if r["model"] == model and r["kind"] == "forward"]
        for backend in sorted({r["backend"] for r in sel}):
            pts = sorted((r["batch"], r["median_s"] * 1e3, r["speedup_vs_eager_fp32"]) for r in sel
                         if r["backend"] == backend)
            ax_lat.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
            ax_up.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=backend)
        ax_lat.set(title=f"{model}: one forward", xlabel="batch", ylabel="median latency (ms)", xscale="log",
                   yscale="log")
        ax_up.set(title=f"{model}: speed-up over eager fp32", xlabel="batch", ylabel="x", xscale="log")
        ax_up.axhline(1.0, color="grey", lw=0.8)
        for ax in (ax_lat, ax_up):
            ax.grid(alpha=0.3)
        ax_up.legend(fontsize=7)
    save_figure(fig, path)


@click.command()
@click.option("--model", "models", multiple=True,
              help="A preset name (random weights) or a trainer run directory [default: keras-flowers and the "
                   "shipped models/fashion-mnist].")
@click.option("--batch", "batches", type=int, multiple=True, help="[default: 1 8 32 64]")
@click.option("--sample-batch", "sample_batches", type=int, multiple=True,
              help="Batches for the whole-sampling figure [default: 1 8].")
@click.option("--steps", type=int, default=50, show_default=True, help="DDIM steps of the sampling figure.")
@click.option("--repeats", type=int, default=10, show_default=True)
@click.option("--warmup", type=int, default=3, show_default=True)
@click.option("--compile/--no-compile", "compile_", default=True, show_default=True, help="Time torch.compile.")
@click.option("--int8/--no-int8", default=True, show_default=True, help="Time ONNX Runtime INT8 (QDQ) too.")
@click.option("--device", type=click.Choice(values(Device)), default=None, help="[default: cuda when available]")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help=f"CPU threads of torch and ONNX Runtime [default: one per physical core, {physical_cores()} here].")
@click.option("--quick", is_flag=True, help="Small run (about a minute on 2 cores): batches 1 and 8, 10 steps.")
@click.option("--out", type=click.Path(path_type=Path), default=RESULTS, show_default=True)
@version_option
def main(models: tuple[str, ...], batches: tuple[int, ...], sample_batches: tuple[int, ...], steps: int,
         repeats: int, warmup: int, compile_: bool, int8: bool, device: str | None, threads: int | None, quick: bool,
         out: Path) -> None:
    """Time every backend on the machine at hand and write JSON, Markdown and a plot."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    threads = check_threads(threads)
    torch.set_num_threads(threads)  # every torch row, the matmul peak included, on the same threads as ORT
    if quick:
        batches, sample_batches, steps, repeats, warmup, compile_ = batches or (1, 8), sample_batches or (1,), 10, \
            5, 1, False
    models = models or ("keras-flowers", str(SHIPPED_MODEL) if SHIPPED_MODEL.is_dir() else "fashion-mnist")
    peak = matmul_peak(device)
    click.echo(f"latency: {', '.join(models)} on {device}, {threads} threads (matmul peak {peak:.0f} GFLOP/s)",
               err=True)
    bench = Bench(device, tuple(batches or (1, 8, 32, 64)), tuple(sample_batches or (1, 8)),
                  SamplingSettings(steps), warmup, repeats, compile_, int8, threads)
    rows = []
    for name in models:
        rows += bench_model(load_subject(name), bench, peak)
    env = environment(device, peak)
    _, stem = write_report("latency", out, env, rows, ("model", "backend", "kind", "batch"), markdown, plot)
    click.echo(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
