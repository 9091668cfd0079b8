"""The import graph of the packages, read from the source (``ast``), so a forbidden import fails here
before it ships: runtime is the leaf (no trainer, quality or export; no torch at module level),
trainer never imports quality or export, quality never imports export."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime", "trainer", "quality", "export")
# package -> top-level modules it may never import (anywhere in a file, lazily inside a function too)
FORBIDDEN = {"runtime": {"trainer", "quality", "export"}, "trainer": {"quality", "export"}, "quality": {"export"}}
# package -> top-level modules it may import only inside functions (never when the package is imported)
NOT_AT_MODULE_LEVEL = {"runtime": {"torch"}}
# The HTTP service's stack: only runtime/serving imports it (ddim-run and the rest never need the serve extra), and
# runtime/serving never imports torch, not even lazily (its replicas run the lean runtime).
SERVING = "runtime/serving/"
SERVING_ONLY = {"ray", "fastapi", "starlette", "pydantic", "uvicorn", "prometheus_client"}
# ddim-run --cluster's shards run as Ray tasks: runtime/cluster may import Ray core too (not ray.serve, not the HTTP
# stack); it comes with the same extra.
RAY_CORE = "runtime/cluster/"


def _ray_core(imp: "Import") -> bool:
    return imp.file.startswith(RAY_CORE) and imp.module.split(".")[0] == "ray" and not imp.module.startswith("ray.serve")


@dataclass(frozen=True)
class Import:
    file: str  # relative to the root searched
    line: int
    module: str  # absolute dotted name
    module_level: bool  # runs when the file is imported (not inside a function, not under TYPE_CHECKING)

    def __str__(self) -> str:
        return f"{self.file}:{self.line} imports {self.module} ({'module level' if self.module_level else 'lazily'})"


def _package_of(rel: Path) -> list[str]:
    """The dotted package holding a file (``runtime/backends/x.py`` -> ``[runtime, backends]``)."""
    return list(rel.parent.parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imported(node: ast.AST, package: list[str]) -> list[str]:
    """The absolute module names one node imports (none for most nodes)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if isinstance(node, ast.ImportFrom):
        if not node.level:  # `from ray import serve` imports ray.serve (the rules below tell ray from ray.serve)
            return [f"{node.module}.{a.name}" if node.module == "ray" else node.module or "" for a in node.names]
        base = package[: len(package) - (node.level - 1)]  # from . = this package, from .. = its parent
        return [".".join([*base, *([node.module] if node.module else [])])]
    if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
            and isinstance(node.args[0].value, str):
        fn = node.func
        called = fn.attr if isinstance(fn, ast.Attribute) else fn.id if isinstance(fn, ast.Name) else ""
        if called in ("import_module", "__import__"):
            return [node.args[0].value]
    return []


def imports_of(path: Path, root: Path) -> list[Import]:
    """Every import of a file: ``import``, ``from ... import`` (relative ones resolved) and
    ``importlib.import_module("...")`` / ``__import__("...")`` with a literal name."""
    rel = path.relative_to(root)
    package = _package_of(rel)
    found: list[Import] = []

    def walk(node: ast.AST, module_level: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child.test):  # typing-only: never runs
                for sub in child.body:
                    visit(sub, False)
                for sub in child.orelse:
                    visit(sub, module_level)
            else:
                visit(child, module_level)

    def visit(node: ast.AST, module_level: bool) -> None:
        found.extend(Import(str(rel), getattr(node, "lineno", 0), m, module_level) for m in _imported(node, package))
        walk(node, module_level and not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), True)
    return found


