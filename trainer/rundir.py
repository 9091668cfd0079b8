"""Deciding whether a run directory may be used: new, resumed, or refused (nothing is lost)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from runtime.config import ModelSpec
from trainer.checkpoint import CONFIG, read_spec, step_dirs
from trainer.config import RESUMABLE_FIELDS, RunConfig
from trainer.errors import RunDirError


def load_run_config(run_dir: Path) -> RunConfig:
    """The run config stored in ``run_dir`` (for ``--resume``)."""
    if not (run_dir / CONFIG).is_file():
        raise RunDirError(f"nothing to resume: {run_dir / CONFIG} does not exist")
    return RunConfig.from_spec(read_spec(run_dir))


def with_train_overrides(cfg: RunConfig, overrides: dict[str, Any]) -> RunConfig:
    """``cfg`` with some training fields replaced; only fields that may change on resume (a value
    equal to the stored one is no change: ``--resume --batch-size 64`` of a batch-64 run is fine)."""
    current = {**dataclasses.asdict(cfg.model), **dataclasses.asdict(cfg.data), **dataclasses.asdict(cfg.train)}
    overrides = {k: v for k, v in overrides.items() if k not in current or current[k] != v}
    refused = sorted(set(overrides) - RESUMABLE_FIELDS)
    if refused:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in refused)
        allowed = ", ".join(f"--{k.replace('_', '-')}" for k in sorted(RESUMABLE_FIELDS))
        raise RunDirError(f"cannot change {flags} when resuming (the run was trained with other values); "
                          f"allowed: {allowed}")
    if "steps" in overrides:  # a new length given as steps replaces one given as epochs, and back
        overrides = {"epochs": None, **overrides}
    elif "epochs" in overrides:
        overrides = {"steps": None, **overrides}
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **overrides))


def check_run_dir(cfg: RunConfig, run_dir: Path, resume: bool) -> ModelSpec | None:
    """Check ``run_dir`` against ``cfg`` without touching it; returns the stored spec when resuming."""
    if resume:
        stored = load_run_config(run_dir)
        diffs = cfg.differences(stored, ignore=RESUMABLE_FIELDS)
        if diffs:
            raise RunDirError(f"{run_dir} was trained with a different config ({', '.join(diffs[:4])} differ)")
        return read_spec(run_dir)
    if (run_dir / CONFIG).is_file():
        stored = RunConfig.from_spec(read_spec(run_dir))
        diffs = cfg.differences(stored)
        if diffs:
            raise RunDirError(
                f"{run_dir} already holds a run with a different config ({', '.join(diffs[:4])} differ); "
                "pick another --out"
            )
        done = step_dirs(run_dir)
        at = f" at step {done[-1][0]}" if done else ""
        raise RunDirError(f"{run_dir} already holds this run{at}; pass --resume to continue it, or pick another --out")
    if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        raise RunDirError(f"{run_dir} exists and is not a run directory; pick another --out")
    ancestor = next(p for p in run_dir.absolute().parents if p.exists())
    if not ancestor.is_dir():  # fail before loading data, not after
        raise RunDirError(f"cannot create run directory {run_dir}: {ancestor} is not a folder")
    return None


def create_run_dir(run_dir: Path) -> None:
    """Create ``run_dir`` and prove it writable (one clear error otherwise)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise RunDirError(f"cannot write to run directory {run_dir}: {exc.strerror or exc}") from None
