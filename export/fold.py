"""Fold the Keras U-Net's BatchNorm layers into the convolutions that follow them, exactly.

In a residual block BatchNorm (no affine) feeds a zero-padded 3x3 conv. Folding the scale into the
conv weights is the usual trick, but the mean cannot go into the conv's bias: the conv pads the
*normalised* map with zeros, i.e. the raw map with the mean. By linearity

    conv_w(pad0((x - m) * s)) = conv_{w s}(pad0(x)) - conv_{w s}(pad0(m))

and the last term is a constant (C_out, H, W) map, so BatchNorm + conv becomes one conv plus the
addition of a precomputed map: exact, with no BatchNorm left in the graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from trainer.unet_keras import ResidualBlock


class ConvPlusMap(nn.Module):
    """A convolution followed by the addition of a constant map ``(1, C_out, H, W)``."""

    def __init__(self, conv: nn.Conv2d, bias_map: torch.Tensor) -> None:
        super().__init__()
        self.conv = conv
        self.register_buffer("bias_map", bias_map)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) + self.bias_map


@torch.no_grad()
def fold_batchnorm(model: nn.Module, image_size: int, channels: int) -> int:
    """Fold every residual block's BatchNorm into its first conv, in place (eval mode); returns the count."""
    model.eval()
    blocks = [b for b in model.modules() if isinstance(b, ResidualBlock)]
    if not blocks:  # not the Keras U-Net (a DDPM or an imported diffusers U-Net): nothing to fold, no forward
        return 0
    sizes: dict[ResidualBlock, tuple[int, int]] = {}
    hooks = [b.register_forward_pre_hook(lambda mod, args: sizes.__setitem__(mod, tuple(args[0].shape[-2:])))
             for b in blocks]
    try:
        model(torch.zeros(1, channels, image_size, image_size), torch.full((1, 1, 1, 1), 0.5))
    finally:
        for h in hooks:
            h.remove()
    for block, (h, w) in sizes.items():
        bn, conv = block.norm, block.conv1
        if not isinstance(bn, nn.BatchNorm2d) or bn.running_mean is None or bn.affine:
            continue
        scale = torch.rsqrt(bn.running_var + bn.eps)  # (C_in,)
        folded = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                           bias=conv.bias is not None)
        folded.weight.copy_(conv.weight * scale.view(1, -1, 1, 1))
        if conv.bias is not None:
            folded.bias.copy_(conv.bias)
        mean_map = bn.running_mean.view(1, -1, 1, 1).expand(1, -1, h, w)
        bias_map = -F.conv2d(mean_map, folded.weight, None, conv.stride, conv.padding)
        block.norm = nn.Identity()
        block.conv1 = ConvPlusMap(folded, bias_map)
    return len(sizes)
