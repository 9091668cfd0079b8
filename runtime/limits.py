"""Bounds on model sizes, checked before anything is allocated.

A config or ONNX metadata is data from somewhere else: ``block_depth`` 10**9 or ``image_size``
65536 must give one clear line, not an hour of module building or a 16 GiB allocation. The
checks here need no torch (activation memory is counted from the config); the trainer adds the
parameter count (the model built on PyTorch's meta device, which allocates nothing). Every limit can be raised by a flag
of ``python -m trainer fit`` and ``ddim-export`` (``--max-image-size``, ``--max-parameters``,
``--max-memory-gib``); the defaults are far above every preset (the largest, ddpm-cifar10, has
36 M parameters on 32x32 images).
"""

from __future__ import annotations

from dataclasses import dataclass

from runtime.config import ConfigError, DDPMUNetConfig, KerasUNetConfig, ModelConfig

MAX_BLOCKS = 512  # residual blocks in one U-Net: the largest preset has 30
MAX_WIDTH = 16384  # channels of any layer: the largest preset has 256


class SizeLimitError(ConfigError):
    """A model larger than the limits (which a flag can raise)."""


@dataclass(frozen=True)
class SizeLimits:
    """What a model may cost; see the module docstring."""

    image_size: int = 1024
    """Refuse a model for larger images."""
    parameters: int = 1_000_000_000
    """Refuse a model with more parameters."""
    memory_gib: float = 64.0
    """Refuse a model whose training batch needs more memory (estimated activations, GiB)."""

    def __post_init__(self) -> None:
        for name in ("image_size", "parameters"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not self.memory_gib > 0:
            raise ValueError(f"memory_gib must be > 0, got {self.memory_gib!r}")


def blocks_and_width(cfg: ModelConfig) -> tuple[int, int]:
    """Residual blocks and widest layer of a U-Net config, from the config alone."""
    if isinstance(cfg, KerasUNetConfig):
        return 2 * len(cfg.widths) * cfg.block_depth, max(max(cfg.widths), cfg.embedding_dims)
    if isinstance(cfg, DDPMUNetConfig):
        levels = len(cfg.channel_mults)
        return levels * (2 * cfg.num_res_blocks + 1) + 2, cfg.base_width * max(cfg.channel_mults) * 4
    raise ConfigError(f"unknown architecture {getattr(cfg, 'architecture', cfg)!r}")


def check_structure(cfg: ModelConfig, limits: SizeLimits = SizeLimits()) -> None:
    """Refuse a config whose shape alone is out of bounds (before any module is built)."""
    if cfg.image_size > limits.image_size:
        raise SizeLimitError(f"image_size {cfg.image_size} is larger than the limit {limits.image_size} "
                             "(raise it with --max-image-size)")
    blocks, width = blocks_and_width(cfg)
    if blocks > MAX_BLOCKS:
        raise SizeLimitError(f"the U-Net would have {blocks:,} residual blocks; at most {MAX_BLOCKS} are supported")
    if width > MAX_WIDTH:
        raise SizeLimitError(f"the U-Net would have layers {width:,} channels wide; at most {MAX_WIDTH} are "
                             "supported")


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
