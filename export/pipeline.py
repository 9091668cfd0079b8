"""A trainer run directory (or a diffusers folder) to an export directory, staged so that nothing half-written
looks valid.

The source is a run directory of ours (rebuilt by ``trainer.rundir``) or a diffusers UNet2DModel folder
(``export.from_diffusers``: checked whole before ``--out`` is touched, so a refused folder writes nothing);
both go through the same files and gates.

Everything is written into a hidden staging folder ``.NAME.partial-PID`` beside the target and
renamed into place only after every file passed the parity gate; an interrupted or failed export
leaves the previous contents of ``--out`` (if any) untouched. The rename is the only commit point:
the previous export moves to ``.NAME.old-PID`` first and is deleted once the new one is in place.

Ownership: ``--out`` is replaced only when it is an export of ours (it holds ``export_report.json``,
written last) holding nothing but the files its report lists, and ``--force`` is given (or it is the default
folder); a run directory, any other folder, an export the user added files to and any file are never replaced
(an older report lists no files: then only the export file names of ``runtime.exportdir`` count as the
export's). One export at a time per ``--out`` (an OS lock), and each export first finishes what a killed one
left: stale staging folders are removed (under the lock no other export into ``--out`` can be running), and an
``--out`` that a kill between the two renames left missing is restored from ``.NAME.old-PID``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import onnx

from export.from_diffusers import (LOOKED_FOR, DiffusersFolder, DiffusersFolderError, diffusers_layout,
                                   load_denoiser, read_folder, source_info)
from export import engine_gates
from export.int8 import GateOptions, Int8Options, SameNoiseGate, quantize_int8
from export.io_spec import BatchProfile
from export.onnx_graph import OPSET, embedding_nodes, float32_nodes, save_checked, write_deployed_onnx, write_fp16_onnx
from export.parity import FP16_TOLERANCE, FP32_TOLERANCE, ParityResult, check_file, compare, gate_providers
from export.tensorrt_build import (build_engine, engine_runner, equivalent_commands, unavailable_reason,
                                   write_manifest)
from runtime import __version__
from runtime.backends import BackendError, engine_choice, precision
from runtime.backends.ort_backend import OrtBackend
from runtime.exportdir import (ENGINE, FP16_ONNX, FP32_ONNX, INT8_ONNX, MANIFEST, REPORT, REPORT_FILES, foreign_files,
                               is_export, is_run_dir, written_files)
from runtime.common.files import PathLock, fsync_dir, replace_dir, sha256_file
from runtime.common.limits import SizeLimits
from runtime.metadata import spec_to_metadata
from trainer.rundir import CONFIG, WEIGHTS, load_model
from trainer.data import model_split_images

log = logging.getLogger(__name__)


class ParityError(RuntimeError):
    """An exported file that does not agree with the eager model."""


@dataclass(frozen=True)
class ExportOptions:
    """What ``ddim-export`` writes, and how."""

    fp16: bool = False
    """Also write model.fp16.onnx, and model.plan where TensorRT and a GPU exist."""
    raw_weights: bool = False
    """Export the raw weights instead of the EMA weights."""
    force: bool = False
    """Replace an earlier export in --out (a default --out is replaced anyway); run directories, other
    folders and files are never replaced."""
    require_engine: bool = False
    """Fail when the TensorRT engine cannot be built here."""
    profile: BatchProfile = BatchProfile()
    optimization_level: int = 3
    """TensorRT builder optimisation level (0-5)."""
    timing_cache: Path | None = None
    """TensorRT timing cache [default: one per TensorRT version and GPU under ~/.cache/ddim-deploy/tensorrt/]."""
    opset: int = OPSET
    int8: bool = False
    """Also write model.int8.onnx (static QDQ INT8 for CPUs), behind a quality gate, timed against float32."""
    int8_options: Int8Options = Int8Options()
    int8_gate: GateOptions = GateOptions()
    data_path: Path | None = None
    """Where the training data lies, for INT8 calibration and the FD gate [default: where the trainer finds it]."""
    limits: SizeLimits = SizeLimits()
    progress: bool = True
    """Progress bars on stderr for the long steps (the INT8 quality gate)."""

    def __post_init__(self) -> None:
        if not 0 <= self.optimization_level <= 5:
            raise ValueError(f"optimization_level must lie in 0-5, got {self.optimization_level}")


@dataclass
class ExportReport:
    """What was written, how long it took, and how well each file agrees with eager PyTorch."""

    out: Path
    files: dict[str, int] = field(default_factory=dict)  # name -> bytes
    seconds: dict[str, float] = field(default_factory=dict)
    parity: list[ParityResult] = field(default_factory=list)
    float32_in_fp16: list[str] = field(default_factory=list)
    int8: dict[str, Any] = field(default_factory=dict)
    engine_gates: dict[str, Any] = field(default_factory=dict)  # "openvino/int8" -> its gate (with --int8)
    cpu_timing: dict[str, Any] = field(default_factory=dict)  # every gated pair timed here (with --int8)
    tensorrt_commands: dict[str, str] = field(default_factory=dict)  # trtexec / polygraphy for model.fp16.onnx
    notes: list[str] = field(default_factory=list)
    source: dict[str, Any] = field(default_factory=dict)  # what was exported: our run, or a diffusers folder


_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")


def is_our_export(folder: Path) -> bool:
    """A folder ``ddim-export`` wrote (:func:`runtime.exportdir.is_export`) and may replace: not through a link."""
    return not folder.is_symlink() and is_export(folder)


def check_out_dir(out: Path, force: bool, flag: str = "--out") -> None:
    """Refuse an output folder (given as ``flag``) that is not ours to replace (see the module docstring)."""
    if out.is_symlink():
        raise FileExistsError(f"{flag} {out} is a symlink (to {os.readlink(out)}), not an export folder; it is never "
                              f"replaced or followed: pick another {flag}")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{flag} {out} is a file, not an export folder; it is never replaced: "
                              f"pick another {flag}")
    if not out.exists() or not any(out.iterdir()):
        return
    if is_run_dir(out):
        raise FileExistsError(f"{flag} {out} is a training run directory; it is never replaced (even with --force): "
                              f"pick another {flag}")
    if not is_our_export(out):
        raise FileExistsError(f"{flag} {out} holds files that are not an export of ddim-export (no {REPORT}); it is "
                              f"never replaced (even with --force): pick another {flag}")
    foreign, listed = foreign_files(out)
    if foreign:
        names = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        why = "" if listed else f" (its {REPORT} is older and lists no files: only the export's own file names count)"
        raise FileExistsError(f"{flag} {out} holds an earlier export plus files it did not write ({names}){why}; it "
                              f"is never replaced (even with --force): move them out or pick another {flag}")
    if not force:
        raise FileExistsError(f"{flag} {out} holds an earlier export; pass --force to replace it")


@contextlib.contextmanager
def export_folder(out: Path, force: bool, flag: str = "--out") -> Iterator[Path]:
    """Hold ``out``'s lock, finish what a killed export into it left, and refuse it unless it is ours to
    replace; yields ``out`` with a name (staging and the lock live beside it). Shared by every exporter."""
    if out.name in ("", ".", ".."):
        out = out.resolve()
    try:
        lock = PathLock(out, "export folder").__enter__()
    except OSError as exc:
        raise FileExistsError(f"cannot create {flag} {out}: {exc.strerror or exc}") from None
    try:
        for line in recover_staging(out):
            log.info("%s", line)
        check_out_dir(out, force, flag)
        yield out
    finally:
        lock.__exit__()


def recover_staging(out: Path) -> list[str]:
    """Finish what a killed export into ``out`` left (call with ``out``'s lock held): remove its
    staging folders and restore ``out`` from ``.NAME.old-PID`` when a kill came between
    the two renames of the commit. Returns what it did, one phrase each."""
    done: list[str] = []
    if not out.parent.is_dir():
        return done
    found = []
    for p in out.parent.iterdir():
        m = _STAGING.match(p.name)
        # Under out's lock no other export into out runs: every staging entry of its name is stale,
        # even where its PID now belongs to another process (PIDs are reused).
        if m and m["name"] == out.name and p.is_dir() and not p.is_symlink():
            found.append((m["kind"], p))
    # Newest previous export first: it is the one the cut commit was replacing.
    for kind, p in sorted(found, key=lambda kp: (kp[0] != "old", -kp[1].stat().st_mtime)):
        if kind == "old" and not out.exists() and is_our_export(p):
            os.replace(p, out)
            fsync_dir(out.parent)
            done.append(f"restored {out} from {p.name} (an export was killed while replacing it)")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name} (left by a killed export)")
    return done


def read_source(run_dir: Path, opts: ExportOptions) -> DiffusersFolder | None:
    """The checked diffusers folder ``run_dir`` is, or None for a run directory of ours (checked as it loads);
    a folder that is neither is refused saying what was looked for."""
    if diffusers_layout(run_dir) is None:
        # lexists: a config.json that is a FIFO or a link to a device is ours to refuse as "not a regular file"
        if run_dir.is_dir() and not os.path.lexists(run_dir / CONFIG):
            raise DiffusersFolderError(f"{run_dir} is not a model folder: looked for {LOOKED_FOR}")
        return None
    if opts.raw_weights:
        raise DiffusersFolderError("--raw-weights: a diffusers folder holds one set of weights (no EMA / raw pair)")
    # No dataset config: INT8 calibrates on the model's own DDIM trajectories (see _write_int8).
    if opts.int8 and opts.data_path is not None:
        raise DiffusersFolderError("--data: a diffusers folder names no training data; --int8 calibrates on the "
                                   "model's own DDIM samples")
    if opts.int8 and opts.int8_options.calibration == "data":
        raise DiffusersFolderError("--int8-calibration data: a diffusers folder names no training data; use sampler "
                                   "(the model's own DDIM samples)")
    return read_folder(run_dir, opts.limits)


def export_run(run_dir: Path, out: Path, opts: ExportOptions) -> ExportReport:
    """Export the model of ``run_dir`` into ``out`` (see the module docstring)."""
    folder = read_source(run_dir, opts)  # before the lock: a refused folder leaves nothing behind
    with export_folder(out, opts.force) as out:
        return _export(run_dir, folder, out, opts)


def _load(run_dir: Path, folder: DiffusersFolder | None, opts: ExportOptions,
          report: ExportReport) -> tuple[Any, Any, dict[str, Any]]:
    """The eager model, its spec, and what the ONNX metadata records of the source; fills ``report.source``."""
    if folder is not None:
        model, spec = load_denoiser(folder), folder.spec
        report.source = source_info(folder)
        report.notes.extend(folder.notes)
        info = {"weights": "diffusers", "weights_sha256": report.source["unet_sha256"],
                "source_diffusers": folder.path.resolve().name, "diffusers_version": folder.diffusers_version}
        return model, spec, info
    weights = "raw" if opts.raw_weights else "ema"
    model, spec = load_model(run_dir, weights, opts.limits)
    info = {"weights": weights, "weights_sha256": sha256_file(run_dir / WEIGHTS), "source_run": run_dir.resolve().name}
    report.source = {"kind": "run", "folder": str(run_dir.resolve()), "weights": weights,
                     "weights_sha256": info["weights_sha256"]}
    return model, spec, info


def _export(run_dir: Path, folder: DiffusersFolder | None, out: Path, opts: ExportOptions) -> ExportReport:
    report = ExportReport(out)
    model, spec, source = _load(run_dir, folder, opts, report)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        info = {"toolkit_version": __version__, **source, "opset": opts.opset}
        fp32 = _write_onnx(model, spec, staging, info, opts, report)
        if opts.int8:
            _write_int8(spec, staging, info, opts, report, has_data=folder is None)
        if opts.fp16:
            _write_fp16(model, spec, fp32, staging, info, report)
            report.tensorrt_commands = equivalent_commands(FP16_ONNX, spec, opts.profile,
                                                           opts.optimization_level, FP16_TOLERANCE)
            _write_engine(model, spec, staging, opts, report)
        summary = {**_summary(report), REPORT_FILES: written_files(staging)}  # what --force may replace later
        (staging / REPORT).write_text(json.dumps(summary, indent=2) + "\n")  # last: marks it complete
        replace_dir(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    report.files = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    return report


def _write_onnx(model: Any, spec: Any, staging: Path, info: dict, opts: ExportOptions,
                report: ExportReport) -> onnx.ModelProto:
    start = time.perf_counter()
    graph, folded = write_deployed_onnx(model, spec, staging / FP32_ONNX,
                                        spec_to_metadata(spec, {**info, "precision": "fp32"}), opts.opset)
    if folded:
        report.notes.append(f"folded {folded} BatchNorm layers into the following convolutions (exact)")
    report.seconds[FP32_ONNX] = time.perf_counter() - start
    # The gate compares the folded graph with the original eager model.
    _gate(model, spec, staging / FP32_ONNX, FP32_TOLERANCE, report)
    return graph


def _write_fp16(model: Any, spec: Any, fp32: onnx.ModelProto, staging: Path, info: dict,
                report: ExportReport) -> None:
    start = time.perf_counter()
    write_fp16_onnx(fp32, staging / FP16_ONNX, spec_to_metadata(spec, {**info, "precision": "fp16"}))
    report.seconds[FP16_ONNX] = time.perf_counter() - start
    embed = set(embedding_nodes(fp32.graph))
    kept = float32_nodes(fp32)
    report.float32_in_fp16 = [f"embedding path ({', '.join(sorted({n.op_type for n in kept if n.name in embed}))})"]
    report.float32_in_fp16 += sorted({n.op_type for n in kept if n.name not in embed})
    _gate(model, spec, staging / FP16_ONNX, FP16_TOLERANCE, report)


def _write_int8(spec: Any, staging: Path, info: dict, opts: ExportOptions, report: ExportReport,
                has_data: bool = True) -> None:
    images = functools.cache(lambda: model_split_images(spec, "train", opts.data_path)) if has_data else None
    int8_options = opts.int8_options
    if not has_data and int8_options.calibration != "sampler":  # "data" was refused in read_source
        int8_options = dataclasses.replace(int8_options, calibration="sampler")
        report.notes.append("INT8 calibrated on the model's own DDIM samples (--int8-calibration sampler): a "
                            "diffusers folder names no training data")
    path = staging / INT8_ONNX
    q = quantize_int8(staging / FP32_ONNX, path, spec, images, int8_options)
    save_checked(onnx.load(str(path)), path, spec_to_metadata(spec, {**info, "precision": "int8"}))
    report.seconds[INT8_ONNX] = q.seconds
    log.info("INT8: calibrated on %s; integer ops: %s", q.calibration,
             ", ".join(f"{k} x{v}" for k, v in sorted(q.quantized_ops.items())))
    start = time.perf_counter()
    gates = SameNoiseGate(staging / FP32_ONNX, spec, images, opts.int8_gate, opts.progress)
    gate = gates.check(lambda: OrtBackend(path, "cpu"))
    report.seconds["int8 quality gate"] = time.perf_counter() - start
    report.int8 = {"calibration": q.calibration, "kept_float32": q.kept_float32, "quantized_ops": q.quantized_ops,
                   "gate": {**dataclasses.asdict(gate), "passed": gate.passed, "fd_ratio": gate.fd_ratio},
                   "gate_thresholds": dataclasses.asdict(opts.int8_gate)}
    log.info("%s", gate.line())
    if not gate.passed:
        raise ParityError(f"INT8 quality gate failed: {'; '.join(gate.failures)}; nothing was written "
                          "(try --int8-calibration or --int8-method, or export without --int8)")
    # What ddim-run's precision auto reads: the files that passed, and how fast each runs on this CPU.
    report.int8["sha256"] = {name: sha256_file(staging / name) for name in precision.FILES}
    # The same gates per (engine, precision) for OpenVINO; recorded, never fatal (export/engine_gates.py).
    start = time.perf_counter()
    report.engine_gates = engine_gates.measure(staging, spec, gates)
    report.seconds["engine gates"] = time.perf_counter() - start
    # How fast every gated pair runs on this CPU, interleaved (what ddim-run --backend auto reads on this host);
    # ONNX Runtime's own precision auto reads its two files' figures from it.
    start = time.perf_counter()
    report.cpu_timing = engine_choice.export_timing(staging, report.engine_gates)
    report.int8["timing"] = engine_choice.int8_timing(report.cpu_timing)
    report.seconds["cpu timing"] = time.perf_counter() - start
    for line in engine_choice.timing_lines(report.cpu_timing):
        log.info("%s", line)
    log.info("%s", precision.timing_line(report.int8["timing"]))


def _gate(model: Any, spec: Any, path: Path, tolerance: float, report: ExportReport) -> None:
    providers, note = gate_providers()
    if note:
        report.notes.append(f"{path.name}: checked on ONNX Runtime CPU only ({note})")
    data = path.read_bytes()
    for provider in providers:
        try:
            result = check_file(model, data, path.name, spec, provider, tolerance)
        except BackendError as exc:  # CUDA provider installed but not starting: say so, gate on the CPU
            report.notes.append(f"{path.name}: not checked on {provider} ({exc})")
            continue
        _record(result, report)


def _record(result: ParityResult, report: ExportReport) -> None:
    report.parity.append(result)
    log.info("parity %s", result.line())
    if not result.passed:
        raise ParityError(
            f"parity gate failed: {result.file} on {result.provider} differs from eager PyTorch by "
            f"{result.max_rel:.3g} relative (max abs {result.max_abs:.3g}, batch {result.worst_batch}; "
            f"tolerance {result.tolerance:g}); nothing was written"
        )


def _write_engine(model: Any, spec: Any, staging: Path, opts: ExportOptions, report: ExportReport) -> None:
    reason = unavailable_reason()
    if reason is not None:
        msg = (f"model.plan not built: a TensorRT engine needs TensorRT and a CUDA GPU ({reason}); on such a "
               "machine run ddim-export again with --fp16, or build it with the trtexec command below")
        if opts.require_engine:
            raise RuntimeError(msg)
        report.notes.append(msg)
        return
    # Strongly typed: the engine takes its precision from the FP16 graph (float32 I/O, embedding and
    # normalisation kept float32), never from builder flags.
    manifest = build_engine(staging / FP16_ONNX, staging / ENGINE, spec, opts.profile,
                            opts.timing_cache, opts.optimization_level)
    report.seconds[ENGINE] = manifest["build_seconds"]
    batches = tuple(sorted({opts.profile.min, opts.profile.opt, opts.profile.max}))
    result = compare(model, engine_runner(staging / ENGINE, spec), ENGINE, spec, "TensorRT", FP16_TOLERANCE,
                     batches)
    _record(result, report)
    write_manifest(staging / MANIFEST, manifest)


def _summary(report: ExportReport) -> dict[str, Any]:
    return {
        "seconds": {k: round(v, 3) for k, v in report.seconds.items()},
        "parity": [{"file": r.file, "provider": r.provider, "max_abs": r.max_abs, "max_rel": r.max_rel,
                    "tolerance": r.tolerance, "passed": r.passed} for r in report.parity],
        "float32_in_fp16": report.float32_in_fp16,
        "int8": report.int8,
        **({"engine_gates": report.engine_gates} if report.engine_gates else {}),
        **({engine_choice.REPORT_KEY: report.cpu_timing} if report.cpu_timing else {}),
        "tensorrt_commands": report.tensorrt_commands,
        "notes": report.notes,
        "source": report.source,
    }
