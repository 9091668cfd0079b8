"""The backend table: a backend added through the table alone (a registered row, or an installed package's entry
point) is what `--backend NAME` picks, in ddim-run, the Python API and ddim-serve's options; auto follows the rows'
order and says what it skipped."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from runtime.api import load
from runtime.backends.registry import BackendEntry, OpenRequest, Skip, names, open_backend, register, unregister
from runtime.common.shipped import SHIPPED_MODEL

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fake_row():
    register(BackendEntry("fake", "doubles.fake_backend:open_fake", serve=True))
    yield
    unregister("fake")


def test_a_registered_row_is_picked_by_name_everywhere(fake_row, tmp_path, caplog):
    caplog.set_level("INFO", logger="runtime")
    from runtime.cli import main
    from runtime.serving.core import ServeOptions

    assert "fake" in names() and "fake" in names(serve=True)
    result = CliRunner().invoke(main, [str(SHIPPED_MODEL), "--backend", "fake", "--steps", "3", "--num-images", "2",
                                       "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz"),
                                       "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "backend: fake, numpy stand-in (asked for)" in caplog.messages
    sampler = load(SHIPPED_MODEL, backend="fake")
    api = sampler.sample(2, steps=3)
    assert sampler.backend.name == "fake" and sampler.backend.calls == 3
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["samples"], api.samples)
    assert ServeOptions(str(SHIPPED_MODEL), backend="fake").backend == "fake"
    unregister("fake")
    bad = CliRunner().invoke(main, [str(SHIPPED_MODEL), "--backend", "fake"])
    assert bad.exit_code == 2 and "'fake' is not one of 'auto', 'tensorrt', 'onnxruntime', 'torch'" in bad.output


def test_auto_walks_the_rows_in_order_and_keeps_the_skip_reasons(tmp_path):
    def never(r: OpenRequest):
        raise Skip("never here")

    shutil.copy2(SHIPPED_MODEL / "model.onnx", tmp_path / "model.onnx")  # no INT8 file, no gates: ONNX Runtime fp32
    register(BackendEntry("never", never, auto_rank=-2))
    try:
        b, why = open_backend(tmp_path, "auto", "cpu")
        assert b.name == "onnxruntime" and why.endswith("(never here; no TensorRT engine; --device cpu)"), why
        register(BackendEntry("fake", "doubles.fake_backend:open_fake", auto_rank=-1))
        b, why = open_backend(SHIPPED_MODEL, "auto", "cpu")
        assert b.name == "fake" and why == "fake, numpy stand-in (first in auto)"
    finally:
        unregister("never")
        unregister("fake")
    with pytest.raises(ValueError, match="unknown backend 'nope'; known here: auto"):
        open_backend(SHIPPED_MODEL, "nope")


def test_an_installed_plugin_is_a_row(tmp_path):
    """A package that declares a ddim_deploy.backends entry point (no registration code at all) gives ddim-run a
    --backend it did not know."""
    site = tmp_path / "site"
    dist = site / "fake_plugin-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[ddim_deploy.backends]\nfakeplug = doubles.fake_backend:FakeBackend\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "tests"), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-m", "runtime.cli", str(SHIPPED_MODEL), "--backend", "fakeplug",
                           "--steps", "2", "--num-images", "1", "--out", str(tmp_path / "g.png"), "--no-progress"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "backend: fakeplug, numpy stand-in (asked for)" in proc.stderr and (tmp_path / "g.png").is_file()
