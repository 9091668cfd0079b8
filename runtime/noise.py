"""Seeded Gaussian noise, per image: the same seed gives the same images on every backend.

Each image i of a sampling call draws from its own ``numpy.random.Generator`` seeded with
``(seed, i)``: first its initial noise x_T, then, for eta > 0, one draw per step. So an image
does not depend on the batch size, the backend, or which other images are sampled with it: a
batch may even mix images of different seeds (``ImageNoise.of``, what ``ddim-serve`` batches).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import NDArray


class ImageNoise:
    """Noise streams for images ``indices`` of a call seeded with ``seed``."""

    def __init__(self, seed: int, indices: Sequence[int]) -> None:
        self._rngs = [np.random.default_rng([seed, int(i)]) for i in indices]

    @classmethod
    def of(cls, images: Sequence[tuple[int, int]]) -> "ImageNoise":
        """Noise streams for ``(seed, index)`` pairs: image ``index`` of a call seeded with ``seed``."""
        noise = cls(0, ())
        noise._rngs = [np.random.default_rng([int(seed), int(i)]) for seed, i in images]
        return noise

    @property
    def count(self) -> int:
        """How many images (streams)."""
        return len(self._rngs)

    def draw(self, shape: tuple[int, int, int]) -> NDArray[np.float32]:
        """The next ``(N, C, H, W)`` standard normal draw, one image per stream."""
        return np.stack([rng.standard_normal(shape, dtype=np.float32) for rng in self._rngs])
