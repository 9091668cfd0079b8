"""runtime/exportdir.py, the export folder's one owner: which folders are exports or runs, which is the latest, how
the report is read; the names it gives are the ones the docs promise."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from runtime.exportdir import (ENGINE, FP16_ONNX, FP32_ONNX, INT8_ONNX, MANIFEST, REPORT, RUN_CHECKPOINTS, RUN_CONFIG,
                               is_export, is_run_dir, latest_export, latest_run, read_report)

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
