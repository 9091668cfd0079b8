"""One optimisation step: the trained model, its EMA, optimiser and random generator together."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from runtime.schedule import Schedule
from trainer import diffusion
from trainer.config import TrainConfig
from trainer.distributed import DistInfo, mean_across
from trainer.ema import EMA


@dataclass
class Trainee:
    """Everything one optimiser step reads or changes."""

    model: nn.Module  # the plain module: EMA, checkpoints and gradient clipping see this one
    net: nn.Module  # what forward/backward run through (DDP around ``model`` under torchrun)
    ema: EMA
    opt: torch.optim.Optimizer
    gen: torch.Generator  # training randomness (steps, noise, flips): in step on every rank
    schedule: Schedule
    train: TrainConfig
    dist: DistInfo = DistInfo()
    scaler: torch.amp.GradScaler | None = None  # fp16 only: scales the loss against underflow

    @classmethod
    def create(cls, model: nn.Module, net: nn.Module, schedule: Schedule, train: TrainConfig,
               dist: DistInfo = DistInfo()) -> "Trainee":
        """AdamW, EMA, the seeded generator and (for fp16) a gradient scaler around ``model``."""
        device = next(model.parameters()).device
        if train.precision == "fp16" and device.type != "cuda":
            raise ValueError("fp16 training needs a CUDA device (use --precision bf16 on CPU)")
        return cls(
            model=model, net=net, ema=EMA(model, train.ema_decay, train.ema_warmup),
            opt=torch.optim.AdamW(model.parameters(), lr=train.lr, weight_decay=train.weight_decay),
            gen=torch.Generator().manual_seed(train.seed), schedule=schedule, train=train, dist=dist,
            scaler=torch.amp.GradScaler("cuda") if train.precision == "fp16" else None,
        )


def conditioning_of(model: nn.Module) -> str:
    """What ``model`` is conditioned on (its config says; a bare test module means noise variance)."""
    return getattr(getattr(model, "config", None), "conditioning", "noise_variance")


def optimizer_step(t: Trainee, x0: torch.Tensor, lr: float, step: int, stop: bool = False) -> tuple[float, bool]:
    """One AdamW step on the diffusion loss of ``x0`` (this rank's slice), then the EMA update.

    Returns the loss averaged over ranks and whether any rank asked to stop. A non-finite loss is
    returned without touching the weights, on every rank alike, so the caller can stop cleanly.
    """
    for group in t.opt.param_groups:
        group["lr"] = lr
    t.net.train()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(t.train.precision)
    with torch.autocast(x0.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = diffusion.training_loss(t.net, x0, t.schedule, t.gen, t.train.loss,
                                       part=t.dist.shard(x0.shape[0] * t.dist.world), world=t.dist.world,
                                       conditioning=conditioning_of(t.model))
    shared = mean_across(torch.stack([loss.detach().float(), torch.tensor(float(stop), device=loss.device)]), t.dist)
    value, any_stop = float(shared[0]), bool(shared[1] > 0)
    if not math.isfinite(value):
        return value, any_stop
    t.opt.zero_grad(set_to_none=True)
    if t.scaler is None:
        loss.backward()
    else:
        t.scaler.scale(loss).backward()
        t.scaler.unscale_(t.opt)  # clip the true gradients
    if t.train.grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.train.grad_clip)
    if t.scaler is None:
        t.opt.step()
    else:
        t.scaler.step(t.opt)  # skipped when the scaled gradients overflowed
        t.scaler.update()
    t.ema.update(t.model, step)
    return value, any_stop
