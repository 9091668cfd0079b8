"""Torch side of the diffusion: the training loss and the eager sampler.

Both take their schedule values from ``runtime/schedule.py`` (float64 numpy, converted to
tensors here); the sampler is the runtime's own (``runtime.api.Sampler``) over the torch backend:
there is one DDIM loop and one DDIM update.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from torch import nn

from runtime.config import Conditioning, ModelSpec
from runtime.schedule import Schedule
from runtime.settings import SamplingSettings


def sample_training_steps(schedule: Schedule, n: int, gen: torch.Generator) -> NDArray:
    """Uniform random steps: integers 0..T-1 (discrete) or times in [0, 1] (continuous)."""
    if schedule.discrete:
        assert schedule.num_timesteps is not None  # noqa: S101 (discrete schedules have T)
        return torch.randint(0, schedule.num_timesteps, (n,), generator=gen).numpy()
    return torch.rand(n, generator=gen, dtype=torch.float64).numpy()


def training_loss(
    model: nn.Module, x0: torch.Tensor, schedule: Schedule, gen: torch.Generator, loss: str,
    part: slice | None = None, world: int = 1, conditioning: Conditioning = "noise_variance",
) -> torch.Tensor:
    """Noise x0 at random steps and regress the noise (MAE as Keras, or MSE as DDPM).

    Under multi-process training x0 is this rank's ``part`` of a global batch ``world`` times
    larger: the steps and noise are drawn for the whole global batch (the generator is in step on
    every rank) and sliced, so the job draws exactly what a single process would.
    """
    n = x0.shape[0]
    part = part or slice(0, n)
    steps = sample_training_steps(schedule, n * world, gen)[part]
    a = torch.from_numpy(schedule.alpha_bar(steps)).to(device=x0.device, dtype=torch.float32).view(n, 1, 1, 1)
    noise = torch.randn((n * world, *x0.shape[1:]), generator=gen)[part].to(x0.device)
    x_t = a.sqrt() * x0 + (1.0 - a).sqrt() * noise  # q(x_t | x_0), DDPM Eq. 4
    pred = model(x_t, conditioning_input(conditioning, steps, a))
    return F.l1_loss(pred.float(), noise) if loss == "mae" else F.mse_loss(pred.float(), noise)


def conditioning_input(conditioning: Conditioning, steps: NDArray, a: torch.Tensor) -> torch.Tensor:
    """What the network is given for noise level ``a`` (N, 1, 1, 1) at ``steps``: the noise variance, or the
    integer timesteps as float32 (N,)."""
    if conditioning == "timestep":
        return torch.from_numpy(np.asarray(steps, dtype=np.float32)).to(a.device)
    return 1.0 - a


def sample_images(model: nn.Module, spec: ModelSpec, num_images: int, settings: SamplingSettings, seed: int = 0,
                  batch_size: int = 64, device: torch.device | str = "cpu") -> NDArray[np.uint8]:
    """Eager PyTorch sampling through the runtime's sampler; ``(N, H, W, C)`` uint8 images."""
    from runtime.api import Sampler
    from trainer.torch_backend import TorchBackend

    backend = TorchBackend(model=model, spec=spec, device=str(device))
    return Sampler(backend).sample(num_images, settings, seed=seed, batch_size=batch_size).images
