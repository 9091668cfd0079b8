"""The training loop: AdamW, EMA, periodic samples and checkpoints, exact resume, torchrun."""

from __future__ import annotations

import contextlib
import logging
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from runtime.common.progress import progress_bar
from runtime.config import ModelSpec
from runtime.images import grid_scale, save_grid
from runtime.schedule import build_schedule
from runtime.settings import SamplingSettings
from trainer import diffusion
from trainer.batches import Batches, to_model_space
from runtime.common.files import LockHeld, PathLock
from runtime.common.limits import SizeLimits
from trainer.rundir import (CONFIG, TrainState, check_run_dir, create_run_dir, load_checkpoint, recover_run_dir,
                            save_checkpoint, set_aside, step_dirs, write_config)
from trainer.config import RunConfig
from trainer.data import compute_normalization, load_images
from trainer.distributed import DistInfo, barrier, gather, wrap
from trainer.errors import CheckpointError, RunDirError, TrainingDivergedError
from trainer.logbook import LossLog
from trainer.models import build_model, check_size, count_parameters
from trainer.step import Trainee, optimizer_step

log = logging.getLogger(__name__)


@dataclass
class FitResult:
    """Where a run ended and how fast it went."""

    run_dir: Path
    step: int
    total_steps: int
    images_per_second: float
    interrupted: bool = False
    samples: list[Path] = field(default_factory=list)
    model: torch.nn.Module | None = None  # the trained (raw) weights, for use from Python


def total_steps(cfg: RunConfig, batches: Batches) -> int:
    t = cfg.train
    if t.steps is not None:
        return t.steps
    assert t.epochs is not None  # noqa: S101 (TrainConfig guarantees one of the two)
    return t.epochs * t.dataset_repetitions * batches.per_epoch


@contextmanager
def stop_requests() -> Iterator[list[bool]]:
    """First Ctrl-C / SIGTERM asks the loop to checkpoint and stop; a second one aborts at once."""
    flag = [False]
    previous = {}

    def handler(signum: int, frame: object) -> None:
        if flag[0]:
            raise KeyboardInterrupt
        flag[0] = True
        log.warning("stopping after this step (press Ctrl-C again to abort without a checkpoint)")

    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def fit(cfg: RunConfig, run_dir: Path, data_path: Path | None = None, resume: bool = False,
        device: str = "cpu", progress: bool = True, dist: DistInfo = DistInfo(),
        limits: SizeLimits = SizeLimits()) -> FitResult:
    """Train ``cfg`` into ``run_dir`` (resuming its latest checkpoint when asked).

    Under torchrun every rank calls this with its :class:`DistInfo`; rank 0 alone writes files and
    holds the run directory's lock (a second ``fit`` on the same directory fails at once). A new
    run that fails before its first checkpoint leaves nothing behind, so the same ``--out`` works
    next time.
    """
    check_size(cfg.model, limits, cfg.train.batch_size)  # before any data or weights are allocated
    with run_lock(run_dir) if dist.is_main else contextlib.nullcontext():
        stored = check_run_dir(cfg, run_dir, resume)
        if dist.is_main and resume:  # a run of ours (its config checked): finish what a kill left
            for line in recover_run_dir(run_dir):
                log.info("%s: %s (left by an interrupted run)", run_dir, line)
        created = not run_dir.exists()
        try:
            images = load_images(cfg.data, cfg.model, data_path, cfg.preset, progress and dist.is_main)
            if dist.is_main:
                create_run_dir(run_dir)
            barrier(dist)
            logging_to_file = log_to_file(run_dir / "train.log") if dist.is_main else contextlib.nullcontext()
            with logging_to_file:
                return _fit(cfg, run_dir, images, stored, resume, torch.device(device), progress and dist.is_main,
                            dist)
        except BaseException:
            if dist.is_main and not resume and not step_dirs(run_dir):
                undo_start(run_dir, created)
            raise


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """The run directory's OS lock (see :class:`runtime.common.files.PathLock`), as a RunDirError when taken."""
    try:
        lock = PathLock(run_dir, "run directory").__enter__()
    except LockHeld as exc:
        raise RunDirError(str(exc)) from None
    except OSError as exc:
        ancestor = next((p for p in run_dir.absolute().parents if p.exists()), None)
        why = f"{ancestor} is not a folder" if ancestor is not None and not ancestor.is_dir() else exc.strerror
        raise RunDirError(f"cannot create run directory {run_dir}: {why or exc}") from None
    try:
        yield
    finally:
        lock.__exit__()


