"""``python -m quality classifier``: a new folder by default, never written over, the shipped one replaced
only when asked and then whole (the shipped path is a temporary folder here: models/ is never touched)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import quality.classifier as qc
from quality.cli import main
from quality.classifier import INFO, WEIGHTS, load_classifier

ROOT = Path(__file__).resolve().parents[1]


def classifier_cmd(*args: str) -> subprocess.CompletedProcess:
    """The command in this process (click's runner): exit code, stdout and stderr as a user sees them."""
    result = CliRunner().invoke(main, ["classifier", "--epochs", "1", "--no-progress", *args], catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def one_error(proc: subprocess.CompletedProcess, pattern: str, code: int = 1) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith(("error:", "Error:"))]
    assert re.search(pattern, line), line


@pytest.fixture
def shipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The shipped classifier folder, moved to a temporary place for the test."""
    folder = tmp_path / "models" / "fashion-mnist-classifier"
    monkeypatch.setattr(qc, "SHIPPED", folder)
    return folder


def test_default_out_is_a_new_runs_folder(tmp_path, fashion_dir, shipped, monkeypatch):
    monkeypatch.chdir(tmp_path)
    proc = classifier_cmd("--data", str(fashion_dir))
    assert proc.returncode == 0, proc.stderr
    (out,) = (tmp_path / "runs").iterdir()
    assert re.fullmatch(r"classifier-\d{8}-\d{6}", out.name)
    assert proc.stderr.startswith(f"classifier: Fashion-MNIST, 1 epochs, seed 0 -> runs/{out.name}\n")
    assert re.search(r"test accuracy \d+\.\d+% \(32 images\) in \d+ s; wrote runs/" + out.name, proc.stdout)
    assert sorted(p.name for p in out.iterdir()) == sorted([INFO, WEIGHTS])
    assert load_classifier(out)[1].epochs == 1
    assert not shipped.exists()  # the shipped classifier is not the default any more
    assert list((tmp_path / "runs").glob(".*")) == []  # no staging folder or lock left


def test_a_non_empty_out_is_refused_before_training(tmp_path, fashion_dir, shipped):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    proc = classifier_cmd("--data", str(fashion_dir), "--out", str(out))
    one_error(proc, rf"--out {re.escape(str(out))} is not empty; pick a new folder")
    assert "classifier: Fashion-MNIST" not in proc.stderr  # refused before any training
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "keep me"
    # An existing classifier folder is not written over either, and a file is no folder.
    assert classifier_cmd("--data", str(fashion_dir), "--out", str(tmp_path / "new")).returncode == 0
    one_error(classifier_cmd("--data", str(fashion_dir), "--out", str(tmp_path / "new")), "is not empty")
    one_error(classifier_cmd("--data", str(fashion_dir), "--out", str(out / "notes.txt")), "is not a folder")


def test_an_empty_out_folder_is_used(tmp_path, fashion_dir, shipped):
    out = tmp_path / "empty"
    out.mkdir()
    assert classifier_cmd("--data", str(fashion_dir), "--out", str(out), "--seed", "3").returncode == 0
    assert load_classifier(out)[1].seed == 3


def test_replace_shipped_and_out_are_exclusive(tmp_path, fashion_dir, shipped):
    proc = classifier_cmd("--data", str(fashion_dir), "--out", str(tmp_path / "x"), "--replace-shipped")
    one_error(proc, "--out and --replace-shipped are exclusive", code=2)
    assert not (tmp_path / "x").exists() and not shipped.exists()


def test_replace_shipped_replaces_the_shipped_folder_whole(tmp_path, fashion_dir, shipped):
    shipped.mkdir(parents=True)
    assert classifier_cmd("--data", str(fashion_dir), "--out", str(tmp_path / "first")).returncode == 0
    for name in (INFO, WEIGHTS):
        (shipped / name).write_bytes((tmp_path / "first" / name).read_bytes())
    (shipped / "README.md").write_text("# the shipped classifier\n")
    proc = classifier_cmd("--data", str(fashion_dir), "--replace-shipped", "--seed", "5")
    assert proc.returncode == 0, proc.stderr
    assert "(replacing the shipped classifier)" in proc.stderr.splitlines()[0]
    assert load_classifier(shipped)[1].seed == 5
    assert (shipped / "README.md").read_text() == "# the shipped classifier\n"  # its other files carried over
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["fashion-mnist-classifier"]  # nothing half-done left


def test_replace_shipped_writes_it_when_absent_and_refuses_a_foreign_folder(tmp_path, fashion_dir, shipped):
    assert classifier_cmd("--data", str(fashion_dir), "--replace-shipped").returncode == 0
    assert load_classifier(shipped)[1].format == qc.FORMAT
    (shipped / INFO).unlink()  # no classifier description: not ours to replace
    one_error(classifier_cmd("--data", str(fashion_dir), "--replace-shipped"), "holds no classifier")
    assert (shipped / WEIGHTS).is_file()


def test_a_failed_write_leaves_the_previous_classifier_intact(tmp_path, fashion_dir, shipped, monkeypatch):
    assert classifier_cmd("--data", str(fashion_dir), "--replace-shipped", "--seed", "1").returncode == 0
    before = {p.name: p.read_bytes() for p in shipped.iterdir()}
    real_save = qc.save_classifier

    def save_then_fail(model, info, folder):  # the weights are written, then the disk fills up
        real_save(model, info, folder)
        (folder / INFO).write_text("{half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(qc, "save_classifier", save_then_fail)
    one_error(classifier_cmd("--data", str(fashion_dir), "--replace-shipped", "--seed", "2"), "No space left")
    assert {p.name: p.read_bytes() for p in shipped.iterdir()} == before
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["fashion-mnist-classifier"]


def test_a_kill_between_the_renames_is_finished_by_the_next_writer(tmp_path, fashion_dir, shipped):
    assert classifier_cmd("--data", str(fashion_dir), "--replace-shipped", "--seed", "1").returncode == 0
    # A kill after the old folder moved aside and before the new one moved in, with a staging folder left.
    os.replace(shipped, shipped.parent / f".{shipped.name}.old-99999")
    (shipped.parent / f".{shipped.name}.partial-99998").mkdir()
    model, info = load_classifier(shipped.parent / f".{shipped.name}.old-99999")
    with pytest.raises(qc.QualityError, match="is not empty"):  # the restored folder is not written over
        qc.write_classifier_folder(model, info, shipped)
    assert load_classifier(shipped)[1].seed == 1
    assert sorted(p.name for p in shipped.parent.iterdir()) == ["fashion-mnist-classifier"]


def test_python_m_quality_runs_the_command_with_one_line_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "quality", "classifier", "--data", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "cls"), "--no-progress"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=300)
    one_error(proc, "does not exist")
    assert not (tmp_path / "cls").exists()
