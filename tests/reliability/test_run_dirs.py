"""The trainer's run directory: one writer at a time, failed starts leave nothing, interrupted
checkpoints and pruning are finished at the next start, a corrupt latest checkpoint falls back."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path

import pytest

from faults import TINY_FLAGS, assert_kept, one_error_line, run_here, small_disk, snapshot, tiny_data, tiny_run
from trainer.rundir import load_checkpoint, step_dirs
from trainer.models import build_model


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tiny_data(tmp_path_factory.mktemp("data") / "fmnist")


def fit(*args: str, data: Path) -> object:
    if "--resume" in args:  # the run directory holds the rest
        return run_here("trainer", "fit", "--data", str(data), "--no-progress", *args)
    return run_here("trainer", "fit", "--data", str(data), *TINY_FLAGS, *args)


def test_a_second_writer_gets_one_line_naming_the_holder(data, tmp_path):
    run = tiny_run(tmp_path / "run", data)
    before = snapshot(run)
    fd = os.open(tmp_path / ".run.lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"31337\n")
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        line = one_error_line(fit("--resume", "--out", str(run), "--steps", "4", data=data))
        assert "run directory" in line and "in use by another process (PID 31337)" in line
        line = one_error_line(fit("--out", str(run), "--steps", "2", data=data))
        assert "PID 31337" in line
    finally:
        os.close(fd)
    assert_kept(before, run)


def test_a_failed_start_leaves_no_config(data, tmp_path, monkeypatch):
    import trainer.train as train
    from conftest import tiny_config

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory (injected)")

    monkeypatch.setattr(train.Trainee, "create", broken)
    run = tmp_path / "run"
    with pytest.raises(RuntimeError, match="injected"):
        train.fit(tiny_config(steps=2), run, data, progress=False)
    assert not run.exists()
    existing = tmp_path / "empty"
    existing.mkdir()  # a folder the user made: kept, and empty again
    with pytest.raises(RuntimeError, match="injected"):
        train.fit(tiny_config(steps=2), existing, data, progress=False)
    assert existing.is_dir() and not list(existing.iterdir())
    monkeypatch.undo()
    train.fit(tiny_config(steps=2), run, data, progress=False)  # the same --out works next time
    assert step_dirs(run)


def test_resume_accepts_the_values_it_was_trained_with(data, tmp_path):
    run = tiny_run(tmp_path / "run", data)
    proc = fit("--resume", "--out", str(run), "--steps", "3", "--batch-size", "8", data=data)
    assert proc.returncode == 0, proc.stderr
    line = one_error_line(fit("--resume", "--out", str(run), "--steps", "4", "--batch-size", "4", data=data))
    assert "cannot change --batch-size when resuming" in line


def test_a_corrupt_latest_checkpoint_falls_back_to_the_one_before(data, tmp_path):
    run = tiny_run(tmp_path / "run", data, keep_checkpoints=2)
    latest = run / "checkpoints" / "step-0000002"
    weights = latest / "model.safetensors"
    data_bytes = weights.read_bytes()
    weights.unlink()  # a hard link to the top-level file: replace, never write through it
    weights.write_bytes(data_bytes[: len(data_bytes) // 2])
    proc = fit("--resume", "--out", str(run), "--steps", "3", data=data)
    assert proc.returncode == 0, proc.stderr
    assert "checkpoint step-0000002 is unusable" in proc.stderr and "resuming from the one before" in proc.stderr
    assert (run / "checkpoints" / "corrupt-step-0000002" / "model.safetensors").read_bytes() == \
        data_bytes[: len(data_bytes) // 2]  # kept for the user
    assert [s for s, _ in step_dirs(run)][-1] == 3


def test_leftovers_of_killed_runs_are_finished_at_the_next_start(data, tmp_path):
    run = tiny_run(tmp_path / "run", data, keep_checkpoints=2)
    ckpts = run / "checkpoints"
    shutil.copytree(ckpts / "step-0000001", ckpts / ".prune-step-0000000")  # pruning cut midway
    shutil.copytree(ckpts / "step-0000001", ckpts / ".tmp-step-0000003")  # a checkpoint cut midway
    (ckpts / "step-0000009").mkdir()  # an incomplete step folder
    (ckpts / "step-0000009" / "model.safetensors").write_bytes(b"half")
    (run / ".model.safetensors.x1y2.tmp").write_bytes(b"link")  # an atomic write cut midway
    # A kill between the two top-level links: train_state.pt still the older checkpoint's.
    (run / "train_state.pt").unlink()
    os.link(ckpts / "step-0000001" / "train_state.pt", run / "train_state.pt")
    proc = fit("--resume", "--out", str(run), "--steps", "2", data=data)
    assert proc.returncode == 0, proc.stderr
    for phrase in ("removed the unfinished checkpoint folder .prune-step-0000000", ".tmp-step-0000003",
                   "step-0000009", "removed the temporary file .model.safetensors.x1y2.tmp",
                   "pointed train_state.pt at step-0000002 again"):
        assert phrase in proc.stderr, proc.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-0000001", "step-0000002"]
    assert os.path.samefile(run / "train_state.pt", ckpts / "step-0000002" / "train_state.pt")


def test_a_full_disk_during_a_checkpoint_keeps_the_last_good_one_and_resume_works(data, tmp_path):
    with small_disk(tmp_path / "disk", "900k") as disk:
        run = disk / "run"
        proc = fit("--out", str(run), "--steps", "60", "--keep-checkpoints", "100", data=data)
        line = one_error_line(proc)
        assert "cannot write checkpoint" in line and "No space left on device" in line and "--resume" in line
        assert not list((run / "checkpoints").glob(".tmp-*")), "a half-written checkpoint holds the space"
        good = step_dirs(run)
        assert good
        from conftest import tiny_config

        model, ema = (build_model(tiny_config().model) for _ in range(2))
        for _, path in good:
            load_checkpoint(path, model, ema)  # every complete checkpoint loads
        last = good[-1][0]
        for _, path in good[:-1]:  # the user frees space
            shutil.rmtree(path)
        proc = fit("--resume", "--out", str(run), "--steps", str(last + 1), "--keep-checkpoints", "1", data=data)
        assert proc.returncode == 0, proc.stderr
        assert [s for s, _ in step_dirs(run)] == [last + 1]


def test_a_file_is_not_a_run_directory(tmp_path):
    f = tmp_path / "run"
    f.write_text("x")
    assert "is a file, not a run directory" in one_error_line(run_here("export.cli", str(f), "--out", str(tmp_path / "e")))


def test_a_foreign_folder_with_a_config_is_never_recovered(data, tmp_path):
    """Another tool's training folder (its own config.json, checkpoints, temp files) given as --out."""
    other = tmp_path / "other"
    (other / "checkpoints" / "step-1000").mkdir(parents=True)
    (other / "checkpoints" / "step-1000" / "weights.bin").write_bytes(b"theirs")
    (other / ".notes.tmp").write_text("theirs")
    (other / "config.json").write_text('{"lr": 0.1}')
    before = snapshot(other)
    for args in (("--out", str(other), "--steps", "2"), ("--resume", "--out", str(other))):
        assert "config" in one_error_line(fit(*args, data=data))
        assert_kept(before, other)


