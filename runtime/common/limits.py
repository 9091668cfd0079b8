"""Bounds on model sizes, checked before anything is allocated.

A config or ONNX metadata is data from somewhere else: ``block_depth`` 10**9 or ``image_size``
65536 must give one clear line, not an hour of module building or a 16 GiB allocation. The
checks here need no torch; the trainer adds the activation memory (``trainer.memory``, counted from the
config) and the parameter count (the model built on PyTorch's meta device, which allocates nothing). Every limit can be raised by a flag
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
