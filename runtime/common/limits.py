"""Bounds on model sizes, checked before anything is allocated.

A config or ONNX metadata is data from somewhere else: ``block_depth`` 10**9 or ``image_size``
65536 must give one clear line, not an hour of module building or a 16 GiB allocation. The
checks here need no torch; the trainer adds the activation memory (``trainer.memory``, counted from the
config) and the parameter count (the model built on PyTorch's meta device, which allocates nothing). Every limit can be raised by a flag
of ``python -m trainer fit`` and ``ddim-export`` (``--max-image-size``, ``--max-parameters``,
``--max-memory-gib``); the defaults are far above every preset (the largest, ddpm-cifar10, has
36 M parameters on 32x32 images).

The same module bounds what a command is asked to hold or start: model files by what their config can hold
(:func:`most_parameters`, checked on the file's size before it is read), images by the memory available
(:func:`check_image_count`), CPU threads by the logical CPUs this process may use (:func:`max_threads`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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


# Parameters per residual block and squared width: the presets have 0.7 to 7.4 (their widest layer set the width),
# so 16 bounds every U-Net here with room to spare.
PARAMETERS_PER_BLOCK_WIDTH2 = 16
# What a model file holds besides its weights' values: the graph, names, metadata, a safetensors header.
FILE_OVERHEAD = 16 << 20


def most_parameters(cfg: ModelConfig, limits: SizeLimits = SizeLimits()) -> int:
    """An upper bound on the parameters of a model of config ``cfg``, from its shape alone (no torch): residual
    blocks x width^2 x :data:`PARAMETERS_PER_BLOCK_WIDTH2`, and never more than ``limits.parameters`` (all that
    an imported architecture's config is bounded by)."""
    try:
        blocks, width = blocks_and_width(cfg)
    except ConfigError:  # an imported (diffusers) U-Net: its own config's shapes are not ours to count
        return limits.parameters
    return min(PARAMETERS_PER_BLOCK_WIDTH2 * blocks * width * width, limits.parameters)


def check_file_size(path: Path, most: int, what: str, why: str) -> int:
    """Refuse ``path`` (a model file) larger than ``most`` bytes before any of it is read: a ValueError naming the
    file, its size and the limit (``why`` says where the limit comes from). Returns the size."""
    size = path.stat().st_size
    if size > most:
        raise SizeLimitError(f"{what} {path} is {_mib(size)}, more than the {_mib(most)} {why}: refused before "
                             "reading it")
    return size


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


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


def max_threads() -> int:
    """The most CPU threads a command may ask for: the logical CPUs this process may run on (its affinity mask).
    More only oversubscribes them (docs/sampling.md measured 16x slower steps under contention), and ONNX
    Runtime / torch spend minutes starting 10,000 threads."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # no affinity API on this platform
        return os.cpu_count() or 1


def check_threads_cap(threads: int | None, flag: str = "threads") -> int | None:
    """``threads`` unchanged when at most :func:`max_threads`; a ValueError naming ``flag`` and the cap otherwise."""
    cap = max_threads()
    if threads is not None and not isinstance(threads, bool) and isinstance(threads, int) and threads > cap:
        raise ValueError(f"{flag} {threads:,}: at most {cap} threads (the logical CPUs this process may use)")
    return threads


def available_memory() -> int | None:
    """Bytes of memory this machine can give a new allocation now without swapping (Linux's ``MemAvailable``;
    elsewhere the physical memory), or None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


# Where the memory cannot be read: a fixed budget for the images of one command.
FALLBACK_MEMORY = 16 << 30


def check_image_count(count: int, shape: tuple[int, int, int], flag: str, bytes_per_value: int,
                      per_image: int = 128) -> None:
    """Refuse ``count`` images of ``shape`` (C, H, W) that cannot all be held in memory: each costs
    ``bytes_per_value`` bytes per pixel value at the command's peak (its float32 samples, the float64 steps of the
    uint8 conversion, the uint8 images and grid) plus ``per_image`` bytes of bookkeeping, against the memory
    available now (:func:`available_memory`; :data:`FALLBACK_MEMORY` where unknown). A ValueError naming ``flag``
    and the most images this machine holds."""
    c, h, w = shape
    each = bytes_per_value * c * h * w + per_image
    budget = available_memory() or FALLBACK_MEMORY
    most = max(budget // each, 1)
    if count > most:
        raise ValueError(f"{flag} {count:,}: at most {most:,} images of {h}x{w}x{c} fit in the "
                         f"{budget / 2**30:.1f} GiB of memory available now (about {each / 1024:,.0f} KiB each "
                         "while sampling); sample in several runs")
