"""runtime/exportdir.py, the export folder's one owner: which folders are exports or runs, which is the latest, how
the report is read; the names it gives are the ones the docs promise."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from runtime.exportdir import (ENGINE, FP16_ONNX, FP32_ONNX, INT8_ONNX, MANIFEST, REPORT, RUN_CHECKPOINTS, RUN_CONFIG,
                               foreign_files, is_export, is_run_dir, latest_export, latest_run, moved_aside,
                               read_report, written_files)

ROOT = Path(__file__).resolve().parents[1]


def export(folder: Path, report: str = "{}") -> Path:
    folder.mkdir(parents=True)
    (folder / FP32_ONNX).write_bytes(b"onnx")
    (folder / REPORT).write_text(report)
    return folder


def test_the_names_are_the_documented_ones():
    text = (ROOT / "docs" / "export.md").read_text() + (ROOT / "docs" / "design.md").read_text()
    for name in (FP32_ONNX, FP16_ONNX, INT8_ONNX, ENGINE, MANIFEST, REPORT):
        assert f"`{name}`" in text or name in text, name
    assert len({FP32_ONNX, FP16_ONNX, INT8_ONNX, ENGINE, MANIFEST, REPORT}) == 6


def test_exports_runs_and_the_latest_of_each(tmp_path):
    exports = tmp_path / "exports"
    old = export(exports / "old")
    time.sleep(0.01)
    new = export(exports / "new")
    os.utime(old / REPORT, (time.time() - 100, time.time() - 100))
    export(exports / ".new.partial-123")  # a killed export's staging folder: never the latest
    (exports / "unfinished").mkdir()
    (exports / "unfinished" / FP32_ONNX).write_bytes(b"onnx")  # no report: not complete
    run_like = export(exports / "run-like")
    (run_like / RUN_CONFIG).write_text("{}")  # a run directory is never an export, even holding a report
    os.utime(run_like / REPORT, (time.time() + 100, time.time() + 100))
    assert is_export(new) and not is_export(exports / "unfinished") and not is_export(run_like)
    assert is_run_dir(run_like) and not is_run_dir(new)
    assert latest_export(exports) == new and latest_export(tmp_path / "none") is None
    runs = tmp_path / "runs"
    (runs / "a").mkdir(parents=True)
    (runs / "a" / RUN_CONFIG).write_text("{}")
    (runs / "b" / RUN_CHECKPOINTS).mkdir(parents=True)  # no config yet: not a run to take
    (runs / ".a.lock").write_text("")
    assert latest_run(runs) == runs / "a" and is_run_dir(runs / "b")


def test_read_report(tmp_path):
    assert read_report(export(tmp_path / "ok", '{"int8": {"gate": {"passed": true}}}'))["int8"]["gate"]["passed"]
    with pytest.raises(ValueError, match="not a JSON object"):
        read_report(export(tmp_path / "list", "[1]"))
    with pytest.raises(ValueError):
        read_report(export(tmp_path / "torn", '{"int8": '))
    with pytest.raises(OSError):
        read_report(tmp_path / "missing")
    big = export(tmp_path / "big")
    (big / REPORT).write_text(" " * (2 << 20) + "{}")
    with pytest.raises(ValueError, match="larger than"):
        read_report(big)


def test_the_report_lists_what_was_written_and_the_rest_is_foreign(tmp_path):
    staging = tmp_path / ".out.partial-1"
    (staging / "unet").mkdir(parents=True)
    (staging / FP32_ONNX).write_bytes(b"onnx")
    (staging / "unet" / "w.safetensors").write_bytes(b"w")
    listed = written_files(staging)
    assert listed == sorted([FP32_ONNX, REPORT, "unet/w.safetensors"])
    (staging / REPORT).write_text(json.dumps({"files": listed}))
    out = staging.rename(tmp_path / "out")
    assert foreign_files(out) == ([], True)
    (out / "NOTES.md").write_text("mine")
    (out / "unet" / "mine.txt").write_text("mine")
    (out / "unet" / "deep").mkdir()
    (out / "unet" / "deep" / "x").write_text("mine")
    (out / "empty").mkdir()
    (out / "link").symlink_to(tmp_path)  # a link to a folder: listed, never followed
    assert foreign_files(out) == (["NOTES.md", "empty/", "link", "unet/deep/", "unet/mine.txt"], True)


def test_an_older_report_counts_only_the_export_file_names(tmp_path):
    out = export(tmp_path / "old")  # a report without "files"
    for name in (FP16_ONNX, MANIFEST, "model_index.json", "unet/config.json"):
        (out / name).parent.mkdir(exist_ok=True)
        (out / name).write_bytes(b"ours")
    assert foreign_files(out) == ([], False)
    (out / "unet" / "NOTES.md").write_text("mine")
    (out / "train.py").write_text("mine")
    assert foreign_files(out) == (["train.py", "unet/NOTES.md"], False)
    (out / REPORT).write_text('{"files": "not a list"}')  # a report we did not write: the same safe rule
    assert foreign_files(out) == (["train.py", "unet/NOTES.md"], False)


def test_an_export_moved_aside_by_a_killed_commit_is_found(tmp_path):
    exports = tmp_path / "exports"
    old = export(exports / ".ky.old-123")
    export(exports / ".ky.partial-124")  # a staging folder is never offered, even holding a report
    (exports / ".kyx.old-5").mkdir()  # another name
    (exports / ".ky.old-7").mkdir()  # no report: not an export
    assert moved_aside(exports / "ky") == [old]
    assert moved_aside(exports / "ky" / FP32_ONNX) == [old]
    assert moved_aside(exports / "other") == [] and moved_aside(tmp_path / "none" / "ky") == []
    export(exports / "ky")
    assert moved_aside(exports / "ky") == []  # it exists: nothing is missing
