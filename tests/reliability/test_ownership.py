"""Nothing a user owns is replaced by ``ddim-export``; staging never counts; a killed export is
finished by the next one; one export at a time per ``--out``."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from runtime.exportdir import latest_run
from export.pipeline import ExportOptions, export_run, is_our_export
from runtime.exportdir import REPORT
from faults import assert_kept, one_error_line, run_here, snapshot, tiny_data, tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("own")
    return tiny_run(tmp / "runs" / "tiny", tiny_data(tmp / "data"))


def export(run_dir: Path, out: Path, *flags: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run_here("export.cli", str(run_dir), "--out", str(out), *flags, cwd=cwd or out.parent)


def test_force_never_replaces_a_run_directory(run_dir, tmp_path):
    victim = tmp_path / "victim"
    shutil.copytree(run_dir, victim)
    before = snapshot(victim)
    line = one_error_line(export(run_dir, victim, "--force"))
    assert "is a training run directory; it is never replaced" in line
    assert_kept(before, victim)
    # The source run itself as --out: the same refusal.
    line = one_error_line(export(run_dir, run_dir, "--force"))
    assert "training run directory" in line


def test_force_never_replaces_a_file_or_another_folder(run_dir, tmp_path):
    plain = tmp_path / "notes.txt"
    plain.write_text("mine")
    assert "is a file, not an export folder" in one_error_line(export(run_dir, plain, "--force"))
    assert plain.read_text() == "mine"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.png").write_bytes(b"png")
    before = snapshot(other)
    line = one_error_line(export(run_dir, other, "--force"))
    assert "not an export of ddim-export" in line and "--force" in line and "never replaced" in line
    assert_kept(before, other)


def test_an_earlier_export_is_replaced_only_with_force(run_dir, tmp_path):
    out = tmp_path / "exp"
    assert export(run_dir, out).returncode == 0
    assert is_our_export(out)
    before = snapshot(out)
    assert "holds an earlier export; pass --force" in one_error_line(export(run_dir, out))
    assert_kept(before, out)
    proc = export(run_dir, out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert (out / REPORT).is_file() and not list(tmp_path.glob(".exp.*-*"))


def test_staging_folders_are_never_the_latest_run_or_export(run_dir, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copytree(run_dir, runs / ".tiny.partial-1")
    assert latest_run(runs) is None
    os.symlink(run_dir, runs / "real")
    assert latest_run(runs) == runs / "real"


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_next_export_cleans_and_restores_what_a_killed_one_left(run_dir, tmp_path):
    out = tmp_path / "exp"
    assert export(run_dir, out).returncode == 0
    pid = dead_pid()
    # A kill between the two renames of the commit: --out gone, the old export under .exp.old-PID.
    os.replace(out, tmp_path / f".exp.old-{pid}")
    (tmp_path / f".exp.partial-{pid}").mkdir()
    (tmp_path / f".exp.partial-{pid}" / "model.onnx").write_bytes(b"half")
    reused = tmp_path / f".exp.partial-{os.getppid()}"  # a PID alive again (reused): still stale under the lock
    reused.mkdir()
    other = tmp_path / f".other.partial-{pid}"  # another --out's staging: not ours to touch here
    other.mkdir()
    proc = export(run_dir, out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert f"restored {out} from .exp.old-{pid}" in proc.stderr
    assert f"removed .exp.partial-{pid}" in proc.stderr
    assert is_our_export(out)
    assert not reused.exists() and other.is_dir()
    assert not (tmp_path / f".exp.old-{pid}").exists() and not (tmp_path / f".exp.partial-{pid}").exists()


def test_recovery_without_a_new_export_in_python(run_dir, tmp_path):
    """A kill after the commit but before the old export was deleted: the next export removes it."""
    out = tmp_path / "exp"
    export_run(run_dir, out, ExportOptions())
    pid = dead_pid()
    shutil.copytree(out, tmp_path / f".exp.old-{pid}")
    export_run(run_dir, out, ExportOptions(force=True))
    assert not (tmp_path / f".exp.old-{pid}").exists() and is_our_export(out)


def test_one_export_at_a_time_per_out(run_dir, tmp_path):
    out = tmp_path / "exp"
    lock = tmp_path / ".exp.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    os.write(fd, b"4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # another exporter holds it
    try:
        line = one_error_line(export(run_dir, out))
        assert "export folder" in line and "in use by another process (PID 4242)" in line
        assert not out.exists()
    finally:
        os.close(fd)
    assert export(run_dir, out).returncode == 0  # released (the kernel drops it with its holder)


def test_force_never_replaces_an_export_holding_the_users_files(run_dir, tmp_path):
    out = tmp_path / "exp"
    assert export(run_dir, out).returncode == 0
    (out / "NOTES.md").write_text("what I learnt from this export")
    (out / "drafts").mkdir()
    (out / "drafts" / "a.txt").write_text("mine")
    before = snapshot(out)
    line = one_error_line(export(run_dir, out, "--force"))
    assert "files it did not write (NOTES.md, drafts/)" in line and "never replaced (even with --force)" in line
    assert_kept(before, out)
    assert is_our_export(out) and not list(tmp_path.glob(".exp.*-*"))
    (out / "NOTES.md").unlink()
    shutil.rmtree(out / "drafts")
    proc = export(run_dir, out, "--force")  # a clean export of ours: replaced as before
    assert proc.returncode == 0, proc.stderr
    assert is_our_export(out) and not (out / "NOTES.md").exists()


def test_force_with_out_dot_never_deletes_the_users_other_files(run_dir, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    assert export(run_dir, Path("."), cwd=project).returncode == 0  # an empty folder: exported into
    assert (project / REPORT).is_file()
    for i in range(5):
        (project / f"train{i}.py").write_text("mine")
    before = snapshot(project)
    line = one_error_line(export(run_dir, Path("."), "--force", cwd=project))
    assert "train0.py, train1.py, train2.py and 2 more" in line and "never replaced" in line
    assert_kept(before, project)


def test_an_older_report_without_a_file_list_counts_only_export_names(tmp_path, run_dir):
    from faults import shipped_export

    out = shipped_export(tmp_path / "old")  # a report of before the file list
    (out / "model.fp16.onnx").write_bytes(b"an export's name: ours")
    (out / "NOTES.md").write_text("mine")
    before = snapshot(out)
    line = one_error_line(export(run_dir, out, "--force"))
    assert "(NOTES.md)" in line and "lists no files: only the export's own file names count" in line
    assert_kept(before, out)
    (out / "NOTES.md").unlink()
    proc = export(run_dir, out, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (out / "model.fp16.onnx").exists()


def test_the_diffusers_export_follows_the_same_rule(run_dir, tmp_path):
    pytest.importorskip("diffusers")
    from export.to_diffusers import export_diffusers
    from runtime.exportdir import read_report

    out = tmp_path / "pipe"
    export_diffusers(run_dir, out)
    listed = read_report(out)["files"]
    assert listed == sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert "unet/diffusion_pytorch_model.safetensors" in listed
    (out / "unet" / "NOTES.md").write_text("mine")
    before = snapshot(out)
    with pytest.raises(FileExistsError, match=r"--diffusers .* did not write \(unet/NOTES.md\)"):
        export_diffusers(run_dir, out, force=True)
    assert_kept(before, out)
    (out / "unet" / "NOTES.md").unlink()
    export_diffusers(run_dir, out, force=True)
