"""Write the TensorRT Python API surface of a bindings wheel as JSON, for the CPU test double.

    python scripts/trt_api_surface.py                  # the default wheels (TensorRT 10.x and 11.x)
    python scripts/trt_api_surface.py --wheel tensorrt-cu13-bindings==11.5.0.1 --wheel ./some.whl

TensorRT's bindings wheels (``tensorrt-cu12-bindings``, ``tensorrt-cu13-bindings``, ~1.3 MB) hold the
compiled pybind11 module but not the TensorRT libraries it links against, so they do not import on a
machine without them. The module calls TensorRT only through a handful of C entry points
(``createInferBuilder_INTERNAL``, ``getPluginRegistry``, ...), and none of them runs at import time:
this script compiles stand-in libraries that export those names (each returns NULL), loads the real
module against them, and records what the module itself declares: every class with its methods
(pybind11 signatures), properties (read-only or writable) and class attributes, every enum with its
values, and the module's functions and values. ``tests/doubles/tensorrt.py`` builds a strict fake
``tensorrt`` from that JSON, so a name a version lacks fails CPU tests just as it fails on a GPU.

Needs gcc, readelf and network access to the package index (or local ``.whl`` files).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import click

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "tensorrt_api"
# The newest TensorRT 10 (CUDA 12 wheel) and 11 (CUDA 13 wheel) bindings on the package index.
DEFAULT_WHEELS = ("tensorrt-cu12-bindings==10.16.1.11", "tensorrt-cu13-bindings==11.4.0.106")
PACKAGE = "tensorrt_bindings"
SKIP_MODULE_NAMES = {"os", "sys", "ctypes", "warnings", "attr", "value", "tensorrt"}  # helpers of __init__.py
PYTHON_API = re.compile(r"^(_?Py|_Py|_ITM_|__gmon_start__|__cxa|_Unwind)")


def fetch(spec: str, folder: Path) -> Path:
    """A local wheel path as is, or ``name==version`` downloaded (no dependencies) into ``folder``."""
    if spec.endswith(".whl"):
        return Path(spec)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary", ":all:",
                    "-d", str(folder), spec], check=True)
    name = spec.split("==")[0].replace("-", "_")
    found = sorted(folder.glob(f"{name}-*.whl"))
    if not found:
        raise click.ClickException(f"pip downloaded no wheel for {spec}")
    return found[-1]


def trt_entry_points(library: Path) -> list[str]:
    """The unversioned undefined symbols of the module that are not Python's or the C++ runtime's."""
    out = subprocess.run(["readelf", "--dyn-syms", "-W", str(library)], check=True, capture_output=True,
                         text=True).stdout
    names = set()
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 8 and cols[6] == "UND" and "@" not in cols[7] and not PYTHON_API.match(cols[7]):
            names.add(cols[7])
    return sorted(names)


def needed_tensorrt_libraries(library: Path) -> list[str]:
    out = subprocess.run(["readelf", "-d", "-W", str(library)], check=True, capture_output=True, text=True).stdout
    return [m for m in re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", out) if m.startswith("libnv")]


def stub_libraries(library: Path, folder: Path) -> None:
    """Every TensorRT library the module needs, each exporting every entry point as a NULL-returning function."""
    source = folder / "stub.c"
    source.write_text("".join(f"void *{name}(void) {{ return 0; }}\n" for name in trt_entry_points(library)))
    for soname in needed_tensorrt_libraries(library):
        subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(folder / soname), f"-Wl,-soname,{soname}", str(source)],
                       check=True)


def surface_of(wheel: Path, work: Path) -> dict[str, Any]:
    """Unpack ``wheel``, load its module against stand-in libraries in a child process, return its surface."""
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(work)
    library = next((work / PACKAGE).glob("tensorrt*.so"))
    libs = work / "libs"
    libs.mkdir()
    stub_libraries(library, libs)
    env = {**os.environ, "LD_LIBRARY_PATH": str(libs), "PYTHONPATH": str(work)}
    out = subprocess.run([sys.executable, __file__, "--introspect"], check=True, capture_output=True, text=True,
                         env=env).stdout
    data = json.loads(out)
    data["wheel"] = {"file": wheel.name, "sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()}
    return data


# ---- run inside the child process, with the real module imported -------------------------------------------

def short(text: str) -> str:
    """Type names without the module path: ``tensorrt_bindings.tensorrt.Dims`` -> ``Dims``."""
    return re.sub(r"\btensorrt_bindings\.tensorrt\.", "", text)


def split_top(text: str) -> list[str]:
    """Split at commas that are not inside brackets or quotes."""
    parts, depth, cur, quote = [], 0, "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0 and not quote:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def parse_signature(line: str) -> dict[str, Any] | None:
    """``name(self: T, a: int = 0) -> R`` as {params: [[name, type, default or None]], returns}."""
    m = re.match(r"^\s*(?:\d+\.\s*)?[\w.]*\((.*)\)\s*->\s*(.+?)\s*$", short(line))
    if m is None:
        return None
    params = []
    for part in split_top(m.group(1)):
        if part in ("*args", "**kwargs", "*"):
            params.append([part, None, None])
            continue
        name, _, rest = part.partition(":")
        type_, _, default = rest.partition("=")
        params.append([name.strip(), type_.strip() or None, default.strip() or None])
    return {"params": params, "returns": m.group(2)}


def signatures(doc: str | None) -> list[dict[str, Any]]:
    """Every overload's signature from a pybind11 docstring."""
    if not doc:
        return []
    lines = doc.splitlines()
    if "Overloaded function." in doc:
        lines = [line for line in lines if re.match(r"^\d+\. ", line)]
    else:
        lines = lines[:1]
    return [s for s in (parse_signature(line) for line in lines) if s is not None]


