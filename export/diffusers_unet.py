"""Our DDPM-style U-Net as diffusers' ``UNet2DModel``: the config that builds the same layers, and the
weights moved over (the fused qkv convolution split into to_q / to_k / to_v).

Layer for layer (timestep conditioning; ``trainer/unet_ddpm.py``)::

    ours                                    UNet2DModel
    embedding (cos | sin of t * 10^-4k/half) time_proj (Timesteps(base, flip_sin_to_cos=True, 0))
    emb_mlp.0 / emb_mlp.2                   time_embedding.linear_1 / linear_2
    down.i.blocks.j (ResBlock)              down_blocks.i.resnets.j (emb -> time_emb_proj, skip -> conv_shortcut)
    down.i.attn.j (AttentionBlock)          down_blocks.i.attentions.j (norm -> group_norm, proj -> to_out.0)
    downsample.i.conv (3x3, stride 2, pad 1) down_blocks.i.downsamplers.0.conv (downsample_padding 1)
    mid1, mid_attn, mid2                    mid_block.resnets.0, attentions.0, resnets.1
    up.i.blocks.j / up.i.attn.j             up_blocks.i.resnets.j / attentions.j
    upsample.i.conv (nearest 2x, 3x3)       up_blocks.i.upsamplers.0.conv
    norm_out, conv_out                      conv_norm_out, conv_out

GroupNorm eps is torch's default 1e-5 on both sides. Our attention computes ``qkv`` with one 1x1 conv
and splits it per head (``reshape(N * heads, 3 * head_ch, HW)``, then q, k, v): output channel
``h * 3 hc + i * hc + j`` is head h's q (i = 0), k (1) or v (2) channel j, while diffusers' to_q output
channel ``h * hc + j`` is head h's channel j. UNet2DModel takes one ``attention_head_dim`` for every
attention layer (None: one head as wide as the layer), so ``num_heads > 1`` maps only where every
attention layer (the middle one included) has the same head width.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from runtime.config import DDPMUNetConfig, ModelSpec
from trainer.unet_ddpm import AttentionBlock, DDPMUNet, Level, ResBlock


def unet2d_mismatch(spec: ModelSpec) -> str | None:
    """Why this model is not a plain UNet2DModel (None: it is)."""
    m = spec.model
    if not isinstance(m, DDPMUNetConfig):
        return (f"the {m.architecture!r} U-Net has no UNet2DModel counterpart (BatchNorm without affine, "
                "average-pool down, bilinear up, the embedding concatenated as channels)"
                if m.architecture == "keras" else f"architecture {m.architecture!r} is not ours to map")
    if m.conditioning != "timestep":
        return "it is conditioned on the noise variance; UNet2DModel takes the integer timestep"
    if m.channel_mults[0] != 1:
        return (f"its first level is {m.channel_mults[0]} x base_width wide; UNet2DModel's timestep embedding is as "
                "wide as the first level, ours as base_width")
    if m.num_heads > 1 and len(set(head_widths(m))) > 1:
        return (f"its {m.num_heads} attention heads are {'/'.join(map(str, sorted(set(head_widths(m)))))} channels "
                "wide at different levels; UNet2DModel takes one attention_head_dim")
    return None


def head_widths(m: DDPMUNetConfig) -> list[int]:
    """Head width of every attention layer, the middle one last."""
    widths = [m.base_width * k for k in m.channel_mults]
    attended = [w for i, w in enumerate(widths) if m.image_size // 2**i in m.attention_resolutions]
    return [w // m.num_heads for w in (*attended, widths[-1])]


def unet2d_config(m: DDPMUNetConfig) -> dict[str, Any]:
    """The UNet2DModel config with our layers (see the module docstring)."""
    widths = tuple(m.base_width * k for k in m.channel_mults)
    attend = [m.image_size // 2**i in m.attention_resolutions for i in range(len(widths))]
    return {
        "sample_size": m.image_size, "in_channels": m.channels, "out_channels": m.channels,
        "block_out_channels": widths, "layers_per_block": m.num_res_blocks,
        "down_block_types": tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attend),
        "up_block_types": tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attend)),
        "mid_block_type": "UNetMidBlock2D", "add_attention": True,
        "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv",
        "dropout": m.dropout, "act_fn": "silu", "norm_num_groups": m.num_groups, "norm_eps": 1e-5,
        # None: each attention layer is one head as wide as itself (diffusers' fallback to the block width).
        "attention_head_dim": None if m.num_heads == 1 else head_widths(m)[0],
        "time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
        "center_input_sample": False, "resnet_time_scale_shift": "default",
    }


def unet2d_state_dict(net: DDPMUNet) -> dict[str, torch.Tensor]:
    """Our weights under UNet2DModel's names (see the module docstring)."""
    out: dict[str, torch.Tensor] = {}
    put = _putter(out)
    put("time_embedding.linear_1", net.emb_mlp[0])
    put("time_embedding.linear_2", net.emb_mlp[2])
    put("conv_in", net.conv_in)
    for i, (level, down) in enumerate(zip(net.down, net.downsample)):
        _level(out, f"down_blocks.{i}", level)
        if not isinstance(down, nn.Identity):
            put(f"down_blocks.{i}.downsamplers.0.conv", down.conv)
    _resblock(out, "mid_block.resnets.0", net.mid1)
    _attention(out, "mid_block.attentions.0", net.mid_attn)
    _resblock(out, "mid_block.resnets.1", net.mid2)
    for i, (level, up) in enumerate(zip(net.up, net.upsample)):
        _level(out, f"up_blocks.{i}", level)
        if not isinstance(up, nn.Identity):
            put(f"up_blocks.{i}.upsamplers.0.conv", up.conv)
    put("conv_norm_out", net.norm_out)
    put("conv_out", net.conv_out)
    return out


