"""What a kill -9 of ``ddim-run`` leaves while it writes its outputs, and what the next ``ddim-run`` removes of it:
the staging folders ``.ddim-run-staging-PID-XXXXXXXX/`` of dead writers (their OS lock is free), and nothing
else: not a live writer's, not a user's file that merely looks like a temporary one."""

from __future__ import annotations

import fcntl
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from faults import ROOT, assert_kept, run_here, snapshot
from runtime.common.files import STAGING_LOCK, STAGING_PREFIX, StagingFolder, remove_stale_staging
from runtime.common.outputs import StagedOutputs

KILLER = Path(__file__).with_name("killer.py")
IMAGES = 120
ARGS = ("--steps", "1", "--num-images", str(IMAGES), "--batch-size", "64", "--no-progress", "--out-dir", "each")
STAGED = IMAGES + 1  # steps of the staging phase (killer.py: one fsync per staged file: the grid, then the PNGs)


def killed_run(cwd: Path, point: int) -> subprocess.CompletedProcess:
    """``ddim-run ARGS`` in ``cwd``, SIGKILLed at the ``point``-th step of writing its outputs."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DDIM_DEPLOY_CACHE": str(cwd.parent / "cache")}
    return subprocess.run([sys.executable, str(KILLER), "run", str(point), *ARGS], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def users_files(cwd: Path) -> dict[str, str]:
    """What a user keeps beside ddim-run's outputs, some of it looking like leftovers of other tools."""
    (cwd / "each").mkdir(parents=True)
    (cwd / "each" / "notes.txt").write_text("mine")
    (cwd / "each" / ".00003.png.k2j4h5g6.tmp").write_text("an older tool's temporary file: not provably ours")
    (cwd / "mine.png").write_bytes(b"my picture")
    (cwd / ".ddim-run-staging-drafts").mkdir()  # not the staging name (no PID-XXXXXXXX): a user's folder
    (cwd / ".ddim-run-staging-drafts" / "a.png").write_bytes(b"draft")
    return snapshot(cwd)


def leftovers(cwd: Path) -> list[str]:
    """Staging folders and temporary files under ``cwd``, the user's decoys aside."""
    found = [p for p in cwd.rglob("*") if p.name.startswith(STAGING_PREFIX) or p.suffix == ".tmp"]
    decoys = {cwd / "each" / ".00003.png.k2j4h5g6.tmp", cwd / ".ddim-run-staging-drafts"}
    return sorted(str(p.relative_to(cwd)) for p in found if p not in decoys)


def kill_and_rerun(tmp_path: Path, point: int) -> None:
    cwd = tmp_path / "work"
    before = users_files(cwd)
    proc = killed_run(cwd, point)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    left = leftovers(cwd)
    assert left, "the kill left nothing behind: the point is not inside the writing"
    assert any(".ddim-run-staging-" in name for name in left), left  # named so a user sees what they are
    rerun = run_here("runtime.cli", *ARGS, cwd=cwd, env={"DDIM_DEPLOY_CACHE": str(tmp_path / "cache")})
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "staged outputs of a killed ddim-run" in rerun.stderr
    assert leftovers(cwd) == [], "a temporary file survived a kill -9 plus one rerun"
    assert_kept(before, cwd)
    names = sorted(p.name for p in (cwd / "each").iterdir())
    assert names == sorted([f"{i:05d}.png" for i in range(IMAGES)] + ["notes.txt", ".00003.png.k2j4h5g6.tmp"])
    assert (cwd / "samples.png").is_file()


