"""The Keras DDIM example's U-Net, in PyTorch.

Inputs ``noisy_images`` (N, C, H, W) and ``noise_variances`` (N, 1, 1, 1) (or ``timesteps`` (N,) for a
timestep-conditioned config); output the predicted noise (N, C, H, W). Residual blocks with BatchNorm
without affine parameters, swish, average-pool down, bilinear up, skip concatenation, no attention; the
final 1x1 conv starts at zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import DDPMUNetConfig, KerasUNetConfig

# Keras BatchNormalization defaults: momentum 0.99 (PyTorch counts 1 - momentum), epsilon 1e-3.
KERAS_BN_MOMENTUM = 0.01
KERAS_BN_EPS = 1e-3


class SinusoidalEmbedding(nn.Module):
    """sin / cos of ``2 pi f v`` for frequencies f log-spaced from min to max (Keras example).

    Always computed in float32: angles reach 2 pi * 1000 * variance, beyond float16's precision.
    """

    def __init__(self, dims: int, min_frequency: float, max_frequency: float) -> None:
        super().__init__()
        # On the CPU even inside a meta-device build (trainer.models.count_parameters_of): these are plain numbers.
        freqs = torch.exp(torch.linspace(math.log(min_frequency), math.log(max_frequency), dims // 2, device="cpu"))
        # A plain list, not a buffer: model.half() must not round these speeds (up to 2 pi 1000).
        self.angular_speeds = (2.0 * math.pi * freqs).tolist()
        # The speeds as a float32 tensor per device, made on first use outside any CUDA-graph capture:
        # a host-to-device copy inside a capture raises. Not a buffer, so .half() and .to() leave it alone.
        self._speeds: dict[torch.device, torch.Tensor] = {}

    def speeds(self, device: torch.device) -> torch.Tensor:  # (1, dims / 2, 1, 1) float32
        cached = self._speeds.get(device)
        if cached is None:
            cached = torch.tensor(self.angular_speeds, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self._speeds[device] = cached
        return cached

    def forward(self, noise_variances: torch.Tensor) -> torch.Tensor:  # (N, 1, 1, 1) -> (N, dims, 1, 1)
        angles = self.speeds(noise_variances.device) * noise_variances.float()
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class TimestepEmbedding(nn.Module):
    """diffusers' ``get_timestep_embedding(t, dims, flip_sin_to_cos=True, downscale_freq_shift=0)``: cos / sin
    of ``t * 10000^(-k / (dims / 2))``, the embedding of UNet2DModel's defaults, so a DDPM-style U-Net
    conditioned on timesteps maps onto UNet2DModel weight for weight.

    Float32 always (angles reach 999 radians); the frequencies are computed exactly as diffusers does.
    """

    MAX_PERIOD = 10_000.0

    def __init__(self, dims: int) -> None:
        super().__init__()
        half = dims // 2
        exponent = -math.log(self.MAX_PERIOD) * torch.arange(0, half, dtype=torch.float32, device="cpu") / half
        self.frequencies = torch.exp(exponent).tolist()  # a plain list, like SinusoidalEmbedding's speeds
        self._freqs: dict[torch.device, torch.Tensor] = {}

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, dims, 1, 1)
        freqs = self._freqs.get(timesteps.device)
        if freqs is None:
            freqs = self._freqs[timesteps.device] = torch.tensor(self.frequencies, dtype=torch.float32,
                                                                 device=timesteps.device)
        angles = timesteps.reshape(-1, 1).float() * freqs[None, :]
        return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)[:, :, None, None]


def conditioning_embedding(cfg: KerasUNetConfig | DDPMUNetConfig, dims: int) -> nn.Module:
    """The sinusoidal embedding of what ``cfg`` conditions on: the noise variance or the timestep."""
    if cfg.conditioning == "timestep":
        return TimestepEmbedding(dims)
    return SinusoidalEmbedding(dims, cfg.embedding_min_frequency, cfg.embedding_max_frequency)


class ResidualBlock(nn.Module):
    """BN (no affine) -> 3x3 conv + swish -> 3x3 conv, plus the (1x1-projected) input."""

    def __init__(self, in_width: int, width: int) -> None:
        super().__init__()
        self.skip = nn.Identity() if in_width == width else nn.Conv2d(in_width, width, 1)
        self.norm = nn.BatchNorm2d(in_width, affine=False, momentum=KERAS_BN_MOMENTUM, eps=KERAS_BN_EPS)
        self.conv1 = nn.Conv2d(in_width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.skip(x)
        x = F.silu(self.conv1(self.norm(x)))
        return self.conv2(x) + residual


class DownBlock(nn.Module):
    """``block_depth`` residual blocks, each output kept as a skip, then 2x average pooling."""

    def __init__(self, in_width: int, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(ResidualBlock(in_width if i == 0 else width, width) for i in range(depth))

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
            skips.append(x)
        return F.avg_pool2d(x, 2)


class UpBlock(nn.Module):
    """2x bilinear upsampling, then ``block_depth`` residual blocks, each on [x, skip]."""

    def __init__(self, in_width: int, skip_width: int, width: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualBlock((in_width if i == 0 else width) + skip_width, width) for i in range(depth)
        )

    def forward(self, x: torch.Tensor, skips: list[torch.Tensor]) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        for block in self.blocks:
            x = block(torch.cat([x, skips.pop()], dim=1))
        return x


class KerasUNet(nn.Module):
    """The denoiser of the Keras DDIM example: predicts the noise in ``noisy_images``."""

    def __init__(self, cfg: KerasUNetConfig) -> None:
        super().__init__()
        self.config = cfg
        widths, depth = list(cfg.widths), cfg.block_depth
        self.embedding = conditioning_embedding(cfg, cfg.embedding_dims)
        self.conv_in = nn.Conv2d(cfg.channels, widths[0], 1)
        self.down = nn.ModuleList()
        in_width = widths[0] + cfg.embedding_dims
        for w in widths[:-1]:
            self.down.append(DownBlock(in_width, w, depth))
            in_width = w
        self.mid = nn.ModuleList(ResidualBlock(in_width if i == 0 else widths[-1], widths[-1]) for i in range(depth))
        in_width = widths[-1]
        self.up = nn.ModuleList()
        for w in reversed(widths[:-1]):
            self.up.append(UpBlock(in_width, w, w, depth))
            in_width = w
        self.conv_out = nn.Conv2d(in_width, cfg.channels, 1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(self, noisy_images: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``cond``: noise variances (N, 1, 1, 1), or timesteps (N,) for a timestep-conditioned config."""
        size = self.config.image_size  # static, so exported graphs keep every channel count known
        e = self.embedding(cond).to(noisy_images.dtype)  # (N, E, 1, 1)
        e = e.repeat(1, 1, size, size)  # nearest upsampling of a 1x1 map: (N, E, H, W)
        x = torch.cat([self.conv_in(noisy_images), e], dim=1)
        skips: list[torch.Tensor] = []
        for block in self.down:
            x = block(x, skips)
        for block in self.mid:
            x = block(x)
        for block in self.up:
            x = block(x, skips)
        return self.conv_out(x)
