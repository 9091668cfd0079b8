"""Deterministic training batches: the data order depends only on (seed, step)."""

from __future__ import annotations

import numpy as np
import torch

from runtime.config import NormalizationConfig
from trainer.distributed import DistInfo


class Batches:
    """Epoch e is a permutation seeded by (seed, e), remainder dropped; each rank takes its slice.

    The global batch of step s depends only on (seed, s), so a resumed run sees the same data and
    K processes together see what one process would.
    """

    def __init__(self, images: np.ndarray, batch_size: int, seed: int, dist: DistInfo = DistInfo()) -> None:
        if len(images) < batch_size:
            raise ValueError(f"the dataset has {len(images)} images, fewer than the batch size {batch_size}")
        self.images = torch.from_numpy(images)
        self.batch_size = batch_size
        self.seed = seed
        self.part = dist.shard(batch_size)
        self.per_epoch = len(images) // batch_size
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __call__(self, step: int) -> torch.Tensor:
        """This rank's uint8 images ``(B/K, C, H, W)`` of global step ``step``."""
        epoch, offset = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.images))
        idx = self._perm[offset * self.batch_size : (offset + 1) * self.batch_size][self.part]
        return self.images[torch.from_numpy(idx)]


def to_model_space(batch: torch.Tensor, norm: NormalizationConfig, flip: bool, gen: torch.Generator,
                   device: torch.device, dist: DistInfo = DistInfo()) -> torch.Tensor:
    """uint8 (n, C, H, W) to normalised float32, with random horizontal flips when asked.

    The flip draws cover the global batch (n * world) so every rank's generator stays in step.
    """
    x = batch.to(device=device, dtype=torch.float32) / 255.0
    mean = torch.tensor(norm.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(norm.std, device=device).view(1, -1, 1, 1)
    x = (x - mean) / std
    if flip:
        draws = torch.rand(x.shape[0] * dist.world, generator=gen)[dist.shard(x.shape[0] * dist.world)]
        mask = (draws < 0.5).to(device).view(-1, 1, 1, 1)
        x = torch.where(mask, x.flip(-1), x)
    return x
