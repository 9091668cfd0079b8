"""ddim-run as a hostile user meets it: what it samples from, bad numbers, outputs it cannot write.

Every failure is one line naming the flag, comes before the sampling it would waste, and leaves
what the user had (an old grid, npz, per-image folder) byte-identical.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from faults import SHIPPED, assert_kept, cli, one_error_line, read_only, shipped_export, small_disk, snapshot

FAST = ("--steps", "2", "--num-images", "2", "--no-progress")


@pytest.fixture
def tmp(tmp_path: Path) -> Path:
    """A working folder with an export of the shipped model at exports/fm."""
    shipped_export(tmp_path / "exports" / "fm")
    return tmp_path


def ddim_run(tmp: Path, *args: str, timeout: float = 60):
    """``ddim-run ARGS`` in ``tmp`` (its exports/), with a cache of its own."""
    return cli("runtime.cli", *args, cwd=tmp, env={"DDIM_DEPLOY_CACHE": str(tmp / "cache")}, timeout=timeout)


def old_outputs(folder: Path) -> dict[str, str]:
    """Outputs of an earlier run in ``folder`` (grid, npz, per-image folder); their snapshot."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "samples.png").write_bytes(b"old grid")
    (folder / "s.npz").write_bytes(b"old npz")
    (folder / "each").mkdir(exist_ok=True)
    (folder / "each" / "00000.png").write_bytes(b"old image 0")
    (folder / "each" / "notes.txt").write_text("mine")
    return snapshot(folder)


