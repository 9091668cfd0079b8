"""Latency of every backend side by side: one network forward, and a whole DDIM sampling call.

    python benchmarks/latency.py                      # keras-flowers architecture + the shipped fashion-mnist model
    python benchmarks/latency.py --quick              # about a minute on 2 cores: a smoke test
    python benchmarks/latency.py --model runs/fm --batch 1 --batch 16 --steps 50

Backends (each where available): eager PyTorch float32, eager channels_last, torch.compile,
ONNX Runtime CPU float32 and INT8 (QDQ, as `ddim-export --int8` writes it), OpenVINO CPU float32, bfloat16
(where the CPU has it) and INT8 (through `runtime.api.load(..., backend="openvino")`), and on a GPU eager
float16, eager float32/float16 replayed from CUDA graphs, ONNX Runtime CUDA float32 (TF32 off) and
float16 with I/O binding, and TensorRT built from model.fp16.onnx (strongly typed: a dynamic-batch
engine, and a batch-8 static engine replayed from a CUDA graph).
Latency does not depend on training, so presets are timed with their initial weights. The backends are
timed interleaved, round-robin (one call of each per round, warm-up rounds discarded), and every figure is
p10 / p50 / p90 of the timed rounds (a loaded machine shows as a wide spread); speed-ups are p50 against eager
float32 of the same run. Engines that are absent get a row saying why. Achieved GFLOP/s is set against two peaks:
the CPU's theoretical float32 peak from its ISA and clock, and a measured torch float32 2048^2 matmul; a share
above 100% is printed as invalid. Writes benchmarks/results/latency-DATE-HOST.{json,md,png}.
"""

from __future__ import annotations

import contextlib
import copy
import os
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

from benchmarks.common import (RESULTS, cpu_name, pyplot, round_robin, save_figure, share_label,  # noqa: E402
                               summarize, theoretical_peak, write_report)
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


def matmul_peak(device: str, size: int = 2048, n: int = 10) -> tuple[float, str]:
    """GFLOP/s of the fastest float32 ``size``^2 matmul present, the best single call of ``n`` after warm-up, and
    what ran it: torch.matmul; numpy only where torch's fails, and never when OPENBLAS_CORETYPE is set (it forces
    OpenBLAS onto another core type's kernels, so the figure would not be this CPU's)."""
    flops = 2 * size**3
    try:
        a = torch.randn(size, size, device=device)
        fn: Callable[[], Any] = lambda: torch.matmul(a, a)  # noqa: E731
        source = f"torch.matmul float32 {size}^2, best of {n}"
    except Exception as exc:  # noqa: BLE001 - any failure of torch's matmul falls back (or is reported)
        if device != "cpu" or os.environ.get("OPENBLAS_CORETYPE"):
            why = "OPENBLAS_CORETYPE is set: numpy not used" if device == "cpu" else "no CPU fallback on a GPU"
            return 0.0, f"torch.matmul failed ({exc}); {why}"
        b = np.random.default_rng(0).random((size, size), dtype=np.float32)
        fn = lambda: b @ b  # noqa: E731
        source = f"numpy float32 {size}^2 (torch.matmul failed: {exc}), best of {n}"
    for _ in range(2):
        fn()
    sync(device)
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    if device == "cpu" and os.environ.get("OPENBLAS_CORETYPE"):
        source += f" (OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} is set: numpy never used)"
    return flops / best / 1e9, source


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


