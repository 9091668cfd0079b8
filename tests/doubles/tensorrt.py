"""A strict ``tensorrt`` for CPU tests, generated from the real API surface of one TensorRT version.

``tests/tensorrt_api/tensorrt-VERSION.json`` (written by ``scripts/trt_api_surface.py`` from the
bindings wheel itself) lists every class with its methods (pybind11 signatures), properties (read-only
or writable), enums and module values. :class:`TensorRTDouble` turns it into a module where

- any name that version lacks raises AttributeError, as the real bindings do (``BuilderFlag.FP16``
  on 11.x); setting a read-only or unknown property raises AttributeError;
- every call is checked against the version's signatures (argument count, keyword names, enum and
  interface types) and recorded in ``calls``;
- the few calls the project relies on behave like a GPU: the parser reads the ONNX file, the
  "engine" is that ONNX run on ONNX Runtime CPU, with its I/O dtypes and shapes (-1 where symbolic) from the graph, and
  ``execute_async_v3`` reads and writes the CuPy-double buffers at the addresses it was given
  (or is captured into a CUDA graph when its stream is capturing). Every buffer the engine reads is
  logged with the stream it was made on (``stream_log``).

It complements the ``-m gpu`` tests; it cannot show that TensorRT builds fast or correct kernels.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any, Callable

import numpy as np

from doubles import cupy as cupy_double

SURFACES = Path(__file__).resolve().parents[1] / "tensorrt_api"
VERSIONS = tuple(sorted(p.stem.removeprefix("tensorrt-") for p in SURFACES.glob("tensorrt-*.json")))
PLAN_MAGIC = b"ddim-deploy fake plan\n"
STRICT_CLASSES = {"Builder", "Runtime", "OnnxParser", "Logger"}  # besides the I* interfaces


class EnumValue:
    def __init__(self, enum: str, name: str, value: int) -> None:
        self.enum, self.name, self.value = enum, name, value

    def __int__(self) -> int:
        return self.value

    __index__ = __int__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EnumValue) and (self.enum, self.value) == (other.enum, other.value)

    def __hash__(self) -> int:
        return hash((self.enum, self.value))

    def __repr__(self) -> str:
        return f"<{self.enum.split('.')[-1]}.{self.name}: {self.value}>"

    def __str__(self) -> str:
        return f"{self.enum.split('.')[-1]}.{self.name}"


class FakeEnum:
    def __init__(self, double: "TensorRTDouble", name: str, members: dict[str, int]) -> None:
        self._double, self._name = double, name
        self.__members__ = {k: EnumValue(name, k, v) for k, v in members.items()}

    def __getattr__(self, name: str) -> EnumValue:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return self.__members__[name]
        except KeyError:
            raise AttributeError(f"type object '{self._name}' has no attribute '{name}' "
                                 f"(TensorRT {self._double.version})") from None


class FakeClass:
    """A class of the surface: construct it, or read its class-level members."""

    def __init__(self, double: "TensorRTDouble", name: str) -> None:
        self._double, self._name = double, name

    def __call__(self, *args: Any, **kwargs: Any) -> "FakeObject":
        obj = FakeObject(self._double, self._name)
        self._double.invoke(obj, "__init__", args, kwargs)
        return obj

    def __getattr__(self, name: str) -> Any:
        member = self._double.member(self._name, name)
        if member["kind"] == "value":
            return self._double.resolve(member["value"])
        if member["kind"] == "enum":
            return self._double.enums[member["enum"]]
        return lambda obj, *a, **k: self._double.invoke(obj, name, a, k)


class FakeObject:
    """An instance: members checked against the surface, calls recorded and dispatched."""

    def __init__(self, double: "TensorRTDouble", cls: str, **props: Any) -> None:
        object.__setattr__(self, "_double", double)
        object.__setattr__(self, "_cls", cls)
        object.__setattr__(self, "_props", dict(props))
        object.__setattr__(self, "_state", {})

    def __getattr__(self, name: str) -> Any:
        double, cls = self._double, self._cls
        member = double.member(cls, name)
        kind = member["kind"]
        if kind in ("method", "staticmethod"):
            return lambda *a, **k: double.invoke(self, name, a, k)
        if kind == "property":
            if name in self._props:
                return self._props[name]
            hook = double.hook(cls, name)
            return hook(double, self) if hook else double.default(member.get("type"))
        if kind == "value":
            return double.resolve(member["value"])
        if kind == "enum":
            return double.enums[member["enum"]]
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        member = self._double.member(self._cls, name)
        if member["kind"] != "property" or not member["writable"]:
            raise AttributeError(f"property '{name}' of 'tensorrt.{self._cls}' object has no setter "
                                 f"(TensorRT {self._double.version})")
        self._double.calls.append((f"{self._cls}.{name}=", {"value": value}))
        self._props[name] = value

    def __bytes__(self) -> bytes:
        if "payload" not in self._state:
            raise TypeError(f"a tensorrt.{self._cls} is not a buffer")
        return self._state["payload"]

    def __repr__(self) -> str:
        return f"<fake tensorrt.{self._cls}>"


class TensorRTDouble:
    """``module`` is the fake ``tensorrt`` of ``version``; ``calls`` and ``stream_log`` record what ran."""

    def __init__(self, version: str, capability: str = "9.0") -> None:
        self.surface = json.loads((SURFACES / f"tensorrt-{version}.json").read_text())
        self.version, self.capability = self.surface["version"], capability
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.stream_log: list[tuple[str, int, int]] = []  # (tensor, stream it was made on, stream it is read on)
        self.fail_capture = False  # execute_async_v3 returns False while a stream captures
        self.enums = {name: FakeEnum(self, name, members) for name, members in self.surface["enums"].items()}
        self.module = self._module()

    # ---- the surface ----------------------------------------------------------------------------------------
    def _module(self) -> types.ModuleType:
        mod = types.ModuleType("tensorrt")
        mod.__version__ = self.version
        for name in self.surface["classes"]:
            setattr(mod, name, FakeClass(self, name))
        for name, enum in self.enums.items():
            if "." not in name:
                setattr(mod, name, enum)
        for name, value in self.surface["values"].items():
            if name != "__version__":
                setattr(mod, name, self.resolve(value))
        for name in self.surface["functions"]:
            setattr(mod, name, lambda *a, _n=name, **k: self.calls.append((_n, {"args": a, **k})))
        return mod

    def member(self, cls: str, name: str) -> dict[str, Any]:
        members = self.surface["classes"][cls]["members"]
        if name not in members:
            raise AttributeError(f"'tensorrt.{cls}' object has no attribute '{name}' (TensorRT {self.version})")
        return members[name]

    def resolve(self, value: str) -> Any:
        """``"DataType.FLOAT"`` -> that enum value; other reprs (strings, numbers) as they were."""
        enum, _, name = value.rpartition(".")
        if enum in self.enums and name in self.enums[enum].__members__:
            return self.enums[enum].__members__[name]
        return value

    def is_a(self, obj: Any, cls: str) -> bool:
        return isinstance(obj, FakeObject) and (obj._cls == cls or cls in self.surface["classes"][obj._cls]["bases"])

    def default(self, type_: str | None) -> Any:
        if type_ in self.enums:
            return next(iter(self.enums[type_].__members__.values()))
        if type_ in self.surface["classes"]:
            return FakeObject(self, type_)
        return {"bool": True, "int": 0, "float": 0.0, "str": ""}.get(type_ or "None")

    def _accepts(self, type_: str | None, value: Any) -> bool:
        if type_ in self.enums:  # nested enums are listed under each class that shows them
            return isinstance(value, EnumValue) and value.enum.split(".")[-1] == type_.split(".")[-1]
        if type_ in self.surface["classes"] and (type_.startswith("I") or type_ in STRICT_CLASSES):
            return self.is_a(value, type_)
        if type_ == "typing.SupportsInt":
            return isinstance(value, (int, np.integer, EnumValue)) and not isinstance(value, float)
        return True

    def bind(self, cls: str, name: str, args: tuple, kwargs: dict) -> dict[str, Any]:
        """The arguments bound to the first overload they fit, as pybind11 dispatches; TypeError if none."""
        sigs = self.member(cls, name).get("signatures", [])
        for sig in sigs:
            params = [p for p in sig["params"] if p[0] != "self"]
            if any(p[0].startswith("*") for p in params):
                return {"args": args, **kwargs}
            if len(args) > len(params) or set(kwargs) - {p[0] for p in params}:
                continue
            bound = dict(zip((p[0] for p in params), args))
            if set(bound) & set(kwargs):
                continue
            bound.update(kwargs)
            missing = [p[0] for p in params if p[0] not in bound and p[2] is None]
            if not missing and all(self._accepts(p[1], bound[p[0]]) for p in params if p[0] in bound):
                return bound
        if not sigs:
            raise TypeError(f"tensorrt.{cls}: No constructor defined!" if name == "__init__" else f"{cls}.{name}")
        raise TypeError(f"{cls}.{name}(): incompatible function arguments (TensorRT {self.version}); got "
                        f"{args!r} {kwargs!r}")

    def hook(self, cls: str, name: str) -> Callable[..., Any] | None:
        for owner in [cls, *self.surface["classes"][cls]["bases"]]:
            found = HOOKS.get(f"{owner}.{name}")
            if found:
                return found
        return None

    def invoke(self, obj: FakeObject, name: str, args: tuple, kwargs: dict) -> Any:
        bound = self.bind(obj._cls, name, args, kwargs)
        self.calls.append((f"{obj._cls}.{name}", bound))
        hook = self.hook(obj._cls, name)
        if hook is not None:
            return hook(self, obj, **bound)
        sigs = self.member(obj._cls, name).get("signatures") or [{"returns": "None"}]
        return None if name == "__init__" else self.default(sigs[0]["returns"])

    def called(self, name: str) -> list[dict[str, Any]]:
        return [bound for n, bound in self.calls if n == name]

    def host_memory(self, payload: bytes) -> FakeObject:
        mem = FakeObject(self, "IHostMemory", nbytes=len(payload))
        mem._state["payload"] = payload
        return mem


# ---- a GPU's behaviour for the calls the project makes --------------------------------------------------------
DTYPES = {1: "FLOAT", 10: "HALF"}  # ONNX elem_type -> DataType


def _parse(d: TensorRTDouble, parser: FakeObject, model: str) -> bool:
    import onnx

    graph = onnx.load(model, load_external_data=False)
    net = parser._state["network"]
    net._state.update(onnx=graph.SerializeToString(), nodes=[n.name for n in graph.graph.node],
                      io={v.name: (DTYPES.get(v.type.tensor_type.elem_type, "UNKNOWN"), "INPUT")
                          for v in graph.graph.input}
                      | {v.name: (DTYPES.get(v.type.tensor_type.elem_type, "UNKNOWN"), "OUTPUT")
                         for v in graph.graph.output},
                      # TensorRT's network dims: the ONNX graph's, -1 where they are symbolic
                      shapes={v.name: [d.dim_value if d.HasField("dim_value") else -1
                                       for d in v.type.tensor_type.shape.dim]
                              for v in [*graph.graph.input, *graph.graph.output]})
    return True


def _build(d: TensorRTDouble, builder: FakeObject, network: FakeObject, config: FakeObject) -> FakeObject:
    strongly = d.version.startswith("11.") or bool(
        network._state["flags"] & (1 << int(d.enums["NetworkDefinitionCreationFlag"].STRONGLY_TYPED)))
    header = {"tensorrt": d.version, "capability": d.capability, "strongly_typed": strongly,
              "io": network._state["io"], "shapes": network._state["shapes"],
              "profiles": [p._state.get("shapes", {}) for p in config._state["profiles"]]}
    return d.host_memory(PLAN_MAGIC + json.dumps(header).encode() + b"\n" + network._state["onnx"])


def _deserialize(d: TensorRTDouble, runtime: FakeObject, serialized_engine: Any) -> FakeObject | None:
    import onnxruntime as ort

    data = bytes(serialized_engine)
    if not data.startswith(PLAN_MAGIC):
        return None  # TensorRT logs "invalid engine" and returns None
    head, _, onnx_bytes = data[len(PLAN_MAGIC):].partition(b"\n")
    header = json.loads(head)
    if header["tensorrt"] != d.version:
        return None  # a plan from another TensorRT version does not load
    engine = FakeObject(d, "ICudaEngine", num_io_tensors=len(header["io"]))
    engine._state.update(header=header, names=list(header["io"]),  # the session is made on the first run
                         session=lambda: ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"]))
    return engine


def _execute(d: TensorRTDouble, ctx: FakeObject, stream_handle: int) -> bool:
    stream = cupy_double.streams[int(stream_handle)]
    engine = ctx._state["engine"]
    addresses = dict(ctx._state["addresses"])
    for name, ptr in addresses.items():
        d.stream_log.append((name, cupy_double.memory[ptr].stream.ptr, int(stream_handle)))

    def run() -> None:
        arrays = {name: cupy_double.memory[ptr] for name, ptr in addresses.items()}
        outputs = [n for n in engine._state["names"] if engine._state["header"]["io"][n][1] == "OUTPUT"]
        feeds = {n: np.asarray(a) for n, a in arrays.items() if n not in outputs}
        for n, a in feeds.items():
            if tuple(a.shape) != ctx._state["shapes"].get(n):
                raise RuntimeError(f"{n}: the bound buffer's shape differs from set_input_shape")
        if callable(engine._state["session"]):
            engine._state["session"] = engine._state["session"]()
        results = engine._state["session"].run(outputs, feeds)
        for n, value in zip(outputs, results):
            arrays[n][...] = value

    if stream.capturing:
        if d.fail_capture:
            return False
        stream.captured.append(run)
    else:
        run()
    return True


class Dims(tuple):
    """``tensorrt.Dims`` as the engine returns it: a sequence of ints, -1 for a dimension set at run time."""

    def __repr__(self) -> str:
        return f"({', '.join(map(str, self))})"


def _set_input_shape(d: TensorRTDouble, ctx: FakeObject, name: str, shape: Any) -> bool:
    shape = tuple(int(s) for s in shape)
    for profile in ctx._state["engine"]._state["header"]["profiles"]:
        lo, _, hi = profile[name]
        if not all(a <= s <= b for a, s, b in zip(lo, shape, hi)) or len(shape) != len(lo):
            return False
    ctx._state["shapes"][name] = shape
    return True


def _timing_cache(d: TensorRTDouble, config: FakeObject, serialized_timing_cache: Any) -> FakeObject:
    cache = FakeObject(d, "ITimingCache")
    cache._state["data"] = bytes(serialized_timing_cache)
    return cache


def _set_timing_cache(d: TensorRTDouble, config: FakeObject, cache: FakeObject, ignore_mismatch: bool) -> bool:
    data = cache._state["data"]
    if data and data != _cache_key(d) and not ignore_mismatch:
        return False  # the real one verifies the device and version header
    config._state["cache"] = cache
    return True


def _cache_key(d: TensorRTDouble) -> bytes:
    return f"timing cache of TensorRT {d.version} on sm{d.capability}".encode()


def _context(d: TensorRTDouble, engine: FakeObject, *_: Any, **__: Any) -> FakeObject:
    ctx = FakeObject(d, "IExecutionContext")
    ctx._state.update(engine=engine, addresses={}, shapes={})
    return ctx


HOOKS: dict[str, Callable[..., Any]] = {
    "OnnxParser.__init__": lambda d, p, network, logger: p._state.update(network=network),
    "OnnxParser.parse_from_file": lambda d, p, model: _parse(d, p, model),
    "OnnxParser.num_errors": lambda d, p: 0,
    "Builder.create_network": lambda d, b, flags=0: _new(d, "INetworkDefinition", flags=int(flags)),
    "Builder.create_builder_config": lambda d, b: _new(d, "IBuilderConfig", profiles=[], cache=None),
    "Builder.create_optimization_profile": lambda d, b: _new(d, "IOptimizationProfile", shapes={}),
    "IOptimizationProfile.set_shape": lambda d, p, input, min, opt, max: p._state["shapes"].__setitem__(
        input, [list(min), list(opt), list(max)]),
    "IBuilderConfig.add_optimization_profile": lambda d, c, profile: c._state["profiles"].append(profile) or 0,
    "IBuilderConfig.create_timing_cache": _timing_cache,
    "IBuilderConfig.set_timing_cache": _set_timing_cache,
    "IBuilderConfig.get_timing_cache": lambda d, c: c._state["cache"],
    "ITimingCache.serialize": lambda d, c: d.host_memory(_cache_key(d)),
    "Builder.build_serialized_network": _build,
    "Runtime.deserialize_cuda_engine": _deserialize,
    "ICudaEngine.get_tensor_name": lambda d, e, index: e._state["names"][int(index)],
    "ICudaEngine.get_tensor_dtype": lambda d, e, name: d.enums["DataType"].__members__[e._state["header"]["io"][name][0]],
    "ICudaEngine.get_tensor_shape": lambda d, e, name: Dims(e._state["header"]["shapes"][name]),
    "ICudaEngine.get_tensor_profile_shape": lambda d, e, name, profile_index: [
        Dims(s) for s in e._state["header"]["profiles"][int(profile_index)][name]],
    "ICudaEngine.num_optimization_profiles": lambda d, e: len(e._state["header"]["profiles"]),
    "ICudaEngine.get_tensor_mode": lambda d, e, name: d.enums["TensorIOMode"].__members__[e._state["header"]["io"][name][1]],
    "ICudaEngine.create_execution_context": _context,
    "IExecutionContext.set_input_shape": _set_input_shape,
    "IExecutionContext.set_tensor_address": lambda d, c, name, memory: c._state["addresses"].__setitem__(
        name, int(memory)) or True,
    "IExecutionContext.execute_async_v3": _execute,
}


def _new(d: TensorRTDouble, cls: str, **state: Any) -> FakeObject:
    obj = FakeObject(d, cls)
    obj._state.update(state)
    return obj
