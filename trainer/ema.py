"""Exponential moving average of a model's weights (and BatchNorm statistics, as Keras does)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimiser step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], 1.0 - self.decay)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            if ema_buf.is_floating_point():
                ema_buf.lerp_(buf, 1.0 - self.decay)
            else:  # counters such as num_batches_tracked
                ema_buf.copy_(buf)
