"""The training loop: AdamW, EMA, periodic samples and checkpoints, exact resume."""

from __future__ import annotations

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
from tqdm import tqdm

from runtime.config import ModelSpec, NormalizationConfig
from runtime.images import save_grid
from runtime.schedule import Schedule, build_schedule
from trainer import diffusion
from trainer.checkpoint import TrainState, load_checkpoint, save_checkpoint, step_dirs, write_config
from trainer.config import RunConfig, TrainConfig
from trainer.data import compute_normalization, load_images
from trainer.ema import EMA
from trainer.errors import TrainingDivergedError
from trainer.logbook import LossLog
from trainer.models import build_model, count_parameters
from trainer.rundir import check_run_dir, create_run_dir

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


class Batches:
    """Deterministic mini-batches: epoch e is a permutation seeded by (seed, e), remainder dropped.

    The batch of step s depends only on (seed, s), so a resumed run sees the same data.
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int) -> None:
        if len(images) < batch_size:
            raise ValueError(f"the dataset has {len(images)} images, fewer than the batch size {batch_size}")
        self.images = torch.from_numpy(images)
        self.batch_size = batch_size
        self.seed = seed
        self.per_epoch = len(images) // batch_size
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __call__(self, step: int) -> torch.Tensor:
        epoch, offset = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        idx = self._perm[offset * self.batch_size : (offset + 1) * self.batch_size]
        return self.images[torch.from_numpy(idx)]


def to_model_space(batch: torch.Tensor, norm: NormalizationConfig, flip: bool, gen: torch.Generator,
                   device: torch.device) -> torch.Tensor:
    """uint8 (N, C, H, W) to normalised float32, with random horizontal flips when asked."""
    x = batch.to(device=device, dtype=torch.float32) / 255.0
    mean = torch.tensor(norm.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    if flip:
        mask = (torch.rand(x.shape[0], generator=gen) < 0.5).to(device).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return x


def optimizer_step(model: torch.nn.Module, ema: EMA, opt: torch.optim.Optimizer, x0: torch.Tensor,
                   schedule: Schedule, gen: torch.Generator, t: TrainConfig, lr: float, step: int) -> float:
    """One AdamW step on the diffusion loss of ``x0``, then the EMA update; returns the loss.

    A non-finite loss is returned without touching the weights, so the caller can stop cleanly.
    """
    for group in opt.param_groups:
        group["lr"] = lr
    model.train()
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=t.precision == "bf16"):
        loss = diffusion.training_loss(model, x0, schedule, gen, t.loss)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if t.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
    opt.step()
    ema.update(model, step)
    return value


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
        device: str = "cpu", progress: bool = True) -> FitResult:
    """Train ``cfg`` into ``run_dir`` (resuming its latest checkpoint when asked)."""
    stored = check_run_dir(cfg, run_dir, resume)
    images = load_images(cfg.data, cfg.model, data_path, cfg.preset, progress)
    create_run_dir(run_dir)
    with log_to_file(run_dir / "train.log"):
        return _fit(cfg, run_dir, images, stored, resume, torch.device(device), progress)


@contextmanager
def log_to_file(path: Path) -> Iterator[None]:
    """Copy the trainer's log lines into the run directory while a run lasts."""
    handler = logging.FileHandler(path, encoding="utf-8")
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
         dev: torch.device, progress: bool) -> FitResult:
    norm = stored.normalization if stored else compute_normalization(images, cfg.data.normalization)
    spec = cfg.to_spec(norm)
    write_config(run_dir, spec)  # on resume: records a changed length or cadence
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(dev)
    ema = EMA(model, cfg.train.ema_decay, cfg.train.ema_warmup)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    gen = torch.Generator().manual_seed(cfg.train.seed)
    start = _restore(run_dir, model, ema, opt, gen) if resume else 0
    batches = Batches(images, cfg.train.batch_size, cfg.train.seed)
    total = total_steps(cfg, batches)
    log.info("%s: %d images, %s parameters, steps %d -> %d on %s", cfg.preset, len(images),
             f"{count_parameters(model):,}", start, total, dev)
    loop = _Loop(cfg, spec, run_dir, model, ema, opt, gen, batches, dev, progress)
    return loop.run(start, total)


