"""Build a denoiser from its config; count its parameters and FLOPs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from runtime.config import DDPMUNetConfig, KerasUNetConfig, ModelConfig
from trainer.unet_ddpm import DDPMUNet
from trainer.unet_keras import KerasUNet


def build_model(cfg: ModelConfig) -> nn.Module:
    """The network a model config describes (architectures registered by name)."""
    if isinstance(cfg, KerasUNetConfig):
        return KerasUNet(cfg)
    if isinstance(cfg, DDPMUNetConfig):
        return DDPMUNet(cfg)
    raise ValueError(f"unknown architecture {getattr(cfg, 'architecture', cfg)!r}")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def forward_gflops(model: nn.Module, cfg: ModelConfig, batch: int = 1) -> float:
    """GFLOPs of one forward pass (convolutions and matmuls, 2 FLOPs per multiply-add).

    Counted with ``torch.utils.flop_counter``; normalisation, activations and resampling are not
    counted (they are a few percent of the total and bandwidth-bound anyway).
    """
    x = torch.zeros(batch, cfg.channels, cfg.image_size, cfg.image_size)
    v = torch.full((batch, 1, 1, 1), 0.5)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, v)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9
