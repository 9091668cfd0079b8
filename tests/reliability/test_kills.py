"""kill -9 at injected points (every write, rename, link and prune step of a checkpoint and of an
export's commit) and at random times: every checkpoint left is complete and loadable, resuming
gives the same weights as an uninterrupted run, an export folder is either the old export or the
new one (or restored by the next export), and staging is never read as an export.

The fast part (default run) kills at the steps where a crash hurts most; ``-m slow`` kills at every
step and at random times.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from export.pipeline import ExportOptions, export_run, is_our_export
from faults import ROOT, tiny_data
from runtime.exportdir import REPORT, latest_export
from trainer.rundir import load_checkpoint, step_dirs
from trainer.models import build_model
from trainer.train import fit

KILLER = Path(__file__).with_name("killer.py")
FIT_POINTS = 15  # steps of the checkpoint at step 2 (see killer.py); checked below
FAST_FIT_POINTS = (2, 8, 14)  # the final rename; between the two top-level links; inside pruning
EXPORT_POINTS = 5  # steps of an export's commit over an earlier export
FAST_EXPORT_POINTS = (2, 3)  # between the two renames; before the old export is deleted


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("kills")
    data = tiny_data(tmp / "data")
    reference = tmp / "reference"
    fit(CFG, reference, data, progress=False)
    return {"data": data, "reference": reference, "tmp": tmp}


CFG = tiny_config(steps=3, checkpoint_every=1, keep_checkpoints=1, sample_every=100)


def killed(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(KILLER), *args], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def check_run_after_kill(run: Path, world: dict[str, Path]) -> None:
    model, ema = build_model(CFG.model), build_model(CFG.model)
    for _, path in step_dirs(run):
        load_checkpoint(path, model, ema)  # complete or absent: never half
    fit(CFG, run, world["data"], resume=True, progress=False)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000003"], "leftovers after recovery"
    assert not list(run.glob(".*.tmp"))
    for name in ("model.safetensors", "train_state.pt"):
        assert os.path.samefile(run / name, ckpts / "step-0000003" / name)
    got, want = load_file(run / "model.safetensors"), load_file(world["reference"] / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), \
        "resume after the kill differs from the uninterrupted run"


def kill_fit_at(point: int, world: dict[str, Path], tmp: Path) -> None:
    run = tmp / f"run-{point}"
    proc = killed("fit", str(run), str(world["data"]), str(point))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    check_run_after_kill(run, world)


def kill_export_at(point: int, world: dict[str, Path], tmp: Path) -> None:
    exports = tmp / "exports"
    out = exports / "fm"
    export_run(world["reference"], out, ExportOptions())
    before = (out / REPORT).read_bytes()
    proc = killed("export", str(world["reference"]), str(out), str(point))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    if out.exists():
        assert is_our_export(out)  # the old export or the new one, whole
    found = latest_export(exports)
    assert found in (None, out), f"a staging folder was read as the latest export: {found}"
    export_run(world["reference"], out, ExportOptions(force=True))  # the next export finishes the job
    assert is_our_export(out) and sorted(p.name for p in exports.iterdir()) == ["fm"]
    assert before  # the first export was complete


def test_the_injected_points_are_the_ones_counted(world, tmp_path):
    proc = killed("fit", str(tmp_path / "run"), str(world["data"]), "1000")
    assert proc.returncode == 0 and f"steps counted: {FIT_POINTS}" in proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("point", FAST_FIT_POINTS)
def test_kill_inside_a_checkpoint(world, tmp_path, point):
    kill_fit_at(point, world, tmp_path)


@pytest.mark.parametrize("point", FAST_EXPORT_POINTS)
def test_kill_inside_an_export_commit(world, tmp_path, point):
    kill_export_at(point, world, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("point", [p for p in range(1, FIT_POINTS + 1) if p not in FAST_FIT_POINTS])
def test_kill_at_every_checkpoint_step(world, tmp_path, point):
    kill_fit_at(point, world, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("point", [p for p in range(1, EXPORT_POINTS + 1) if p not in FAST_EXPORT_POINTS])
def test_kill_at_every_export_commit_step(world, tmp_path, point):
    kill_export_at(point, world, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("trial", range(10))
def test_kill_at_a_random_time(world, tmp_path, trial):
    """A longer run killed at a random moment (loading, training, checkpointing or sampling)."""
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "trainer", "fit", "--data", str(world["data"]), "--out", str(run),
           "--preset", "fashion-mnist", "--image-size", "32", "--widths", "8,16", "--block-depth", "1",
           "--embedding-dims", "8", "--batch-size", "8", "--steps", "40", "--checkpoint-every", "3",
           "--keep-checkpoints", "2", "--sample-every", "7", "--sample-steps", "2", "--num-samples", "4",
           "--log-every", "1", "--no-progress"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(random.Random(trial).uniform(3.0, 9.0))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if not (run / "config.json").is_file():
        return  # killed before the run started: nothing to lose
    model, ema = build_model(CFG.model), build_model(CFG.model)
    for _, path in step_dirs(run):
        load_checkpoint(path, model, ema)
    done = subprocess.run(cmd[:8] + ["--resume", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert [s for s, _ in step_dirs(run)][-1] == 40
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    shutil.rmtree(run)