def violations(root: Path) -> list[str]:
    """Every import under ``root`` that breaks :data:`FORBIDDEN` or :data:`NOT_AT_MODULE_LEVEL`."""
    bad = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            for imp in imports_of(path, root):
                top = imp.module.split(".")[0]
                serving = imp.file.startswith(SERVING)
                if top in FORBIDDEN.get(package, set()):
                    bad.append(f"{imp}: {package} may not import {top}")
                elif top in SERVING_ONLY and not serving and not _ray_core(imp):
                    bad.append(f"{imp}: only runtime.serving may import {top}")
                elif serving and top == "torch":
                    bad.append(f"{imp}: runtime.serving may not import torch")
                elif imp.module_level and top in NOT_AT_MODULE_LEVEL.get(package, set()):
                    bad.append(f"{imp}: {package} may import {top} only inside functions")
    return bad


def test_every_package_imports_only_what_its_layer_allows():
    assert sum(1 for p in PACKAGES for _ in (ROOT / p).rglob("*.py")) > 40  # the tree was found
    bad = violations(ROOT)
    assert not bad, "\n".join(bad)


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("rel,text,expected", [
    ("runtime/api.py", "import torch\n", "runtime may import torch only inside functions"),
    ("runtime/api.py", "try:\n    import torch.nn\nexcept ImportError:\n    pass\n",
     "runtime may import torch only inside functions"),
    ("runtime/backends/x.py", "def f():\n    from trainer.rundir import load_model\n", "runtime may not import trainer"),
    ("runtime/backends/x.py", "from ...export import cli\n", "runtime may not import export"),
    ("runtime/x.py", "import importlib\nM = importlib.import_module('quality.metrics')\n",
     "runtime may not import quality"),
    ("trainer/train.py", "def f():\n    import quality\n", "trainer may not import quality"),
    ("trainer/data/x.py", "from ...quality import metrics\n", "trainer may not import quality"),
    ("trainer/x.py", "from export.int8 import GateOptions\n", "trainer may not import export"),
    ("quality/metrics.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from export import int8\n",
     "quality may not import export"),
    ("runtime/cli.py", "def f():\n    from ray import serve\n", "only runtime.serving may import ray"),
    ("trainer/x.py", "import pydantic\n", "only runtime.serving may import pydantic"),
    ("runtime/serving/x.py", "def f():\n    import torch\n", "runtime.serving may not import torch"),
    ("runtime/cluster/x.py", "def f():\n    from ray import serve\n", "only runtime.serving may import ray"),
    ("runtime/cluster/x.py", "import fastapi\n", "only runtime.serving may import fastapi"),
])
def test_a_forbidden_import_is_reported(tmp_path, rel, text, expected):
    for package in PACKAGES:
        write(tmp_path, f"{package}/__init__.py", "")
    write(tmp_path, "trainer/data/__init__.py", "")
    write(tmp_path, "runtime/backends/__init__.py", "")
    write(tmp_path, "runtime/serving/__init__.py", "")
    write(tmp_path, rel, text)
    (found,) = violations(tmp_path)
    assert found.endswith(expected) and rel in found


@pytest.mark.parametrize("rel,text", [
    ("runtime/x.py", "def f():\n    import torch\n"),  # lazily, when chosen
    ("runtime/x.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import torch\n"),
    ("runtime/backends/x.py", "from ..files import atomic_path\nfrom . import ort_backend\n"),
    ("quality/x.py", "from trainer.rundir import load_weights\nimport runtime\n"),
    ("export/x.py", "import torch\nfrom trainer.rundir import load_model\nfrom quality import psnr\n"),
    ("trainer/x.py", "import torch\nfrom runtime.config import ModelSpec\n# import quality\ns = 'import export'\n"),
    ("runtime/serving/x.py", "from ray import serve\nfrom fastapi import FastAPI\nfrom runtime.api import load\n"),
    ("runtime/cluster/x.py", "def f():\n    import ray\n    from ray import exceptions\n"),
])
def test_allowed_imports_pass(tmp_path, rel, text):
    for package in PACKAGES:
        write(tmp_path, f"{package}/__init__.py", "")
    write(tmp_path, "runtime/backends/__init__.py", "")
    write(tmp_path, rel, text)
    assert violations(tmp_path) == []