def forward_runners(m: Model, export_dir: Path, device: str, compile_: bool, threads: int | None = None,
                    absent: dict[str, str] | None = None) -> dict[str, tuple[Forward, Any]]:
    """name -> (forward on host arrays, Sampler or None) for every backend available here; ``absent`` gets
    name -> why for the CPU engines and precisions that are not."""
    out: dict[str, tuple[Forward, Any]] = {}
    absent = {} if absent is None else absent

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
    else:
        absent[f"torch.compile ({device})"] = "not timed (--no-compile, or --quick)"
    no_int8 = f"the export has no {INT8_ONNX} (--no-int8)"
    for precision in ("fp32", "int8"):
        if precision == "int8" and not (export_dir / INT8_ONNX).is_file():
            absent[f"onnxruntime cpu {precision}"] = no_int8
            continue
        ort_b = OrtBackend(export_dir, "cpu", precision, threads)
        out[f"onnxruntime cpu {precision}"] = (
            lambda x, v, s=ort_b.session, n=ort_b.inputs: s.run(None, dict(zip(n, (x, v)))), Sampler(ort_b))
    out.update(openvino_runners(export_dir, threads, absent))
    return out


def openvino_runners(export_dir: Path, threads: int | None, absent: dict[str, str]) -> dict[str, tuple[Forward, Any]]:
    """OpenVINO CPU fp32, bf16 (where the CPU has it) and int8 (where the export has model.int8.onnx), opened as
    ddim-run opens them (``runtime.api.load``); each one that cannot be opened goes to ``absent`` with the reason."""
    from runtime.api import load
    from runtime.backends.base import BackendError

    out: dict[str, tuple[Forward, Any]] = {}
    for precision in ("fp32", "bf16", "int8"):
        name = f"openvino cpu {precision}"
        if precision == "int8" and not (export_dir / INT8_ONNX).is_file():
            absent[name] = f"the export has no {INT8_ONNX} (--no-int8)"
            continue
        try:
            sampler = load(export_dir, backend="openvino", device="cpu", precision=precision,  # type: ignore[arg-type]
                           threads=threads)
        except BackendError as exc:
            absent[name] = str(exc).splitlines()[0]
            continue
        out[name] = (lambda x, v, b=sampler.backend: b.denoise(x, float(v.flat[0])), sampler)
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
    """One function alone: ``warmup`` discarded calls, then ``repeats`` timed (see :func:`timed_interleaved`)."""
    return timed_interleaved({"fn": fn}, device, warmup, repeats)["fn"]


def timed_interleaved(fns: dict[str, Callable[[], Any]], device: str, warmup: int,
                      repeats: int) -> dict[str, dict[str, Any]]:
    """Every function timed round-robin for ``warmup + repeats`` rounds; the warm-up rounds are discarded, and
    each gets p10 / p50 / p90 (``median_s`` is p50) of the rest."""
    samples = round_robin(fns, warmup + repeats, sync=lambda: sync(device))
    out = {}
    for name, times in samples.items():
        st = summarize(times, warmup)
        out[name] = {**st, "median_s": st["p50_s"], "repeats": repeats, "warmup": warmup}
    return out


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