def undo_start(run_dir: Path, created: bool) -> None:
    """Remove what a new run wrote before failing ahead of its first checkpoint (its own files only)."""
    for name in (CONFIG, "train.log", "loss.csv", "loss.png", "samples.png"):
        (run_dir / name).unlink(missing_ok=True)
    for sub in ("samples", "checkpoints"):
        folder = run_dir / sub
        if folder.is_dir() and not folder.is_symlink():
            for p in folder.iterdir():
                if p.is_file() and (p.name.startswith(("step-", ".step-")) or p.suffix == ".tmp"):
                    p.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
    if created:
        with contextlib.suppress(OSError):
            run_dir.rmdir()


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy the trainer's log lines into the run directory while a run lasts."""
    # A path that is not UTF-8 (bytes a terminal or file system allowed) is written escaped, as stderr writes it.
    handler = logging.FileHandler(path, encoding="utf-8", errors="backslashreplace")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("trainer")
    level = logger.level
    logger.setLevel(min(level or logging.INFO, logging.INFO))
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        handler.close()


def _fit(cfg: RunConfig, run_dir: Path, images: np.ndarray, stored: ModelSpec | None, resume: bool,
         dev: torch.device, progress: bool, dist: DistInfo) -> FitResult:
    t = cfg.train
    norm = stored.normalization if stored else compute_normalization(images, cfg.data.normalization)
    spec = cfg.to_spec(norm)
    if dist.is_main:
        write_config(run_dir, spec)  # on resume: records a changed length or cadence
    torch.manual_seed(t.seed)  # the same initial weights on every rank
    model = build_model(cfg.model, limits=None).to(dev)  # checked by fit
    net = wrap(model, dist, dev)
    if dist.rank > 0:  # dropout masks differ between ranks, as they would across one big batch
        torch.manual_seed(t.seed + dist.rank)
    trainee = Trainee.create(model, net, build_schedule(cfg.schedule), t, dist)
    start = _restore(run_dir, trainee) if resume else 0
    batches = Batches(images, t.batch_size, t.seed, dist)
    total = total_steps(cfg, batches)
    procs = f" x {dist.world} processes" if dist.enabled else ""
    log.info("%s: %d images, %s parameters, steps %d -> %d on %s%s", cfg.preset, len(images),
             f"{count_parameters(model):,}", start, total, dev, procs)
    return _Loop(cfg, spec, run_dir, trainee, batches, dev, progress).run(start, total)


def _restore(run_dir: Path, t: Trainee) -> int:
    ckpts = step_dirs(run_dir)
    if not ckpts:
        if list((run_dir / "checkpoints").glob("corrupt-step-*")):  # never silently restart from scratch
            raise CheckpointError(f"every checkpoint in {run_dir / 'checkpoints'} was unusable (kept as "
                                  "corrupt-step-N); nothing to resume from")
        log.info("no checkpoint in %s yet: starting from step 0", run_dir)
        return 0
    state, unusable = None, []
    # Newest first. Every rank reads the same files and takes the same decision; rank 0 sets the
    # unusable ones aside (kept, never deleted) once all ranks are done reading.
    for _, path in reversed(ckpts):
        try:
            state = load_checkpoint(path, t.model, t.ema.model)
            break
        except CheckpointError as exc:
            if isinstance(exc.__cause__, OSError):  # unreadable now (permissions, I/O): not corrupt
                raise
            unusable.append(path)
            log.warning("checkpoint %s is unusable (%s)%s", path.name, exc,
                        "; resuming from the one before" if path != ckpts[0][1] else "")
    barrier(t.dist)
    if t.dist.is_main:
        for path in unusable:
            log.warning("kept the unusable checkpoint as %s", set_aside(path).name)
    if state is None:
        raise CheckpointError(f"no usable checkpoint in {run_dir / 'checkpoints'} (the unusable ones were kept "
                              "as corrupt-step-N)")
    if t.dist.is_main:
        recover_run_dir(run_dir)  # the top-level files follow the checkpoint actually used
    t.opt.load_state_dict(state.optimizer)
    per_rank = state.rng["torch"]
    if t.dist.rank < len(per_rank):  # else a different process count: keep this rank's fresh seed
        torch.set_rng_state(per_rank[t.dist.rank])
    t.gen.set_state(state.rng["generator"])
    if t.scaler is not None and state.scaler:
        t.scaler.load_state_dict(state.scaler)
    log.info("resuming %s from step %d", run_dir, state.step)
    return state.step


