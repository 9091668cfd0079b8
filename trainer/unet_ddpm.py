"""The DDPM-style U-Net (Ho et al. 2020; the DDIM paper's CIFAR-10 and CelebA models), in PyTorch.

Same inputs and output as the Keras U-Net: ``noisy_images`` (N, C, H, W) and ``noise_variances``
(N, 1, 1, 1) (or ``timesteps`` (N,)) in, predicted noise out. The conditioning goes through the float32
sinusoidal embedding and a two-layer MLP, and is added inside every residual block. With timestep
conditioning the layout is diffusers' UNet2DModel's, so ``ddim-export --diffusers`` maps it weight for
weight. GroupNorm statistics and the attention softmax are computed in float32 so that FP16 graphs stay
accurate.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from runtime.config import DDPMUNetConfig
from trainer.unet_keras import conditioning_embedding


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 whatever the input and parameter dtypes (as improved-diffusion does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def zero_module(module: nn.Module) -> nn.Module:
    """Start a residual branch's last layer at zero, so every block starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN -> SiLU -> conv3x3, + MLP(embedding), GN -> SiLU -> dropout -> conv3x3, + skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int) -> None:
        super().__init__()
        self.norm1 = GroupNorm32(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, out_ch)
        self.norm2 = GroupNorm32(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb(F.silu(emb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the H*W positions, residual, softmax in float32."""

    def __init__(self, ch: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.head_ch = ch // heads
        self.scale = 1.0 / math.sqrt(math.sqrt(self.head_ch))  # split between q and k for fp16 range
        self.norm = GroupNorm32(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero_module(nn.Conv2d(ch, ch, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        qkv = self.qkv(self.norm(x)).reshape(-1, 3 * self.head_ch, h * w)
        q, k, v = qkv.chunk(3, dim=1)  # each (N*heads, C/heads, HW)
        logits = torch.bmm((q * self.scale).transpose(1, 2), k * self.scale)  # (N*heads, HW, HW)
        weights = torch.softmax(logits.float(), dim=-1).to(x.dtype)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(x.shape)
        return x + self.proj(out)


class Downsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """The residual blocks (each optionally followed by attention) of one resolution level."""

    def __init__(self, blocks: list[ResBlock], attend: bool, heads: int, groups: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(
            AttentionBlock(b.conv1.out_channels, heads, groups) if attend else nn.Identity() for b in blocks
        )


class DDPMUNet(nn.Module):
    """The DDPM denoiser: predicts the noise in ``noisy_images``."""

    def __init__(self, cfg: DDPMUNetConfig) -> None:
        super().__init__()
        self.config = cfg
        base, groups, heads, drop = cfg.base_width, cfg.num_groups, cfg.num_heads, cfg.dropout
        emb_dim = 4 * base
        self.embedding = conditioning_embedding(cfg, base)
        self.emb_mlp = nn.Sequential(nn.Linear(base, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(cfg.channels, base, 3, padding=1)
        widths = [base * m for m in cfg.channel_mults]
        levels = len(widths)
        skip_widths, ch, res = [base], base, cfg.image_size
        self.down, self.downsample = nn.ModuleList(), nn.ModuleList()
        for i, w in enumerate(widths):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResBlock(ch, w, emb_dim, drop, groups))
                ch = w
                skip_widths.append(ch)
            self.down.append(Level(blocks, res in cfg.attention_resolutions, heads, groups))
            last = i == levels - 1
            self.downsample.append(nn.Identity() if last else Downsample(ch))
            if not last:
                skip_widths.append(ch)
                res //= 2
        self.mid1 = ResBlock(ch, ch, emb_dim, drop, groups)
        self.mid_attn = AttentionBlock(ch, heads, groups)
        self.mid2 = ResBlock(ch, ch, emb_dim, drop, groups)
        self.up, self.upsample = nn.ModuleList(), nn.ModuleList()
        for i, w in reversed(list(enumerate(widths))):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResBlock(ch + skip_widths.pop(), w, emb_dim, drop, groups))
                ch = w
            self.up.append(Level(blocks, res in cfg.attention_resolutions, heads, groups))
            self.upsample.append(Upsample(ch) if i > 0 else nn.Identity())
            if i > 0:
                res *= 2
        self.norm_out = GroupNorm32(groups, ch)
        self.conv_out = zero_module(nn.Conv2d(ch, cfg.channels, 3, padding=1))

    def forward(self, noisy_images: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``cond``: noise variances (N, 1, 1, 1), or timesteps (N,) for a timestep-conditioned config."""
        emb = self.emb_mlp(self.embedding(cond).flatten(1).to(noisy_images.dtype))  # (N, 4 base)
        h = self.conv_in(noisy_images)
        skips = [h]
        for level, down in zip(self.down, self.downsample):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(h, emb))
                skips.append(h)
            if not isinstance(down, nn.Identity):
                h = down(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level, up in zip(self.up, self.upsample):
            for block, attn in zip(level.blocks, level.attn):
                h = attn(block(torch.cat([h, skips.pop()], dim=1), emb))
            h = up(h)
        return self.conv_out(F.silu(self.norm_out(h)))