def _putter(out: dict[str, torch.Tensor]) -> Callable[[str, nn.Module], None]:
    def put(prefix: str, module: nn.Module) -> None:
        for name, value in module.state_dict().items():
            out[f"{prefix}.{name}"] = value.detach().clone()
    return put


def _level(out: dict[str, torch.Tensor], prefix: str, level: Level) -> None:
    for j, (block, attn) in enumerate(zip(level.blocks, level.attn)):
        _resblock(out, f"{prefix}.resnets.{j}", block)
        if isinstance(attn, AttentionBlock):
            _attention(out, f"{prefix}.attentions.{j}", attn)


def _resblock(out: dict[str, torch.Tensor], prefix: str, block: ResBlock) -> None:
    put = _putter(out)
    for ours, theirs in (("norm1", "norm1"), ("conv1", "conv1"), ("emb", "time_emb_proj"), ("norm2", "norm2"),
                         ("conv2", "conv2")):
        put(f"{prefix}.{theirs}", getattr(block, ours))
    if not isinstance(block.skip, nn.Identity):
        put(f"{prefix}.conv_shortcut", block.skip)


def _attention(out: dict[str, torch.Tensor], prefix: str, block: AttentionBlock) -> None:
    _putter(out)(f"{prefix}.group_norm", block.norm)
    ch, heads, hc = block.proj.out_channels, block.heads, block.head_ch
    weight = block.qkv.weight.detach()[:, :, 0, 0].reshape(heads, 3, hc, ch)  # (head, q/k/v, channel, input)
    bias = block.qkv.bias.detach().reshape(heads, 3, hc)
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        out[f"{prefix}.{name}.weight"] = weight[:, i].reshape(ch, ch).clone()
        out[f"{prefix}.{name}.bias"] = bias[:, i].reshape(ch).clone()
    out[f"{prefix}.to_out.0.weight"] = block.proj.weight.detach()[:, :, 0, 0].clone()
    out[f"{prefix}.to_out.0.bias"] = block.proj.bias.detach().clone()


def to_unet2d(net: DDPMUNet) -> Any:
    """A UNet2DModel holding ``net``'s weights (every name filled: strict load), in eval mode."""
    from diffusers import UNet2DModel

    unet = UNet2DModel(**unet2d_config(net.config))
    unet.load_state_dict(unet2d_state_dict(net), strict=True)
    return unet.eval()