def test_one_lock_per_folder_whatever_its_name(tmp_path):
    from runtime.common.files import LockHeld, PathLock

    (tmp_path / "runs" / "x").mkdir(parents=True)
    (tmp_path / "alias").symlink_to(tmp_path / "runs" / "x")
    with PathLock(tmp_path / "runs" / "x", "run directory"):
        for name in (tmp_path / "alias", tmp_path / "runs" / "x" / "sub" / ".."):
            with pytest.raises(LockHeld, match=f"PID {os.getpid()}"):
                PathLock(name, "run directory").__enter__()


def test_a_run_whose_every_checkpoint_is_corrupt_never_restarts_from_scratch(data, tmp_path):
    run = tiny_run(tmp_path / "run", data, keep_checkpoints=1)
    weights = run / "checkpoints" / "step-0000002" / "model.safetensors"
    weights.unlink()
    weights.write_bytes(b"garbage")
    line = one_error_line(fit("--resume", "--out", str(run), "--steps", "3", data=data))
    assert "no usable checkpoint" in line
    line = one_error_line(fit("--resume", "--out", str(run), "--steps", "3", data=data))
    assert "every checkpoint" in line and "nothing to resume from" in line
    assert (run / "checkpoints" / "corrupt-step-0000002" / "model.safetensors").read_bytes() == b"garbage"
