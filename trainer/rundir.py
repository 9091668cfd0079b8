"""The run directory, owned here: its layout, checkpoints, crash recovery, and whether it may be used.

Layout of a run directory (``python -m trainer fit --out RUN_DIR``)::

    config.json                      the full config (model, schedule, data, training; schema-versioned),
                                     written once: a run rebuilds its own model from it
    model.safetensors                EMA (``ema.*``) and raw (``raw.*``) weights of the latest checkpoint
                                     (a hard link into checkpoints/, a copy where links fail)
    train_state.pt                   optimiser, step, RNG and gradient-scaler states of the latest
                                     checkpoint (a hard link, likewise)
    checkpoints/step-0000500/        the last ``keep_checkpoints`` checkpoints, each holding
                                     model.safetensors + train_state.pt, complete or absent
    checkpoints/corrupt-step-N/      an unusable checkpoint set aside on resume (kept for the user,
                                     ignored by every reader)
    samples/step-0000500.png         sample grids of the EMA model; samples.png is the latest
    loss.csv, loss.png               averaged losses (``trainer.logbook``)
    train.log                        the log of every session of the run

Beside it, ``.NAME.lock`` is the run's OS lock while a process trains in it. A checkpoint is written
as ``checkpoints/.tmp-step-N`` and renamed when complete, and pruned by renaming it to
``.prune-step-N`` first, so a crash mid-write or mid-prune leaves no partial ``step-N``;
:func:`recover_run_dir` removes what a killed process left. A run directory is used new (empty or
absent), resumed (same config), or refused (:func:`check_run_dir`): nothing in it is ever lost.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from runtime.exportdir import RUN_CHECKPOINTS, RUN_CONFIG as CONFIG, RUN_WEIGHTS as WEIGHTS  # the layout readers share
from runtime import __version__
from runtime.config import ModelSpec
from runtime.common.files import atomic_path, atomic_write_text, fsync_dir, sha256_file
from runtime.common.limits import FILE_OVERHEAD, SizeLimitError, SizeLimits, check_file_size
from trainer.config import RESUMABLE_FIELDS, RunConfig
from trainer.errors import CheckpointError, RunDirError
from trainer.models import build_model

log = logging.getLogger(__name__)

STATE = "train_state.pt"
STATE_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    """What resuming needs besides the weights."""

    step: int
    optimizer: dict[str, Any]
    rng: dict[str, Any]
    scaler: dict[str, Any] = field(default_factory=dict)  # fp16 gradient scaler, when used


def write_config(run_dir: Path, spec: ModelSpec) -> None:
    atomic_write_text(run_dir / CONFIG, spec.to_json() + "\n")


def read_spec(run_dir: Path) -> ModelSpec:
    """The config of a run directory (ConfigError when missing or unreadable)."""
    if run_dir.is_symlink() and not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a symlink to {os.readlink(run_dir)}, not a run directory")
    if not run_dir.exists():
        raise CheckpointError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise CheckpointError(f"{run_dir} is a file, not a run directory")
    return ModelSpec.load(run_dir / CONFIG)


def step_dirs(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoint folders, oldest first."""
    root = run_dir / RUN_CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted((s, p) for s, p in found if (p / WEIGHTS).is_file() and (p / STATE).is_file())


def save_checkpoint(run_dir: Path, model: nn.Module, ema: nn.Module, state: TrainState, keep: int) -> Path:
    """Write checkpoint ``step-N`` atomically, point the top-level files at it, prune to ``keep``."""
    root = run_dir / RUN_CHECKPOINTS
    root.mkdir(exist_ok=True)
    final = root / f"step-{state.step:07d}"
    tmp = root / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_checkpoint(tmp, model, ema, state)
    except BaseException as exc:  # disk full, Ctrl-C: the half-written folder must not hold the space
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):
            raise
        done = step_dirs(run_dir)
        why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        then = (f"the last complete one, {done[-1][1].name}, is intact: free space and continue with --resume "
                f"--out {run_dir}") if done else "no checkpoint was complete yet: free space and run it again"
        raise CheckpointError(f"cannot write checkpoint {final.name} in {root} ({why}); {then}") from exc
    if final.exists():  # re-saving a step (an interrupted run's last step): replace it whole
        _remove_dir(final)
    os.replace(tmp, final)
    fsync_dir(root)
    for name in (WEIGHTS, STATE):
        _link_latest(final / name, run_dir / name)
    for _, old in step_dirs(run_dir)[:-keep]:
        _remove_dir(old)
    return final