def _restore(run_dir: Path, model: torch.nn.Module, ema: EMA, opt: torch.optim.Optimizer,
             gen: torch.Generator) -> int:
    ckpts = step_dirs(run_dir)
    if not ckpts:
        log.info("no checkpoint in %s yet: starting from step 0", run_dir)
        return 0
    state = load_checkpoint(ckpts[-1][1], model, ema.model)
    opt.load_state_dict(state.optimizer)
    torch.set_rng_state(state.rng["torch"])
    gen.set_state(state.rng["generator"])
    log.info("resuming %s from step %d", run_dir, state.step)
    return state.step


class _Loop:
    """One training run's moving parts, so each phase reads as a short method."""

    def __init__(self, cfg: RunConfig, spec: ModelSpec, run_dir: Path, model: torch.nn.Module, ema: EMA,
                 opt: torch.optim.Optimizer, gen: torch.Generator, batches: Batches, dev: torch.device,
                 progress: bool) -> None:
        self.cfg, self.spec, self.run_dir = cfg, spec, run_dir
        self.model, self.ema, self.opt, self.gen = model, ema, opt, gen
        self.batches, self.dev, self.progress = batches, dev, progress
        self.schedule = build_schedule(cfg.schedule)
        self.losses = LossLog(run_dir, cfg.train.log_every)
        self.samples: list[Path] = []

    def run(self, start: int, total: int) -> FitResult:
        t = self.cfg.train
        self.losses.truncate_after(start)
        step, saved, seen, t0 = start, start, 0, time.perf_counter()
        interrupted = False
        with stop_requests() as stop, tqdm(total=total, initial=start, desc="training", unit="step",
                                           disable=not self.progress, dynamic_ncols=True) as bar:
            while step < total:
                if stop[0]:
                    interrupted = True
                    break
                loss = self.train_step(step)
                step += 1
                seen += t.batch_size
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                self.losses.add(step, loss, rate, self.lr_at(step - 1))
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:.1f}")
                if step % t.checkpoint_every == 0 or step == total:
                    self.checkpoint(step)
                    saved = step
                if step % t.sample_every == 0 or step == total:
                    self.sample(step)
        if step != saved:
            self.checkpoint(step)
        self.losses.plot()
        rate = seen / max(time.perf_counter() - t0, 1e-9)
        return FitResult(self.run_dir, step, total, rate, interrupted, self.samples)

    def lr_at(self, step: int) -> float:
        warm = self.cfg.train.warmup_steps
        return self.cfg.train.lr * (min(1.0, (step + 1) / warm) if warm else 1.0)

    def train_step(self, step: int) -> float:
        x0 = to_model_space(self.batches(step), self.spec.normalization, self.cfg.data.random_flip, self.gen, self.dev)
        value = optimizer_step(self.model, self.ema, self.opt, x0, self.schedule, self.gen, self.cfg.train,
                               self.lr_at(step), step)
        if not math.isfinite(value):
            ckpts = step_dirs(self.run_dir)
            last = f"step {ckpts[-1][0]} in {ckpts[-1][1]}" if ckpts else "none written yet"
            raise TrainingDivergedError(
                f"loss is {value} at step {step + 1}; training stopped, last good checkpoint: {last} "
                "(try a lower --lr or --grad-clip)"
            )
        return value

    def checkpoint(self, step: int) -> None:
        rng = {"torch": torch.get_rng_state(), "generator": self.gen.get_state()}
        state = TrainState(step=step, optimizer=self.opt.state_dict(), rng=rng)
        save_checkpoint(self.run_dir, self.model, self.ema.model, state, self.cfg.train.keep_checkpoints)
        self.losses.flush()

    def sample(self, step: int) -> None:
        t = self.cfg.train
        images = diffusion.sample_images(self.ema.model, self.spec, t.num_samples, t.sample_steps, seed=t.seed,
                                         device=self.dev)
        scale = max(1, 512 // (self.cfg.model.image_size * math.ceil(math.sqrt(t.num_samples))))
        (self.run_dir / "samples").mkdir(exist_ok=True)
        path = save_grid(self.run_dir / "samples" / f"step-{step:07d}.png", images, scale=scale)
        save_grid(self.run_dir / "samples.png", images, scale=scale)
        self.samples.append(path)
        log.info("step %d: samples in %s", step, path)