def enum_members(cls: type) -> dict[str, int]:
    return {name: int(value) for name, value in cls.__members__.items()}


def qualified(obj: Any) -> str:
    return short(f"{type(obj).__qualname__}.{obj.name}")


def describe_class(cls: type, enums: dict[str, dict[str, int]], prefix: str) -> dict[str, Any]:
    members: dict[str, Any] = {}
    for name in dir(cls):
        if name.startswith("__") and name != "__init__" or name.startswith("_pybind11"):
            continue
        raw = inspect.getattr_static(cls, name)
        if isinstance(raw, property):
            fget_sig = signatures(getattr(raw.fget, "__doc__", None))
            members[name] = {"kind": "property", "writable": raw.fset is not None,
                             "type": fget_sig[0]["returns"] if fget_sig else None}
        elif isinstance(raw, staticmethod) or type(raw).__name__ == "builtin_function_or_method":
            members[name] = {"kind": "staticmethod", "signatures": signatures(getattr(cls, name).__doc__)}
        elif callable(raw) and not isinstance(raw, type):
            members[name] = {"kind": "method", "signatures": signatures(getattr(cls, name).__doc__)}
        elif isinstance(raw, type) and hasattr(raw, "__members__"):
            enums[f"{prefix}{name}"] = enum_members(raw)
            members[name] = {"kind": "enum", "enum": f"{prefix}{name}"}
        elif hasattr(type(raw), "__members__"):
            members[name] = {"kind": "value", "value": qualified(raw)}
        elif isinstance(raw, type):
            members[name] = {"kind": "class", "class": short(raw.__qualname__)}
        else:
            members[name] = {"kind": "value", "value": repr(raw)}
    bases = [short(b.__qualname__) for b in cls.__mro__[1:] if b.__module__.startswith(PACKAGE)]
    return {"bases": bases, "members": members}


def introspect() -> dict[str, Any]:
    import importlib

    mod = importlib.import_module(PACKAGE)
    classes: dict[str, Any] = {}
    enums: dict[str, dict[str, int]] = {}
    functions: dict[str, Any] = {}
    values: dict[str, str] = {}
    for name in sorted(dir(mod)):
        if name.startswith("_") and name != "__version__" or name in SKIP_MODULE_NAMES:
            continue
        obj = getattr(mod, name)
        if isinstance(obj, type) and hasattr(obj, "__members__"):
            enums[name] = enum_members(obj)
        elif isinstance(obj, type):
            classes[name] = describe_class(obj, enums, f"{name}.")
        elif callable(obj):
            sigs = signatures(obj.__doc__)
            if not sigs and inspect.isfunction(obj):  # Python helpers of __init__.py
                sig = inspect.signature(obj)
                sigs = [{"params": [[p, None, None] for p in sig.parameters], "returns": "object"}]
            functions[name] = sigs
        elif hasattr(type(obj), "__members__"):
            values[name] = qualified(obj)
        else:
            values[name] = repr(obj)
    return {"version": mod.__version__, "classes": classes, "enums": enums, "functions": functions,
            "values": values}


@click.command()
@click.option("--wheel", "wheels", multiple=True, help=f"name==version or a .whl path [default: {DEFAULT_WHEELS}]")
@click.option("--out", type=click.Path(path_type=Path), default=OUT, show_default=True)
@click.option("--introspect", "child", is_flag=True, hidden=True)
def main(wheels: tuple[str, ...], out: Path, child: bool) -> None:
    """Write OUT/tensorrt-VERSION.json for each wheel."""
    if child:
        json.dump(introspect(), sys.stdout)
        return
    out.mkdir(parents=True, exist_ok=True)
    for spec in wheels or DEFAULT_WHEELS:
        with tempfile.TemporaryDirectory() as tmp:
            surface = surface_of(fetch(spec, Path(tmp)), Path(tmp) / "unpacked")
        path = out / f"tensorrt-{surface['version']}.json"
        path.write_text(json.dumps(surface, indent=1, sort_keys=True) + "\n")
        n_members = sum(len(c["members"]) for c in surface["classes"].values())
        click.echo(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}: {len(surface['classes'])} "
                   f"classes, {n_members} members, {len(surface['enums'])} enums")


if __name__ == "__main__":
    main()