def bench_model(m: Model, bench: Bench, peak: float, isa_peak: float = 0.0) -> list[dict[str, Any]]:
    device, warmup, repeats, threads = bench.device, bench.warmup, bench.repeats, bench.threads
    steps = bench.settings.steps
    rows: list[dict[str, Any]] = []
    absent: dict[str, str] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runners = forward_runners(m, ort_export(m, Path(tmp), bench.int8, fp16=device == "cuda"), device,
                                  bench.compile_, threads, absent)
        for name, why in absent.items():
            rows.append({"model": m.name, "backend": name, "kind": "absent", "batch": 0, "absent": why})
            click.echo(f"  {m.name:14s} {name:30s} absent: {why}", err=True)
        for batch in bench.batches:
            x, v = forward_inputs(m.spec, batch, np.random.default_rng(0))
            here = {n: r for n, r in runners.items() if "static-8" not in n or batch == 8}
            stats = timed_interleaved({n: (lambda f=f: f(x, v)) for n, (f, _) in here.items()},  # noqa: B023
                                      device, warmup, repeats)
            for name in here:
                st = stats[name]
                row = {"model": m.name, "backend": name, "kind": "forward", "batch": batch, **st,
                       "images_per_s": batch / st["median_s"], "gflop_s": m.gflops * batch / st["median_s"]}
                row["share_of_peak"] = row["gflop_s"] / peak if peak else float("nan")
                row["share_of_isa_peak"] = row["gflop_s"] / isa_peak if isa_peak else float("nan")
                rows.append(row)
                click.echo(f"  {m.name:14s} {name:30s} forward  batch {batch:3d}: p50 {st['p50_s'] * 1e3:9.2f} ms "
                           f"(p10 {st['p10_s'] * 1e3:.2f}, p90 {st['p90_s'] * 1e3:.2f})", err=True)
            if batch not in bench.sample_batches:
                continue
            samplers = {n: s for n, (_, s) in here.items() if s is not None}
            last: dict[str, Any] = {}

            def sample(n: str, b: int = batch) -> None:
                last[n] = samplers[n].sample(b, bench.settings, seed=0, batch_size=b)

            sstats = timed_interleaved({n: (lambda n=n: sample(n)) for n in samplers}, device, 1,
                                       max(3, repeats // 5))  # 3 at least: a spread
            for name in samplers:
                st = sstats[name]
                rows.append({"model": m.name, "backend": name, "kind": f"sample {steps} steps", "batch": batch, **st,
                             "images_per_s": batch / st["median_s"], "loop_overhead": last[name].overhead_fraction})
                click.echo(f"  {m.name:14s} {name:30s} sampling batch {batch:3d}: p50 {st['p50_s']:9.2f} s "
                           f"({100 * last[name].overhead_fraction:.1f}% outside the network)", err=True)
    reference = f"eager fp32 ({device})"
    base = {(r["model"], r["kind"], r["batch"]): r["median_s"] for r in rows if r["backend"] == reference}
    for r in rows:
        if "median_s" in r:
            r["speedup_vs_eager_fp32"] = base[(r["model"], r["kind"], r["batch"])] / r["median_s"]
    return rows


def environment(device: str, peak: float, peak_source: str = "", isa: dict[str, Any] | None = None) -> dict[str, Any]:
    import onnxruntime as ort

    try:
        import openvino

        ov_version: str | None = openvino.__version__
    except ImportError:
        ov_version = None
    isa = isa or {}
    return {"host": socket.gethostname(), "cpu": cpu_name(), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "torch": torch.__version__, "onnxruntime": ort.__version__,
            "openvino": ov_version,
            "device": device, "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
            "matmul_peak_gflop_s": round(peak, 1), "matmul_peak_source": peak_source,
            "isa_peak_gflop_s": round(isa.get("gflop_s", 0.0), 1), "isa_peak_formula": isa.get("formula", ""),
            "isa_flags": isa.get("isa_flags", []),
            "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE")}


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    isa_peak = env.get("isa_peak_gflop_s") or 0.0
    measured_share = f", {share_label(env['matmul_peak_gflop_s'] / isa_peak)} of the theoretical" if isa_peak else ""
    lines = [f"# Latency ({env['cpu']}, {env['threads']} threads (torch, ONNX Runtime and OpenVINO), torch "
             f"{env['torch']}, onnxruntime {env['onnxruntime']}, openvino {env.get('openvino')}, {env['device']}"
             f"{', ' + env['gpu'] if env['gpu'] else ''})", "",
             f"CPU flags (vector and matrix): {' '.join(env.get('isa_flags', [])) or 'unknown'}.", "",
             f"Theoretical float32 peak: {env.get('isa_peak_formula') or 'unknown'} (FMA units per core are an "
             "assumption, the clock is /proc/cpuinfo's, turbo and AVX-512 down-clocking not counted). Measured peak: "
             f"{env['matmul_peak_gflop_s']} GFLOP/s ({env.get('matmul_peak_source') or 'best 2048^2 float32 matmul'}"
             f"{measured_share})."
             " GFLOPs count convolutions and matmuls only; int8 and bf16 rows do not run float32 work, so their share "
             "of a float32 peak may read invalid.", "",
             "Backends timed interleaved (round-robin), warm-up rounds discarded; p10 / p50 / p90 of the timed rounds.",
             "",
             "| model | backend | what | batch | p10 | p50 | p90 | images/s | speed-up vs eager fp32 (p50) | GFLOP/s "
             "| share of theoretical peak | share of measured peak | outside the network |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "absent" in r:
            lines.append(f"| {r['model']} | {r['backend']} | absent: {r['absent']} | | | | | | | | | | |")
            continue
        gf = f"{r['gflop_s']:.1f}" if "gflop_s" in r else ""
        sh_isa = share_label(r["gflop_s"] / isa_peak) if "gflop_s" in r and isa_peak else ""
        sh_mm = share_label(r["gflop_s"] / env["matmul_peak_gflop_s"]) if "gflop_s" in r and \
            env["matmul_peak_gflop_s"] else ""
        ov = f"{100 * r['loop_overhead']:.1f}%" if "loop_overhead" in r else ""
        k, u, d = (1e3, "ms", 2) if r["kind"] == "forward" else (1.0, "s", 3)
        p10, p90 = r.get("p10_s", r["median_s"]), r["p90_s"]
        lines.append(f"| {r['model']} | {r['backend']} | {r['kind']} | {r['batch']} | {p10 * k:.{d}f} {u} | "
                     f"{r['median_s'] * k:.{d}f} {u} | {p90 * k:.{d}f} {u} | {r['images_per_s']:.2f} | "
                     f"{r['speedup_vs_eager_fp32']:.2f}x | {gf} | {sh_isa} | {sh_mm} | {ov} |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Forward latency and speed-up against batch size, one panel pair per model."""
    plt = pyplot()
    models = sorted({r["model"] for r in rows if "median_s" in r})
    fig, axes = plt.subplots(len(models), 2, figsize=(11, 3.6 * len(models)), squeeze=False)
    for (ax_lat, ax_up), model in zip(axes, models):
        sel = [r for r in rows if r["model"] == model and r["kind"] == "forward" and "median_s" in r]
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


QUICK_WARMUP, QUICK_REPEATS = 3, 7  # the median is the 4th of 7 timed rounds: never a cold first call


def cpuinfo_text() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


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
@click.option("--int8/--no-int8", default=True, show_default=True,
              help="Time INT8 (QDQ model.int8.onnx) on ONNX Runtime and OpenVINO too.")
@click.option("--device", type=click.Choice(values(Device)), default=None, help="[default: cuda when available]")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help=f"CPU threads of torch, ONNX Runtime and OpenVINO [default: one per physical core, "
                   f"{physical_cores()} here].")
@click.option("--quick", is_flag=True, help="Small run (a few minutes on 2 cores): batches 1 and 8, 10 steps, "
              f"{QUICK_WARMUP} discarded warm-up and {QUICK_REPEATS} timed rounds.")
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
            QUICK_REPEATS, QUICK_WARMUP, False
    models = models or ("keras-flowers", str(SHIPPED_MODEL) if SHIPPED_MODEL.is_dir() else "fashion-mnist")
    peak, peak_source = matmul_peak(device)
    isa = theoretical_peak(cpuinfo_text(), min(threads, physical_cores()))
    click.echo(f"latency: {', '.join(models)} on {device}, {threads} threads (theoretical peak: {isa['formula']}; "
               f"measured: {peak:.0f} GFLOP/s, {peak_source})", err=True)
    bench = Bench(device, tuple(batches or (1, 8, 32, 64)), tuple(sample_batches or (1, 8)),
                  SamplingSettings(steps), warmup, repeats, compile_, int8, threads)
    rows = []
    for name in models:
        rows += bench_model(load_subject(name), bench, peak, isa["gflop_s"])
    env = environment(device, peak, peak_source, isa)
    _, stem = write_report("latency", out, env, rows, ("model", "backend", "kind", "batch"), markdown, plot)
    click.echo(f"wrote {stem}.json, .md and .png")


if __name__ == "__main__":
    main()