@pytest.mark.parametrize("point", [STAGED // 2, STAGED + IMAGES // 2],
                         ids=["while-staging", "between-renames"])
def test_a_killed_ddim_run_leaves_nothing_after_one_rerun(tmp_path, point):
    kill_and_rerun(tmp_path, point)


@pytest.mark.slow
def test_a_killed_ddim_run_at_random_points(tmp_path):
    rng = random.Random(0)
    for i, point in enumerate(sorted(rng.sample(range(1, 2 * STAGED), 8))):
        kill_and_rerun(tmp_path / str(i), point)


def lock_of(folder: Path) -> int:
    """Hold ``folder``'s staging lock as a live writer does (another open file: flock conflicts in-process too)."""
    fd = os.open(folder / STAGING_LOCK, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def dead_staging(parent: Path) -> Path:
    """A staging folder with a staged file whose writer was killed (-9) while it wrote."""
    code = ("import os, sys; from pathlib import Path; from runtime.common.files import StagingFolder; "
            "s = StagingFolder(Path(sys.argv[1])); s.file('00000.png').write_bytes(b'half'); print(s.path.name, "
            "flush=True); os.kill(os.getpid(), 9)")
    proc = subprocess.run([sys.executable, "-c", code, str(parent)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return parent / proc.stdout.strip()


def test_only_dead_writers_staging_folders_are_removed(tmp_path):
    dead = dead_staging(tmp_path)
    assert (dead / "00000.png").is_file() and (dead / STAGING_LOCK).is_file()
    live = tmp_path / ".ddim-run-staging-1-abcdefgh"  # another process writing now: its lock is held
    live.mkdir()
    (live / STAGING_LOCK).write_text("")
    (live / "00001.png").write_bytes(b"being written")
    fd = lock_of(live)
    born = tmp_path / ".ddim-run-staging-2-bornnow1"  # a writer killed between making it and locking it
    born.mkdir()
    odd = tmp_path / ".ddim-run-staging-3-nolock12"  # no lock but files: never made by a StagingFolder
    odd.mkdir()
    (odd / "x.png").write_bytes(b"x")
    linked = tmp_path / ".ddim-run-staging-4-linked12"  # a link to a user's folder: never followed
    (tmp_path / "users").mkdir()
    (tmp_path / "users" / STAGING_LOCK).write_text("")
    (tmp_path / "users" / "keep.png").write_bytes(b"keep")
    linked.symlink_to(tmp_path / "users")
    lookalike = tmp_path / ".ddim-run-staging-5-ABCDEFGH"  # not a name mkdtemp gives
    lookalike.mkdir()
    (lookalike / STAGING_LOCK).write_text("")
    before = snapshot(tmp_path)
    try:
        removed = remove_stale_staging(tmp_path)
    finally:
        os.close(fd)
    assert sorted(removed) == sorted([dead.name, born.name])
    assert not dead.exists() and not born.exists()
    assert_kept({k: v for k, v in before.items() if not k.startswith((dead.name, born.name))}, tmp_path)
    assert live.is_dir() and odd.is_dir() and linked.is_symlink() and lookalike.is_dir()


def test_a_writer_never_removes_another_live_writers_outputs(tmp_path):
    """Two commands staging into one folder at once, in one process (flock's per-file locks) or two."""
    with StagedOutputs() as first:
        first.stage(tmp_path / "a.png", b"a", "--out")
        with StagedOutputs() as second:
            second.stage(tmp_path / "b.png", b"b", "--out")  # cleans the folder first: the first's files stay
            second.commit()
        other = subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from runtime.common."
                                "files import remove_stale_staging as r; print(r(Path(sys.argv[1])))", str(tmp_path)],
                               capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert other.stdout.strip() == "[]", other.stderr
        first.commit()
    assert (tmp_path / "a.png").read_bytes() == b"a" and (tmp_path / "b.png").read_bytes() == b"b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_a_failed_write_leaves_no_staging_folder(tmp_path):
    (tmp_path / "old.png").write_bytes(b"old")

    def broken(fh):
        fh.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="cannot write --out-dir"):
        with StagedOutputs() as staged:
            staged.stage(tmp_path / "old.png", b"new", "--out")
            staged.stage(tmp_path / "each" / "00000.png", broken, "--out-dir")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.png"]
    assert (tmp_path / "old.png").read_bytes() == b"old"


def test_staging_folder_names_say_what_they_are(tmp_path):
    staging = StagingFolder(tmp_path)
    try:
        assert staging.path.name.startswith(f".ddim-run-staging-{os.getpid()}-")
        assert remove_stale_staging(tmp_path) == [] and staging.path.is_dir()  # its own: never stale
    finally:
        staging.close()
    assert list(tmp_path.iterdir()) == []