class _Loop:
    """One training run's moving parts, so each phase reads as a short method."""

    def __init__(self, cfg: RunConfig, spec: ModelSpec, run_dir: Path, trainee: Trainee, batches: Batches,
                 dev: torch.device, progress: bool) -> None:
        self.cfg, self.spec, self.run_dir, self.t = cfg, spec, run_dir, trainee
        self.batches, self.dev, self.progress = batches, dev, progress
        self.main = trainee.dist.is_main
        self.losses = LossLog(run_dir, cfg.train.log_every)
        self.samples: list[Path] = []

    def run(self, start: int, total: int) -> FitResult:
        t = self.cfg.train
        self.losses.truncate_after(start)
        step, saved, seen, t0 = start, start, 0, time.perf_counter()
        interrupted = False
        with stop_requests() as stop, progress_bar(total=total, initial=start, desc="training", unit="step",
                                                   disable=not self.progress, dynamic_ncols=True) as bar:
            while step < total and not interrupted:
                loss, interrupted = self.train_step(step, stop[0])
                step += 1
                seen += t.batch_size
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                self.losses.add(step, loss, rate, self.lr_at(step - 1))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}", refresh=False)
                if step % t.checkpoint_every == 0 or step == total:
                    self.checkpoint(step)
                    saved = step
                if (step % t.sample_every == 0 or step == total) and self.main:
                    self.sample(step)
        if step != saved:
            self.checkpoint(step)
        if self.main:
            self.losses.plot()
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        return FitResult(self.run_dir, step, total, rate, interrupted, self.samples, self.t.model)

    def lr_at(self, step: int) -> float:
        warm = self.cfg.train.warmup_steps
        return self.cfg.train.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)

    def train_step(self, step: int, stop: bool) -> tuple[float, bool]:
        dist = self.t.dist
        x0 = to_model_space(self.batches(step), self.spec.normalization, self.cfg.data.random_flip, self.t.gen,
                            self.dev, dist)
        value, any_stop = optimizer_step(self.t, x0, self.lr_at(step), step, stop)
        if not math.isfinite(value):
            ckpts = step_dirs(self.run_dir)
            last = f"step {ckpts[-1][0]} in {ckpts[-1][1]}" if ckpts else "none written yet"
            raise TrainingDivergedError(
                f"loss is {value} at step {step + 1}; training stopped, last good checkpoint: {last} "
                "(try a lower --lr or --grad-clip)"
            )
        return value, any_stop

    def checkpoint(self, step: int) -> None:
        per_rank = gather(torch.get_rng_state(), self.t.dist)  # a collective: every rank takes part
        if self.main:
            rng = {"torch": per_rank, "generator": self.t.gen.get_state()}
            scaler = self.t.scaler.state_dict() if self.t.scaler is not None else {}
            state = TrainState(step=step, optimizer=self.t.opt.state_dict(), rng=rng, scaler=scaler)
            save_checkpoint(self.run_dir, self.t.model, self.t.ema.model, state, self.cfg.train.keep_checkpoints)
            self.losses.flush()
        barrier(self.t.dist)

    def sample(self, step: int) -> None:
        t = self.cfg.train
        images = diffusion.sample_images(self.t.ema.model, self.spec, t.num_samples,
                                         SamplingSettings(steps=t.sample_steps), seed=t.seed, device=self.dev)
        scale = grid_scale(self.cfg.model.image_size, t.num_samples)
        (self.run_dir / "samples").mkdir(exist_ok=True)
        path = save_grid(self.run_dir / "samples" / f"step-{step:07d}.png", images, scale=scale)
        save_grid(self.run_dir / "samples.png", images, scale=scale)
        self.samples.append(path)
        log.info("step %d: samples in %s", step, path)
