"""What the reliability suite shares: small disks, read-only folders, snapshots that prove nothing
was lost, and the command lines run as a user would (one line on stderr, an exit code).

Disk-full and read-only cases need mounts (root, as on the CI machines); elsewhere they skip.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import pytest

from runtime.exportdir import REPORT

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "models" / "fashion-mnist"


def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def small_disk(path: Path, size: str = "256k") -> Iterator[Path]:
    """A tmpfs of ``size`` at ``path``: writes beyond it fail with ENOSPC (skips without root)."""
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)):
        pytest.skip("disk-full cases need root to mount a small tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """``path`` (a folder) made read-only by a read-only bind mount, so root cannot write either."""
    path.mkdir(parents=True, exist_ok=True)
    if not _mount("--bind", "-o", "ro", str(path), str(path)):
        if os.geteuid() == 0:
            pytest.skip("read-only cases need a read-only bind mount (mount failed)")
        path.chmod(0o555)  # a normal user: permissions are enough
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) -> sha256 of its bytes; symlinks by their target."""
    out: dict[str, str] = {}
    if root.is_file():
        return {root.name: hashlib.sha256(root.read_bytes()).hexdigest()}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def assert_kept(before: dict[str, str], root: Path) -> None:
    """Nothing in ``before`` was lost or changed under ``root`` (new files may have appeared)."""
    after = snapshot(root)
    lost = sorted(k for k in before if k not in after)
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    assert not lost and not changed, f"lost {lost[:5]}, changed {changed[:5]}"


def cli(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None,
        timeout: float = 300) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (e.g. ``cli("export.cli", ...)``) in a child, as a user runs it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                          timeout=timeout)


COMMANDS = {"export.cli": ("export.cli", "main"), "runtime.cli": ("runtime.cli", "main"), "trainer": ("trainer.cli", "main")}


def run_here(module: str, *args: str, cwd: Path | None = None,
             env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """What :func:`cli` does, in this process (click's runner): the same command, exit code and
    stderr without a fresh interpreter's ~3 s of imports. For cases that need no kill or fresh state."""
    import importlib
    import logging

    from click.testing import CliRunner

    path, name = COMMANDS[module]
    main = getattr(importlib.import_module(path), name)
    for logger in ("", "trainer", "runtime", "export"):  # handlers bound to an earlier run's stream
        logging.getLogger(logger).handlers.clear()
    with contextlib.chdir(cwd or os.getcwd()):
        result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return subprocess.CompletedProcess([module, *args], result.exit_code, result.stdout, result.stderr)


def one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The ``error: ...`` line of a failed command; fails the test on a traceback or a zero exit."""
    assert proc.returncode != 0, f"exit 0; stderr: {proc.stderr[-2000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ") or line.startswith("Error: ")]
    assert lines, proc.stderr[-2000:]
    return lines[-1]


def shipped_export(dest: Path) -> Path:
    """An export folder of ours made from the shipped model's ONNX file (no export needed)."""
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy2(SHIPPED / "model.onnx", dest / "model.onnx")
    (dest / REPORT).write_text('{"parity": [], "notes": []}\n')
    return dest


def tiny_data(folder: Path) -> Path:
    """A Fashion-MNIST folder of 64 train and 16 test items (blobs), in the real IDX format."""
    from conftest import write_fashion

    return write_fashion(folder, 64, 16)


def tiny_run(run_dir: Path, data: Path, **train: object) -> Path:
    """A finished tiny training run (tests/conftest.tiny_config) in ``run_dir``."""
    from conftest import tiny_config
    from trainer.train import fit

    fit(tiny_config(**{"steps": 2, "sample_every": 2, "checkpoint_every": 1, **train}), run_dir, data,
        progress=False)
    return run_dir


TINY_FLAGS = ("--preset", "fashion-mnist", "--image-size", "32", "--widths", "8,16", "--block-depth", "1",
              "--embedding-dims", "8", "--batch-size", "8", "--sample-every", "100", "--sample-steps", "2",
              "--num-samples", "4", "--checkpoint-every", "1", "--log-every", "1", "--no-progress")