def temp_files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def test_staging_folders_and_incomplete_exports_are_never_picked(tmp_path):
    exports = tmp_path / "exports"
    partial = exports / ".fm.partial-12345"  # a killed ddim-export: ungated model, no report yet
    partial.mkdir(parents=True)
    shutil.copy2(SHIPPED / "model.onnx", partial / "model.onnx")
    shipped_export(exports / ".fm.old-12345")  # the export a killed ddim-export was replacing
    broken = exports / "broken"  # a model.onnx but no export_report.json: not an export of ours
    broken.mkdir()
    shutil.copy2(SHIPPED / "model.onnx", broken / "model.onnx")
    future = time.time() + 3600  # newer than any real export
    for folder in (partial, exports / ".fm.old-12345", broken):
        for f in folder.iterdir():
            os.utime(f, (future, future))
    proc = ddim_run(tmp_path, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == f"ddim-run: {SHIPPED} (the shipped model: no export under exports/)"
    shipped_export(exports / "fm")
    proc = ddim_run(tmp_path, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0] == "ddim-run: exports/fm (the latest export under exports/)"
    assert (tmp_path / "samples.png").is_file() and not temp_files(tmp_path)


def test_read_only_out_fails_before_the_model_loads(tmp):
    before = old_outputs(tmp / "ro")
    with read_only(tmp / "ro"):
        start = time.perf_counter()
        # 100,000 images x 50 steps would sample for hours: only an up-front check returns in time.
        proc = ddim_run(tmp, "--num-images", "100000", "--out", "ro/samples.png", "--no-progress", timeout=30)
        seconds = time.perf_counter() - start
    line = one_error_line(proc)
    assert line.startswith("error: cannot write --out ro/samples.png: ro is not writable"), line
    assert "backend:" not in proc.stderr and "sampling" not in proc.stderr and seconds < 20
    assert_kept(before, tmp / "ro")


def test_read_only_npz_writes_no_grid(tmp):
    before = old_outputs(tmp)
    (tmp / "ro").mkdir()
    (tmp / "ro" / "s.npz").write_bytes(b"old npz in ro")
    before_ro = snapshot(tmp / "ro")
    with read_only(tmp / "ro"):
        proc = ddim_run(tmp, *FAST, "--out", "samples.png", "--out-dir", "each", "--npz", "ro/s.npz")
    line = one_error_line(proc)
    assert line.startswith("error: cannot write --npz ro/s.npz: ro is not writable"), line
    assert "backend:" not in proc.stderr
    assert_kept(before, tmp)  # the old grid and per-image files are byte-identical
    assert_kept(before_ro, tmp / "ro")
    assert sorted(p.name for p in (tmp / "each").iterdir()) == ["00000.png", "notes.txt"]


@pytest.mark.parametrize(("extra", "flag"), [(("--npz", "disk/s.npz"), "--npz"),
                                             (("--out-dir", "disk/each", "--npz", "disk/s.npz"), "--out-dir")])
def test_disk_full_writes_nothing_and_keeps_everything(tmp, extra, flag):
    # 256 KiB: the old files and the new 64-image grid (~47 KB) fit; the npz (~330 KB) or
    # 64 per-image PNGs (a 4 KiB page each) do not.
    with small_disk(tmp / "disk", "256k"):
        before = old_outputs(tmp / "disk")
        proc = ddim_run(tmp, "--steps", "2", "--num-images", "64", "--no-progress", "--out", "disk/samples.png",
                        *extra)
        line = one_error_line(proc)
        assert f"cannot write {flag} disk/" in line and "No space left on device" in line, line
        assert_kept(before, tmp / "disk")
        assert not temp_files(tmp / "disk")
        assert sorted(p.name for p in (tmp / "disk" / "each").iterdir()) == ["00000.png", "notes.txt"]
        assert shutil.disk_usage(tmp / "disk").used < 64 * 1024  # the staged files' space was given back


@pytest.mark.parametrize(("args", "flag"), [
    (("--batch-size", "0"), "--batch-size"),
    (("--steps", "0"), "--steps"),
    (("--num-images", "0"), "--num-images"),
    (("--seed", "-1"), "--seed"),
    (("--eta", "-0.5"), "--eta"),
])
def test_numbers_out_of_range_name_the_flag(tmp, args, flag):
    before = old_outputs(tmp)
    proc = ddim_run(tmp, "--steps", "2", "--num-images", "2", "--no-progress", *args)
    line = one_error_line(proc)
    assert proc.returncode == 2 and f"'{flag}'" in line, (proc.returncode, line)
    if flag in ("--steps", "--eta"):  # sampling settings: SamplingSettings' rules, the flag named
        assert f"{flag} must be" in line, line
    else:
        assert "not in the range" in line, line
    assert_kept(before, tmp)


def test_steps_beyond_the_schedule_fail_fast(tmp):
    before = old_outputs(tmp)
    start = time.perf_counter()
    proc = ddim_run(tmp, "--steps", "100000000", "--num-images", "2", timeout=30)
    line = one_error_line(proc)
    assert line == "error: --steps 100000000 is more than 10,000, the most the continuous 'cosine-angle' " \
                   "schedule takes", line
    assert "MemoryError" not in proc.stderr and "sampling" not in proc.stderr
    assert time.perf_counter() - start < 20
    assert_kept(before, tmp)


def test_outputs_of_the_wrong_kind_are_refused(tmp):
    before = old_outputs(tmp)
    (tmp / "results").mkdir()
    cases = [
        (("--out", "x.gif"), "error: --out x.gif must end in .png, .jpg, .jpeg or .webp: the suffix says which file "
                             "type is written"),
        (("--npz", "arrays.npy"), "error: --npz arrays.npy must end in .npz: the suffix says which file type is "
                                  "written"),
        (("--out", "results"), "error: --out results is a folder; give a file name, e.g. results/samples.png"),
        (("--out-dir", "s.npz"), "error: --out-dir s.npz is a file, not a folder"),
    ]
    for args, expected in cases:
        proc = ddim_run(tmp, *FAST, *args)
        assert one_error_line(proc) == expected, args
        assert "backend:" not in proc.stderr, args
    assert not (tmp / "x.gif").exists() and not (tmp / "arrays.npy").exists()
    assert_kept(before, tmp)


def test_out_suffix_picks_the_image_type(tmp):
    """--out x.jpg is a JPEG, x.webp a (lossless) WebP, x.png a PNG: never PNG bytes under another name."""
    from PIL import Image

    for name, fmt in (("grid.jpg", "JPEG"), ("grid.JPEG", "JPEG"), ("grid.webp", "WEBP"), ("grid.png", "PNG")):
        proc = ddim_run(tmp, *FAST, "--out", name)
        assert proc.returncode == 0, proc.stderr
        with Image.open(tmp / name) as im:
            assert im.format == fmt, (name, im.format)
    with Image.open(tmp / "grid.webp") as webp, Image.open(tmp / "grid.png") as png:
        assert np.array_equal(np.asarray(webp.convert("L")), np.asarray(png.convert("L")))  # lossless


def test_a_missing_export_names_the_one_a_killed_export_moved_aside(tmp):
    """A kill between the two renames of an export's commit leaves ``.ky.old-PID`` and no ``ky``: ddim-run and
    ddim-serve say where it is and how to get it back, not just "does not exist"."""
    from click.testing import CliRunner

    from runtime.serving.cli import main as serve_main

    exports = tmp / "exports"
    os.replace(exports / "fm", exports / ".ky.old-4242")
    before = snapshot(exports)
    expected = ("MODEL exports/ky does not exist, but exports/.ky.old-4242 holds the export a killed ddim-export was "
                "replacing there: rename it back (mv exports/.ky.old-4242 exports/ky), or run ddim-export into "
                "exports/ky again, which restores it first")
    assert one_error_line(ddim_run(tmp, "exports/ky", *FAST)) == f"error: {expected}"
    assert expected in one_error_line(ddim_run(tmp, "exports/ky/model.onnx", *FAST)).replace("/model.onnx", "")
    with contextlib.chdir(tmp):
        result = CliRunner().invoke(serve_main, ["exports/ky"])
    assert result.exit_code == 1 and f"error: {expected}" in result.stderr, result.stderr
    assert one_error_line(ddim_run(tmp, "exports/other", *FAST)) == "error: exports/other does not exist"
    assert_kept(before, exports)
