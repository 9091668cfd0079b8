"""Exponential moving average of a model's weights (and BatchNorm statistics, as Keras does)."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """``ema = decay * ema + (1 - decay) * weights`` after every optimiser step.

    With ``warmup`` the decay after n updates is ``min(decay, (1 + n) / (10 + n))``, as in
    TensorFlow's ExponentialMovingAverage with ``num_updates``: early samples then come from
    trained weights rather than from the initialisation (at decay 0.999 a plain EMA still holds
    82% of the initial weights after 200 steps).
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def decay_at(self, num_updates: int) -> float:
        return min(self.decay, (1 + num_updates) / (10 + num_updates)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int) -> None:
        """Blend ``model`` in; ``num_updates`` counts the updates before this one."""
        rate = 1.0 - self.decay_at(num_updates)
        ema_params = list(self.model.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in model.parameters()], rate)
        for ema_buf, buf in zip(self.model.buffers(), model.buffers()):
            if ema_buf.is_floating_point():
                ema_buf.lerp_(buf, rate)
            else:  # counters such as num_batches_tracked
                ema_buf.copy_(buf)
