"""Choosing a backend: one table, extended by plugins.

Each row (:class:`BackendEntry`) says what a backend is called, where its opener lives, whether ``ddim-serve`` may
run it (replicas run the lean runtime: never torch) and its place in ``auto`` (lower first; None: only when asked
for). ``auto`` walks the rows in that order and takes the first that opens here; a row that does not apply says why
(:class:`Skip`) and the reasons end up in the one line ``ddim-run`` prints.

The table is the built-in rows below, rows added with :func:`register` (an application embedding the runtime, a
test), and the ``ddim_deploy.backends`` entry points of installed packages: ``NAME = "module:Class"`` gives a row
taken only when asked for (``--backend NAME``), opened as ``Class(path, device, precision, threads)`` (the eager
torch backend is one: it lives with the trainer and is looked up only when chosen, so the runtime stays torch-free).

Rows added with :func:`register` live in this process only: ddim-serve's replicas (other processes) see the
built-in rows and installed plugins, so a backend meant for serving is installed as an entry point.

An opener takes an :class:`OpenRequest` and returns ``(backend, why)``. A new backend is a module with its
Backend class, one row here (or an entry point), and nothing else: the command lines, the API and serving all read
the table.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from runtime.backends.base import Backend, BackendError
from runtime.choices import Device, Precision, RunPrecision
from runtime.exportdir import ENGINE, FP32_ONNX, RUN_WEIGHTS
from runtime.common.extras import install_hint

PLUGIN_GROUP = "ddim_deploy.backends"


class Skip(Exception):
    """The row does not apply here (``auto`` only); ``reason`` goes into the backend line (None: nothing)."""

    def __init__(self, reason: str | None = None) -> None:
        super().__init__(reason or "")
        self.reason = reason


class NoFallback(BackendError):
    """An error ``auto`` must not pass over (the path can only be opened by this row)."""


@dataclass(frozen=True)
class OpenRequest:
    """What to open and how: the model path, device, precision (None: the backend's choice), CPU threads,
    whether this backend was asked for by name, and what ``auto`` skipped before reaching it."""

    path: Path
    device: Device | None = None
    precision: Precision | None = None
    threads: int | None = None
    asked: bool = False
    skipped: tuple[str, ...] = ()


Opener = Callable[[OpenRequest], "tuple[Backend, str]"]


@dataclass(frozen=True)
class BackendEntry:
    """One row of the table."""

    name: str
    opener: str | Opener  # "module:function" (imported when the row is tried) or the function
    serve: bool = False  # ddim-serve may run it
    auto_rank: int | None = None  # place in auto, lower first; None: only when asked for
    label: str = ""  # how a skip names it ("TensorRT"); default the name

    def open(self, request: OpenRequest) -> tuple[Backend, str]:
        return _resolve(self.opener)(request)


def _resolve(target: str | Opener) -> Opener:
    if callable(target):
        return target
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)  # type: ignore[no-any-return]
    except (ImportError, AttributeError) as exc:
        raise BackendError(f"backend opener {target} cannot be imported: {exc}") from None


# --------------------------------------------------------------------------- the built-in rows' openers


def _open_torch(r: OpenRequest) -> tuple[Backend, str]:
    """The eager PyTorch reference (a plugin: trainer.torch_backend); in ``auto`` only for a trainer run directory
    (weights, no ONNX), which nothing else can open."""
    run_dir = (r.path / RUN_WEIGHTS).is_file() and not (r.path / FP32_ONNX).is_file()
    if not r.asked and not run_dir:
        raise Skip()
    why = "asked for" if r.asked else "a trainer run directory"
    try:
        b = plugin("torch")(r.path, r.device or "cpu", r.precision or "fp32", r.threads)
    except BackendError as exc:
        raise NoFallback(str(exc)) from None
    return b, f"torch, {b.provider} ({why}: the eager reference)"


def _open_tensorrt(r: OpenRequest) -> tuple[Backend, str]:
    """The FP16 engine, where its manifest matches this machine; ``auto`` only off the CPU with an engine present."""
    if not r.asked:
        if not (r.path / ENGINE).is_file():
            raise Skip("no TensorRT engine")
        if r.device == "cpu":
            raise Skip()
        if r.precision not in (None, "fp16"):
            raise Skip(f"TensorRT skipped: the engine is fp16 and --precision {r.precision} was asked")
    from runtime.backends.tensorrt_backend import TensorRTBackend

    b = TensorRTBackend(r.path, r.device or "cuda", r.precision)
    return b, f"tensorrt, {b.provider} ({'asked for' if r.asked else 'engine matches this machine'})"


def _open_onnxruntime(r: OpenRequest) -> tuple[Backend, str]:
    """ONNX Runtime CUDA where usable, else CPU; on the CPU with no precision asked, the faster gated file
    (:func:`runtime.backends.precision.choose`)."""
    try:
        from runtime.backends.ort_backend import OrtBackend, OrtCudaBackend, cuda_available, install_problem
    except ImportError as exc:
        raise BackendError(f"ONNX Runtime is not installed ({exc}): {install_hint('cpu')}; on a CUDA machine "
                           f"instead {install_hint('gpu', 'onnxruntime-gpu')} (one of them, not both)") from None
    if r.precision == "bf16":
        raise BackendError("--precision bf16 runs on OpenVINO (--backend openvino); ONNX Runtime runs fp32, fp16 "
                           "and int8")
    skipped = list(r.skipped)
    if r.device == "cuda" or (r.device is None and cuda_available()):
        try:
            b = OrtCudaBackend(r.path, "cuda", r.precision or "fp32", r.threads)
            return b, _ort_line(b, r.asked, skipped)
        except BackendError as exc:
            if r.device == "cuda":
                raise
            skipped.append(f"ONNX Runtime CUDA skipped: {exc}")
    if not r.asked and r.device is None and not cuda_available():
        problem = install_problem()
        skipped.append("ONNX Runtime has no CUDA provider" + (f" ({problem})" if problem else ""))
    elif not r.asked and r.device == "cpu":
        skipped.append("--device cpu")
    chosen: Precision = r.precision or "fp32"
    if r.precision is None and r.path.is_dir():
        if r.asked:  # --backend onnxruntime: its own fp32-or-int8 choice
            from runtime.backends.precision import choose

            chosen, why = choose(r.path, r.threads)
            why = f"precision auto: {chosen}, {why}" if why else ""
        else:  # auto: the engine choice the OpenVINO row asked first (memoised); its ONNX Runtime pair
            from runtime.backends.engine_choice import choose as choose_pair

            pick = choose_pair(r.path, r.threads)
            chosen = pick.precision if pick.engine == "onnxruntime" else pick.fallback  # type: ignore[assignment]
            why = pick.why if pick.engine == "onnxruntime" else f"the fastest ONNX Runtime file ({pick.why})"
        if why:
            skipped.append(why)
    b = OrtBackend(r.path, "cpu", chosen, r.threads)
    return b, _ort_line(b, r.asked, skipped)


def _open_openvino(r: OpenRequest) -> tuple[Backend, str]:
    """OpenVINO on the CPU. Asked for: the precision asked, else the fastest of its gated precisions here (fp32
    where none passed a gate). In ``auto``: only where the engine choice (:mod:`runtime.backends.engine_choice`) picks
    an OpenVINO pair: gated, and the fastest of every gated pair on this CPU."""
    if not r.asked:
        if r.device == "cuda" or not r.path.is_dir() or r.precision == "fp16" or _ort_cuda_usable(r):
            raise Skip()
        from runtime.backends.engine_choice import choose as choose_pair

        pick = choose_pair(r.path, r.threads, r.precision)
        if pick.engine != "openvino":
            raise Skip()
        prec, why = pick.precision, pick.why
    elif r.precision is None and r.path.is_dir():
        from runtime.backends.engine_choice import choose as choose_pair

        pick = choose_pair(r.path, r.threads, None, engine="openvino")
        prec, why = pick.precision, "; ".join(w for w in ("asked for", pick.why) if w)
    else:
        prec, why = r.precision or "fp32", "asked for"
    try:
        from runtime.backends.openvino_backend import OpenVinoBackend
    except ImportError as exc:
        if (exc.name or "").split(".")[0] == "openvino":
            raise BackendError(f"OpenVINO is not installed: {install_hint('openvino')}") from None
        raise BackendError(f"the OpenVINO backend cannot be imported ({exc}): {install_hint('cpu')}") from None
    b = OpenVinoBackend(r.path, r.device or "cpu", prec, r.threads)
    from runtime.common.hostinfo import threads_label

    return b, f"openvino CPU {b.model_path.name} {b.precision}, {threads_label(b.threads)} ({why})"


def _ort_cuda_usable(r: OpenRequest) -> bool:
    """Whether ``auto`` would run ONNX Runtime on CUDA (no device asked, its CUDA provider present)."""
    if r.device is not None:
        return False
    try:
        from runtime.backends.ort_backend import cuda_available
    except ImportError:
        return False
    return cuda_available()


def _ort_line(b: Any, asked: bool, skipped: list[str]) -> str:
    from runtime.common.hostinfo import threads_label

    threads = f", {threads_label(b.threads)}" if b.device == "cpu" else ""
    return f"onnxruntime {b.provider} {b.model_path.name}{threads} ({'; '.join((['asked for'] if asked else []) + skipped)})"


BUILTIN = (  # listed in this order; auto tries them by auto_rank
    BackendEntry("tensorrt", _open_tensorrt, serve=True, auto_rank=10, label="TensorRT"),
    BackendEntry("onnxruntime", _open_onnxruntime, serve=True, auto_rank=20, label="ONNX Runtime"),
    BackendEntry("torch", _open_torch, serve=False, auto_rank=0),
    BackendEntry("openvino", _open_openvino, serve=True, auto_rank=15, label="OpenVINO"),  # where the choice picks it
)
_registered: dict[str, BackendEntry] = {}


def register(entry: BackendEntry) -> None:
    """Add (or replace) a row of the table for this process."""
    if not entry.name or entry.name == "auto":
        raise ValueError(f"a backend cannot be called {entry.name!r}")
    _registered[entry.name] = entry


def unregister(name: str) -> None:
    """Remove a row added with :func:`register`."""
    _registered.pop(name, None)


@functools.lru_cache(maxsize=1)
def _entry_points() -> tuple[Any, ...]:
    """The installed plugins (read once per process: scanning every installed package costs ~50 ms)."""
    from importlib.metadata import entry_points

    return tuple(entry_points(group=PLUGIN_GROUP))


def _plugin_rows() -> dict[str, BackendEntry]:
    return {ep.name: BackendEntry(ep.name, _class_opener(ep.name), serve=False, auto_rank=None)
            for ep in _entry_points()}


def table() -> dict[str, BackendEntry]:
    """Every backend this process can name, in this order: the built-in rows, rows added with :func:`register`
    (which replace a built-in row of the same name), then installed plugins (which never replace a row)."""
    rows = {e.name: e for e in BUILTIN}
    rows.update(_registered)
    rows.update({name: row for name, row in _plugin_rows().items() if name not in rows})
    return rows


def names(serve: bool = False) -> tuple[str, ...]:
    """``auto`` and every backend's name (those ddim-serve may run, with ``serve``)."""
    return ("auto", *(e.name for e in table().values() if e.serve or not serve))


def _class_opener(name: str) -> Opener:
    def open_plugin(r: OpenRequest) -> tuple[Backend, str]:
        b = plugin(name)(r.path, r.device or "cpu", r.precision or "fp32", r.threads)
        return b, f"{name}, {getattr(b, 'provider', b.device)} ({'asked for' if r.asked else 'plugin'})"

    return open_plugin


def plugin(name: str) -> Any:
    """The object an installed package registers under ``ddim_deploy.backends`` as ``name``, imported now."""
    found = [ep for ep in _entry_points() if ep.name == name]
    if not found:
        hint = install_hint("train") if name == "torch" else f"no installed package registers {name!r}"
        raise BackendError(f"the {name} backend is not installed ({hint})")
    try:
        return found[0].load()
    except ImportError as exc:
        raise BackendError(f"the {name} backend cannot be imported: {exc}") from None


def open_backend(path: Path, backend: str = "auto", device: Device | None = None,
                 precision: RunPrecision | None = None, threads: int | None = None) -> tuple[Backend, str]:
    """A backend for ``path`` and one line saying which and why.

    A named backend is opened or its error raised. ``auto`` tries the table's rows in their order: the eager torch
    backend for a trainer run directory, TensorRT (an engine whose manifest matches this machine, when no
    precision or the engine's was asked), then ONNX Runtime CUDA, then ONNX Runtime CPU; a backend that cannot
    start here is skipped with its reason. ``precision`` None and ``auto`` are the same: the engine's where
    TensorRT is picked; on ONNX Runtime CPU, ``model.int8.onnx`` where it passed its quality gate and is faster on
    this CPU with ``threads`` threads; else fp32. ``threads``: CPU threads (default: one per physical core).
    """
    from runtime.common.limits import check_threads_cap

    if not path.exists():
        raise BackendError(f"{path} does not exist")
    check_threads_cap(threads)  # before any session starts them (10,000 threads: minutes)
    chosen: Precision | None = None if precision == "auto" else precision
    rows = table()
    if backend != "auto":
        if backend not in rows:
            raise BackendError(f"unknown backend {backend!r}; known here: {', '.join(names())}")
        try:
            return rows[backend].open(OpenRequest(path, device, chosen, threads, asked=True))
        except Skip as skip:  # a row that does not apply, asked for by name: say why
            raise BackendError(f"the {backend} backend cannot run {path}: {skip.reason or 'not applicable'}") from None
    skipped: list[str] = []
    last: BackendError | None = None
    for entry in sorted((e for e in rows.values() if e.auto_rank is not None), key=lambda e: e.auto_rank or 0):
        try:
            return entry.open(OpenRequest(path, device, chosen, threads, asked=False, skipped=tuple(skipped)))
        except Skip as skip:
            if skip.reason:
                skipped.append(skip.reason)
        except NoFallback:
            raise
        except BackendError as exc:
            last = exc
            skipped.append(f"{entry.label or entry.name} skipped: {exc}")
    raise last if last is not None else BackendError(f"no backend can run {path} here ({'; '.join(skipped)})")