def _write_checkpoint(folder: Path, model: nn.Module, ema: nn.Module, state: TrainState) -> None:
    tensors = {f"ema.{k}": v for k, v in ema.state_dict().items()}
    tensors.update({f"raw.{k}": v for k, v in model.state_dict().items()})
    meta = {"format": "ddim-deploy", "step": str(state.step), "toolkit_version": __version__}
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, folder / WEIGHTS, metadata=meta)
    torch.save({"format": STATE_FORMAT, "step": state.step, "optimizer": state.optimizer, "rng": state.rng,
                "scaler": state.scaler}, folder / STATE)
    for name in (WEIGHTS, STATE):
        with open(folder / name, "rb") as fh:
            os.fsync(fh.fileno())


def _remove_dir(folder: Path) -> None:
    """Remove a checkpoint folder so that a crash midway never leaves a partial ``step-N``: rename it
    to a hidden name first (one atomic step), then delete; :func:`recover_run_dir` finishes the job."""
    doomed = folder.with_name(f".prune-{folder.name}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(folder, doomed)
    fsync_dir(folder.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def recover_run_dir(run_dir: Path) -> list[str]:
    """Finish or undo what a killed process left in ``run_dir`` (call with the run's lock held).

    Removes half-written (``.tmp-step-N``) and half-pruned (``.prune-step-N``) checkpoint folders,
    incomplete ``step-N`` folders of older versions, and temporary files of atomic writes; points
    the top-level weights and state at the latest complete checkpoint again when a crash came
    between the two links. Returns what it did, one phrase each, for the log.
    """
    done: list[str] = []
    root = run_dir / RUN_CHECKPOINTS
    complete = {p for _, p in step_dirs(run_dir)}
    if root.is_dir():
        for p in sorted(root.iterdir()):
            stale = p.name.startswith((".tmp-", ".prune-")) or (_STEP_DIR.match(p.name) and p not in complete)
            if stale and p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed the unfinished checkpoint folder {p.name}")
    for p in sorted(run_dir.glob(".*.tmp")):
        if p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            done.append(f"removed the temporary file {p.name}")
    latest = step_dirs(run_dir)
    if latest:
        for name in (WEIGHTS, STATE):
            src, dest = latest[-1][1] / name, run_dir / name
            if not _same_file(src, dest):
                _link_latest(src, dest)
                done.append(f"pointed {name} at {latest[-1][1].name} again")
    return done


def set_aside(ckpt_dir: Path) -> Path:
    """Rename an unusable checkpoint folder to ``corrupt-step-N`` (kept for the user, ignored by
    every reader) and return the new path."""
    aside = ckpt_dir.with_name(f"corrupt-{ckpt_dir.name}")
    n = 1
    while aside.exists():
        aside, n = ckpt_dir.with_name(f"corrupt-{ckpt_dir.name}-{n}"), n + 1
    os.replace(ckpt_dir, aside)
    fsync_dir(ckpt_dir.parent)
    return aside


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``b`` is ``a`` (a hard link) or a copy of it with the same bytes."""
    if not b.is_file():
        return False
    if os.path.samefile(a, b):
        return True
    return a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def _link_latest(src: Path, dest: Path) -> None:
    """Atomically make ``dest`` the same file as ``src`` (hard link; copy where links fail)."""
    with atomic_path(dest) as tmp:
        tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)


def weights_bound(*models: nn.Module) -> int:
    """The most bytes a safetensors file of these models' weights can take: their tensors plus the header."""
    values = sum(t.numel() * t.element_size() for m in models for t in m.state_dict().values())
    return values + FILE_OVERHEAD


def load_weights(path: Path, most_bytes: int | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (never a pickle); CheckpointError when missing or corrupt, or (before a byte
    is read) larger than ``most_bytes`` (:func:`weights_bound` of the models it is for)."""
    if not path.is_file():
        raise CheckpointError(f"no weights at {path}")
    try:
        if most_bytes is not None:
            check_file_size(path, most_bytes, "weights file", "the config's model holds")
        return load_file(path)
    except SizeLimitError as exc:
        raise CheckpointError(str(exc)) from None
    except OSError as exc:  # unreadable (permissions, I/O): the file may well be fine
        raise CheckpointError(f"cannot read weights file {path}: {exc.strerror or exc}") from exc
    except (SafetensorError, ValueError) as exc:
        raise CheckpointError(f"corrupt weights file {path}: {exc}") from None


def load_state_dicts(model: nn.Module, tensors: dict[str, torch.Tensor], prefix: str, source: Path) -> None:
    """Load ``prefix.*`` tensors into ``model``, strictly; mismatches named in one line."""
    sd = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    if not sd:
        raise CheckpointError(f"{source} holds no {prefix!r} weights")
    expected = model.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [k for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]
    # No silent casts: int64 or float16 tensors where the model has float32 ones are not its weights.
    dtypes = [f"{k} ({str(sd[k].dtype).removeprefix('torch.')}, not {str(expected[k].dtype).removeprefix('torch.')})"
              for k in expected if k in sd and k not in shapes and sd[k].dtype != expected[k].dtype]
    if missing or unexpected or shapes or dtypes:
        parts = [f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                 for label, names in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes),
                                      ("wrong dtype", dtypes))
                 if names]
        raise CheckpointError(f"weights in {source} do not match the config's architecture ({'; '.join(parts)})")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"weights in {source} hold NaN or infinite values ({', '.join(bad[:3])}"
                              f"{' ...' if len(bad) > 3 else ''}): a diverged or corrupt checkpoint")
    model.load_state_dict(sd)


def load_model(run_dir: Path, weights: str = "ema",
               limits: SizeLimits = SizeLimits()) -> tuple[nn.Module, ModelSpec]:
    """Rebuild the model a run directory describes, with its EMA (default) or raw weights, in eval mode."""
    if weights not in ("ema", "raw"):
        raise ValueError(f"unknown weights {weights!r}; allowed: ema, raw")
    spec = read_spec(run_dir)
    model = build_model(spec.model, limits)
    # The top-level file holds the EMA and the raw weights: two copies of the model.
    load_state_dicts(model, load_weights(run_dir / WEIGHTS, 2 * weights_bound(model)), weights, run_dir / WEIGHTS)
    return model.eval(), spec


def load_checkpoint(ckpt_dir: Path, model: nn.Module, ema: nn.Module) -> TrainState:
    """Restore weights into ``model`` / ``ema`` and return the training state of ``ckpt_dir``."""
    tensors = load_weights(ckpt_dir / WEIGHTS, weights_bound(model, ema))
    load_state_dicts(model, tensors, "raw", ckpt_dir / WEIGHTS)
    load_state_dicts(ema, tensors, "ema", ckpt_dir / WEIGHTS)
    try:
        blob = torch.load(ckpt_dir / STATE, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe pickles
        raise CheckpointError(f"corrupt training state {ckpt_dir / STATE}: {str(exc).splitlines()[0]}") from None
    if not isinstance(blob, dict) or blob.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{ckpt_dir / STATE} is not a training state of format {STATE_FORMAT}")
    return TrainState(step=int(blob["step"]), optimizer=blob["optimizer"], rng=blob["rng"],
                      scaler=blob.get("scaler") or {})


def load_run_config(run_dir: Path) -> RunConfig:
    """The run config stored in ``run_dir`` (for ``--resume``)."""
    if not (run_dir / CONFIG).is_file():
        raise RunDirError(f"nothing to resume: {run_dir / CONFIG} does not exist")
    return RunConfig.from_spec(read_spec(run_dir))


def with_train_overrides(cfg: RunConfig, overrides: Mapping[str | tuple[str, str], Any],
                         flag: Callable[[str, str], str] | None = None) -> RunConfig:
    """``cfg`` with some fields replaced, on resume: only the training fields that do not alter the
    trained weights' path may change (a value equal to the stored one is no change: ``--resume
    --batch-size 64`` of a batch-64 run is fine). Keys are ``(section, field)``, or a training field's
    name; ``flag(section, field)`` names the option in messages (default ``--field-name``).
    """
    flag = flag or (lambda section, field: "--" + field.replace("_", "-"))
    missing = object()
    wanted = {(k if isinstance(k, tuple) else ("train", k)): v for k, v in overrides.items()}
    changed = {k: v for k, v in wanted.items() if getattr(getattr(cfg, k[0], None), k[1], missing) != v}
    refused = sorted(k for k in changed if k[0] != "train" or k[1] not in RESUMABLE_FIELDS)
    if refused:
        allowed = ", ".join(flag("train", f) for f in sorted(RESUMABLE_FIELDS))
        raise RunDirError(f"cannot change {', '.join(flag(*k) for k in refused)} when resuming (the run was "
                          f"trained with other values); allowed: {allowed}")
    return cfg.with_overrides(changed)


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
                "pick another --out, or continue that run with --resume and no config options"
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
