"""A CuPy stand-in for CPU tests: "device" arrays are numpy arrays that know their stream and address.

Only what the GPU backends use: ``asarray``, ``full``, ``empty_like``, ``asnumpy``, ``isfinite``,
``cuda.Stream`` (current-stream context, ``ptr``, capture into a replayable graph), ``cuda.Device``
and ``cuda.runtime``. Every array records the stream that was current when it was made, as CuPy
queues the copy or kernel that fills it there; ``memory`` maps ``arr.data.ptr`` back to the array,
which is how the TensorRT double reads and writes the buffers an engine is given.
"""

from __future__ import annotations

import itertools
import types
from typing import Any, Callable

import numpy as np

float32 = np.float32
_ids = itertools.count(0x7F0000001000, 0x1000)
memory: dict[int, "DeviceArray"] = {}
streams: dict[int, "Stream"] = {}
_current: list["Stream"] = []


class Pointer:
    def __init__(self, ptr: int) -> None:
        self.ptr = ptr


class DeviceArray(np.ndarray):
    """A numpy array standing in for a cupy.ndarray: ``.data.ptr`` and the stream it was made on."""

    def __array_finalize__(self, obj: Any) -> None:
        self.stream = current_stream()
        self._ptr = 0

    @property
    def data(self) -> Pointer:  # type: ignore[override]
        if not self._ptr:
            self._ptr = next(_ids)
            memory[self._ptr] = self
        return Pointer(self._ptr)


class Graph:
    def __init__(self, ops: list[Callable[[], None]]) -> None:
        self.ops = ops

    def launch(self, stream: "Stream") -> None:
        for op in self.ops:
            op()


class Stream:
    def __init__(self, non_blocking: bool = False, null: bool = False) -> None:
        self.ptr = 0 if null else next(_ids)
        self.capturing = False
        self.captured: list[Callable[[], None]] = []
        streams[self.ptr] = self

    def __enter__(self) -> "Stream":
        _current.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _current.pop()

    def synchronize(self) -> None:
        if self.capturing:
            raise RuntimeError("cudaErrorStreamCaptureUnsupported: synchronize during capture")

    def begin_capture(self) -> None:
        if self.capturing:
            raise RuntimeError("the stream is already capturing")
        self.capturing, self.captured = True, []

    def end_capture(self) -> Graph:
        if not self.capturing:
            raise RuntimeError("the stream is not capturing")
        self.capturing = False
        return Graph(self.captured)


NULL_STREAM = Stream(null=True)


def current_stream() -> Stream:
    return _current[-1] if _current else NULL_STREAM


def _device(array: Any) -> DeviceArray:
    return np.array(array, copy=True).view(DeviceArray)


def asarray(a: Any, dtype: Any = None) -> DeviceArray:
    if isinstance(a, DeviceArray) and (dtype is None or a.dtype == dtype):
        return a
    return _device(np.asarray(a, dtype=dtype))


def full(shape: Any, fill_value: Any, dtype: Any = None) -> DeviceArray:
    return _device(np.full(shape, fill_value, dtype=dtype))


def empty(shape: Any, dtype: Any = np.float32) -> DeviceArray:
    return _device(np.zeros(shape, dtype=dtype))


def empty_like(a: Any) -> DeviceArray:
    return _device(np.full_like(np.asarray(a), np.nan))  # uninitialised memory: NaN shows a read before a write


def asnumpy(a: Any, stream: Stream | None = None) -> np.ndarray:
    return np.array(a, copy=True).view(np.ndarray)


def isfinite(a: Any) -> Any:
    return np.isfinite(a)


def where(condition: Any, a: Any, b: Any) -> DeviceArray:
    return _device(np.where(condition, a, b))


def concatenate(parts: Any) -> DeviceArray:
    return _device(np.concatenate([np.asarray(p) for p in parts]))


class Device:
    def __init__(self, device: int = 0) -> None:
        self.id = device
        self.compute_capability = "90"


def _device_properties(device: int) -> dict[str, Any]:
    return {"name": b"Fake GPU (CPU stand-in)"}


cuda = types.SimpleNamespace(Stream=Stream, Device=Device, get_current_stream=current_stream,
                             runtime=types.SimpleNamespace(getDeviceCount=lambda: 1,
                                                           getDeviceProperties=_device_properties))


def module() -> types.ModuleType:
    """This file as an importable ``cupy``."""
    import sys

    return sys.modules[__name__]
