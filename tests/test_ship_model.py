"""scripts/ship_model.py: a run becomes a shipped model folder (weights, config, ONNX, grid, logs), the
hand-written card is carried over, and a failure leaves the old folder exactly as it was."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from runtime.common.files import sha256_file
from runtime.metadata import METADATA_KEY
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


def ship_module():
    spec = importlib.util.spec_from_file_location("ship_model", ROOT / "scripts" / "ship_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ship_model_writes_the_folder_keeps_the_card_and_fails_without_touching_it(tmp_path, fashion_dir, monkeypatch):
    import onnx

    from trainer.rundir import load_weights
    from trainer.train import fit

    run = tmp_path / "run"
    fit(tiny_config(steps=2), run, fashion_dir, progress=False)
    out = tmp_path / "models" / "fm"
    out.mkdir(parents=True)
    (out / "README.md").write_text("# the card\n")
    (out / "stale.txt").write_text("from an older ship\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "ship_model.py"), str(run), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "README.md kept as it was" in proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "model.onnx", "samples.png", "loss.csv", "README.md"} <= names
    assert "stale.txt" not in names  # the folder is replaced as a whole
    assert (out / "README.md").read_text() == "# the card\n"
    assert all(k.startswith("ema.") for k in load_weights(out / "model.safetensors"))
    meta = {p.key: p.value for p in onnx.load(str(out / "model.onnx")).metadata_props}
    export = json.loads(meta[METADATA_KEY])["export"]
    assert export["weights_sha256"] == sha256_file(out / "model.safetensors") and export["source_run"] == "fm"
    assert [p.name for p in out.parent.iterdir()] == ["fm"]  # no staging folder left behind

    # A failing export (the parity gate, say) leaves every file of the shipped folder as it was.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    module = ship_module()

    def broken(*args, **kwargs):
        raise RuntimeError("parity gate failed: max relative error 1.0 > 1e-4")

    monkeypatch.setattr(module, "export_run", broken)
    fit(tiny_config(steps=4), tmp_path / "run2", fashion_dir, progress=False)
    result = CliRunner().invoke(module.main, [str(tmp_path / "run2"), "--out", str(out)])
    assert result.exit_code != 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in out.parent.iterdir()] == ["fm"]
