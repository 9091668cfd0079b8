"""The DDPM-style U-Net: structure, initialisation, FP16 behaviour and ONNX exportability."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_onnx_matches_eager
from runtime.config import ConfigError, DDPMUNetConfig
from trainer.models import build_model, count_parameters, forward_gflops
from trainer.presets import get_preset
from trainer.unet_ddpm import AttentionBlock, GroupNorm32

TINY = DDPMUNetConfig(image_size=16, channels=3, base_width=16, channel_mults=(1, 2), num_res_blocks=1,
                      attention_resolutions=(8,), num_groups=4, num_heads=2, dropout=0.0)


def randomised(cfg: DDPMUNetConfig = TINY) -> torch.nn.Module:
    """A model whose zero-initialised layers are given weights, so every path contributes."""
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    for p in model.parameters():
        if torch.count_nonzero(p) == 0 and p.dim() > 1:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_shapes_attention_placement_and_zero_head():
    model = build_model(TINY)
    x = torch.randn(2, 3, 16, 16)
    assert torch.count_nonzero(model(x, torch.rand(2, 1, 1, 1))) == 0  # zero-initialised output conv
    attn_levels = [any(isinstance(a, AttentionBlock) for a in level.attn) for level in model.down]
    assert attn_levels == [False, True]  # attention only at 8x8
    assert randomised()(x, torch.rand(2, 1, 1, 1)).shape == x.shape


def test_cifar10_128_is_the_ddpm_model_size():
    cfg = get_preset("cifar10-128").config.model
    model = build_model(cfg)
    assert count_parameters(model) == pytest.approx(35.7e6, rel=0.01)  # DDPM's CIFAR-10 model: 35.7 M
    assert forward_gflops(model, cfg) == pytest.approx(12.4, rel=0.05)  # ~6.2 GMACs


def test_groupnorm_and_softmax_stay_float32_under_half_inputs():
    norm = GroupNorm32(2, 4)
    x = (torch.randn(1, 4, 3, 3) * 300).to(torch.bfloat16)
    assert norm(x).dtype == torch.bfloat16
    torch.testing.assert_close(norm(x).float(), norm(x.float()), rtol=2e-2, atol=2e-2)


def test_bfloat16_forward_tracks_float32():
    model = randomised()
    x, v = torch.randn(2, 3, 16, 16), torch.rand(2, 1, 1, 1)
    with torch.no_grad():
        ref = model(x, v)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, v).float()
    err = (low - ref).abs().max() / ref.abs().max()
    assert err < 0.05, f"relative error {err:.3g}"


def test_config_refusals():
    with pytest.raises(ConfigError, match="attention resolution 4 is not a level.*allowed: 16, 8"):
        DDPMUNetConfig(image_size=16, channels=3, channel_mults=(1, 2), attention_resolutions=(4,))
    with pytest.raises(ConfigError, match="not divisible by num_groups 32"):
        DDPMUNetConfig(image_size=32, channels=3, base_width=48, attention_resolutions=())
    with pytest.raises(ConfigError, match="does not fit channel_mults"):
        DDPMUNetConfig(image_size=20, channels=3, channel_mults=(1, 2, 2, 2))


def test_exports_to_onnx_opset18_and_matches_eager():
    assert_onnx_matches_eager(randomised(), (3, 16, 16))


@pytest.mark.parametrize("arch", ["ddpm", "keras"])
def test_half_precision_model_tracks_float32(arch):
    """model.half() with float16 images and float32 noise variances (the engines' contract).

    Measured: 1.4e-3 (ddpm) and 9.7e-4 (keras) of the output's range; the embedding stays float32.
    """
    from runtime.config import KerasUNetConfig

    if arch == "ddpm":
        model = randomised()
    else:
        torch.manual_seed(0)
        model = build_model(KerasUNetConfig(16, 3, widths=(8, 16))).eval()
        torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    x, v = torch.randn(2, 3, 16, 16), torch.rand(2, 1, 1, 1)
    with torch.no_grad():
        ref = model(x, v)
        half = model.half()(x.half(), v)
    assert half.dtype == torch.float16
    assert ((half.float() - ref).abs().max() / ref.abs().max()).item() < 1e-2


def test_timestep_embedding_is_diffusers_unet2dmodel_embedding():
    """conditioning 'timestep' embeds t exactly as diffusers' UNet2DModel defaults do (bit for bit)."""
    embeddings = pytest.importorskip("diffusers.models.embeddings")
    from trainer.unet_keras import TimestepEmbedding

    t = torch.tensor([0.0, 1.0, 17.0, 500.0, 999.0])
    ours = TimestepEmbedding(64)(t).flatten(1)
    theirs = embeddings.get_timestep_embedding(t, 64, flip_sin_to_cos=True, downscale_freq_shift=0)
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize("arch", ["ddpm", "keras"])
def test_timestep_conditioned_nets_take_integer_steps_and_export(arch):
    from runtime.config import KerasUNetConfig

    cfg = (DDPMUNetConfig(image_size=16, channels=3, base_width=16, channel_mults=(1, 2), num_res_blocks=1,
                          attention_resolutions=(8,), num_groups=4, dropout=0.0, conditioning="timestep")
           if arch == "ddpm" else KerasUNetConfig(image_size=16, channels=3, widths=(8, 16), conditioning="timestep"))
    model = randomised(cfg) if arch == "ddpm" else build_model(cfg).eval()
    torch.nn.init.normal_(getattr(model, "conv_out").weight, std=0.05)
    x = torch.randn(2, 3, 16, 16)
    a, b = model(x, torch.tensor([10.0, 900.0])), model(x, torch.tensor([11.0, 900.0]))
    assert not torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])  # per-image steps, each its own
    assert forward_gflops(model, cfg) > 0
