"""Build a denoiser from its config; count its parameters and FLOPs."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from runtime.config import DDPMUNetConfig, KerasUNetConfig, ModelConfig
from runtime.common.limits import SizeLimitError, SizeLimits, check_structure
from trainer.memory import activation_bytes
from trainer.unet_ddpm import DDPMUNet
from trainer.unet_keras import KerasUNet


def build_model(cfg: ModelConfig, limits: SizeLimits | None = SizeLimits()) -> nn.Module:
    """The network a model config describes (architectures registered by name), after checking its
    size against ``limits`` (None: unchecked, for callers that checked already)."""
    if limits is not None:
        check_size(cfg, limits)
    return _build(cfg)


def _build(cfg: ModelConfig) -> nn.Module:
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
    v = torch.full((batch,), 500.0) if cfg.conditioning == "timestep" else torch.full((batch, 1, 1, 1), 0.5)
    was_training = model.training
    model.eval()
    try:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(x, v)
    finally:
        model.train(was_training)
    return counter.get_total_flops() / 1e9


def count_parameters_of(cfg: ModelConfig) -> int:
    """Parameters of the model ``cfg`` describes, built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = _build(cfg)
    return sum(p.numel() for p in model.parameters())


def check_size(cfg: ModelConfig, limits: SizeLimits = SizeLimits(), batch: int = 0) -> tuple[int, int]:
    """Refuse a model (and a training batch of ``batch`` images) beyond ``limits``; returns the
    parameter count and the estimated activation bytes per image (:func:`trainer.memory.activation_bytes`)."""
    check_structure(cfg, limits)
    params, per_image = count_parameters_of(cfg), activation_bytes(cfg)
    if params > limits.parameters:
        raise SizeLimitError(f"the model would have {params:,} parameters, more than the limit "
                             f"{limits.parameters:,} (raise it with --max-parameters)")
    need = (per_image * batch + params * 16) / 2**30  # activations + weights, gradients, AdamW's two moments
    if batch and need > limits.memory_gib:
        raise SizeLimitError(f"training batches of {batch} would need about {need:.1f} GiB (activations, weights "
                             f"and optimiser state), more than the limit {limits.memory_gib:g} GiB (lower "
                             "--batch-size, or raise the limit with --max-memory-gib)")
    return params, per_image
