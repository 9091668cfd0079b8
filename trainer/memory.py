"""Training memory, estimated from a model config alone (no torch): what one image's forward pass keeps for the
backward pass. ``trainer.models`` checks it against ``--max-memory-gib`` before a model is built."""

from __future__ import annotations

from runtime.config import ConfigError, DDPMUNetConfig, KerasUNetConfig, ModelConfig


def activation_bytes(cfg: ModelConfig) -> int:
    """Float32 bytes one image's forward pass keeps for the backward pass: every intermediate tensor
    of the architecture's forward (normalisations, activations, convolutions, concatenations,
    attention logits and weights), counted from the config alone. An estimate of what autograd saves
    (within a factor of about 1.5 of PyTorch's saved tensors; tests/reliability check it)."""
    if isinstance(cfg, KerasUNetConfig):
        return 4 * _keras_floats(cfg)
    if isinstance(cfg, DDPMUNetConfig):
        return 4 * _ddpm_floats(cfg)
    raise ConfigError(f"unknown architecture {getattr(cfg, 'architecture', cfg)!r}")


def _keras_floats(cfg: KerasUNetConfig) -> int:
    def block(c_in: int, c_out: int, area: int) -> int:  # norm, conv1, silu, conv2, 1x1 skip, sum
        return area * (c_in + 4 * c_out + (c_out if c_in != c_out else 0))

    widths, depth, size = list(cfg.widths), cfg.block_depth, cfg.image_size
    total = size * size * (2 * widths[0] + 2 * cfg.embedding_dims)  # conv_in, embedding map, concat
    c, res = widths[0] + cfg.embedding_dims, size
    for w in widths[:-1]:
        for _ in range(depth):
            total += block(c, w, res * res)
            c = w
        res //= 2
        total += w * res * res  # average pooling
    for _ in range(depth):
        total += block(c, widths[-1], res * res)
        c = widths[-1]
    for w in reversed(widths[:-1]):
        res *= 2
        total += c * res * res  # bilinear upsampling
        for _ in range(depth):
            total += res * res * (c + w) + block(c + w, w, res * res)  # concat, block
            c = w
    return total + size * size * cfg.channels


def _ddpm_floats(cfg: DDPMUNetConfig) -> int:
    def block(c_in: int, c_out: int, area: int) -> int:  # norm, silu, conv, +emb, norm, silu, dropout, conv, skip, sum
        return area * (2 * c_in + 7 * c_out + (c_out if c_in != c_out else 0))

    def attention(c: int, area: int) -> int:  # norm, qkv, output, projection, sum; logits and softmax
        return area * 7 * c + 2 * cfg.num_heads * area * area

    base, size = cfg.base_width, cfg.image_size
    widths = [base * m for m in cfg.channel_mults]
    total, c, res, skips = size * size * base, base, size, [base]
    for i, w in enumerate(widths):
        for _ in range(cfg.num_res_blocks):
            total += block(c, w, res * res) + (attention(w, res * res) if res in cfg.attention_resolutions else 0)
            c = w
            skips.append(c)
        if i < len(widths) - 1:
            res //= 2
            total += c * res * res
            skips.append(c)
    total += 2 * block(c, c, res * res) + attention(c, res * res)
    for i, w in reversed(list(enumerate(widths))):
        for _ in range(cfg.num_res_blocks + 1):
            s = skips.pop()
            total += res * res * (c + s) + block(c + s, w, res * res)
            total += attention(w, res * res) if res in cfg.attention_resolutions else 0
            c = w
        if i > 0:
            res *= 2
            total += 2 * c * res * res  # nearest upsampling, conv
    return total + size * size * (2 * c + cfg.channels)
