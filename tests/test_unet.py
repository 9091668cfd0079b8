"""The Keras U-Net: shapes, initialisation, the embedding, and ONNX exportability."""

from __future__ import annotations

import math

import numpy as np
import torch

from conftest import assert_onnx_matches_eager
from runtime.config import KerasUNetConfig
from trainer.models import build_model, count_parameters, forward_gflops
from trainer.presets import get_preset
from trainer.unet_keras import SinusoidalEmbedding

TINY = KerasUNetConfig(image_size=16, channels=3, widths=(8, 16, 24), block_depth=2, embedding_dims=8)


def test_output_shape_and_zero_initialised_head():
    model = build_model(TINY)
    x = torch.randn(3, 3, 16, 16)
    out = model(x, torch.rand(3, 1, 1, 1))
    assert out.shape == x.shape
    assert torch.count_nonzero(out) == 0  # the final 1x1 conv starts at zero, as in Keras


def test_embedding_matches_keras_formula():
    emb = SinusoidalEmbedding(32, 1.0, 1000.0)
    v = torch.tensor([0.0, 0.3, 1.0]).view(3, 1, 1, 1)
    out = emb(v).view(3, 32).double()
    freqs = np.exp(np.linspace(math.log(1.0), math.log(1000.0), 16))
    angles = 2 * math.pi * freqs[None] * v.view(3, 1).double().numpy()
    expected = np.concatenate([np.sin(angles), np.cos(angles)], axis=1)
    np.testing.assert_allclose(out.numpy(), expected, atol=2e-3)  # float32 angles up to 2 pi 1000


def test_embedding_stays_float32_under_half_inputs():
    emb = SinusoidalEmbedding(8, 1.0, 1000.0)
    assert emb(torch.full((2, 1, 1, 1), 0.7, dtype=torch.float16)).dtype == torch.float32


def test_keras_flowers_model_matches_the_keras_example_size():
    cfg = get_preset("keras-flowers").config.model
    model = build_model(cfg)
    # The Keras example's network: about 1.9 M parameters and 2.3 GFLOPs per 64x64 image.
    assert 1.9e6 < count_parameters(model) < 2.0e6
    assert 2.0 < forward_gflops(model, cfg) < 2.6


def test_batch_independence_in_eval_mode():
    model = build_model(TINY).eval()
    torch.nn.init.normal_(model.conv_out.weight)
    x, v = torch.randn(4, 3, 16, 16), torch.rand(4, 1, 1, 1)
    with torch.no_grad():
        whole = model(x, v)
        single = torch.cat([model(x[i : i + 1], v[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(whole, single, rtol=1e-5, atol=1e-5)


def test_exports_to_onnx_with_dynamic_batch_and_matches_eager():
    model = build_model(TINY).eval()
    torch.nn.init.normal_(model.conv_out.weight, std=0.1)
    assert_onnx_matches_eager(model, (3, 16, 16))
