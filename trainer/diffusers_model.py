"""Our denoisers as a diffusers model, for the ``ddim-export --diffusers`` folders that UNet2DModel cannot hold.

``DDIMPipeline`` calls ``unet(sample, t)`` with the scheduler's integer timestep ``t`` and samples in
diffusers' pixel convention (images in [-1, 1]: ``image / 2 + 0.5`` at the end). :class:`DDIMDeployUNet`
wraps any net of ours (``config.json`` holds its :class:`runtime.config.ModelSpec`, the weights are the
net's under ``net.``) and gives it what it was trained on:

- a timestep-conditioned net gets ``t`` itself (its schedule is the scheduler's);
- a noise-variance-conditioned net gets ``1 - alpha_bar``: of step ``t`` of a discrete schedule, or of
  time ``(t + 1) / T`` of the continuous cosine-angle schedule (the scheduler then holds that schedule
  on a grid of T steps as ``trained_betas``).

A model trained on another normalisation than [-1, 1] (per-channel mean/std ``m, s``; pixels ``x`` in
[0, 1]) sees ``z = (x - m) / s`` while the pipeline's state is ``y = 2 x - 1 = A z + B`` (``A = 2 s``,
``B = 2 m - 1``). With one ``A`` for every channel the wrapper folds that affine map in exactly: a
pipeline state ``y_t = sqrt(a) y_0 + sqrt(1 - a) eps`` is the net's own noisy image
``z = (y_t - sqrt(a) B) / sqrt(1 + (A^2 - 1) a)`` at noise variance ``(1 - a) / (1 + (A^2 - 1) a)``
(the signal-to-noise ratio times A^2), with the same eps. So DDIMPipeline samples the model's
distribution; the steps fall at other noise levels than ``ddim-run``'s, so the same noise gives other
images. Timestep-conditioned nets cannot take those levels: they need the [-1, 1] normalisation.

Import this module before ``from_pretrained``: diffusers loads a component named by module path only
from modules already imported (it never imports code because a folder names it), and finds how to load
the component by looking its loader bases (``ModelMixin``, ...) up in this module, so the module must
hold that name (it does: the class derives from it).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin  # ModelMixin is also what diffusers' loader looks up in this module
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from numpy.typing import NDArray

from runtime.config import ModelSpec, NormalizationConfig
from runtime.schedule import build_schedule
from trainer.models import build_model

# The grid a continuous schedule is written on (diffusers schedulers are discrete): 1,000 steps, as DDPM's T.
CONTINUOUS_GRID = 1000


class DiffusersExportError(ValueError):
    """A model that a diffusers folder cannot hold as it is."""


def pixel_affine(norm: NormalizationConfig) -> tuple[float, NDArray[np.float64]]:
    """``(A, B)`` with diffusers' pixels ``y = A z + B`` for our model-space ``z`` (B per channel).

    DiffusersExportError when the channels have different stds: one A per channel would mean one
    noise level per channel, which no net of ours takes.
    """
    if len(set(norm.std)) != 1:
        raise DiffusersExportError(
            f"the normalisation's stds differ between channels ({', '.join(f'{s:.4g}' for s in norm.std)}): "
            "DDIMPipeline samples in [-1, 1] pixels, and folding a per-channel scale in would need a "
            "different noise level per channel; only models with one std for all channels (or the "
            "minus-one-one normalisation) can be exported")
    return 2.0 * norm.std[0], 2.0 * np.asarray(norm.mean, dtype=np.float64) - 1.0


def folds(spec: ModelSpec) -> bool:
    """Whether the model's normalisation differs from [-1, 1] pixels and is folded in (module docstring);
    DiffusersExportError where it cannot be."""
    scale, shift = pixel_affine(spec.normalization)
    folded = scale != 1.0 or bool(np.any(shift != 0.0))
    if folded and spec.model.conditioning == "timestep":
        raise DiffusersExportError(
            "this timestep-conditioned model was trained on another normalisation than minus-one-one, and "
            "DDIMPipeline samples in [-1, 1] pixels; folding the difference in would need noise levels between "
            "its timesteps")
    return folded


def grid_size(spec: ModelSpec) -> int:
    """T of the scheduler: the discrete schedule's own, else :data:`CONTINUOUS_GRID`."""
    return spec.schedule.num_timesteps if spec.schedule.discrete else CONTINUOUS_GRID


def grid_alpha_bar(spec: ModelSpec, num_train_timesteps: int) -> NDArray[np.float64]:
    """alpha_bar at the scheduler's steps 0..T-1: the discrete schedule's own, or the continuous
    schedule's at times (t + 1) / T (so "trailing" steps land on ddim-run's uniform times)."""
    schedule = build_schedule(spec.schedule)
    steps = np.arange(num_train_timesteps)
    if schedule.discrete:
        if num_train_timesteps != schedule.num_timesteps:
            raise DiffusersExportError(f"the scheduler has {num_train_timesteps} steps, the model's schedule "
                                       f"{schedule.num_timesteps}")
        return schedule.alpha_bar(steps)
    return schedule.alpha_bar((steps + 1) / num_train_timesteps)


class DDIMDeployUNet(ModelMixin, ConfigMixin):
    """A ddim-deploy denoiser behind UNet2DModel's call: ``unet(sample, timestep).sample`` is the noise."""

    config_name = "config.json"

    @register_to_config
    def __init__(self, spec: Mapping[str, Any], sample_size: int, in_channels: int, out_channels: int,
                 num_train_timesteps: int) -> None:
        # sample_size / in_channels are what DDIMPipeline reads to shape x_T (they repeat the spec's).
        super().__init__()
        self.spec = ModelSpec.from_dict(spec)
        m = self.spec.model
        if (sample_size, in_channels, out_channels) != (m.image_size, m.channels, m.channels):
            raise DiffusersExportError("sample_size / in_channels / out_channels disagree with the model config")
        self.net = build_model(m)
        folds(self.spec)  # refuses what cannot be folded in
        scale, shift = pixel_affine(self.spec.normalization)
        a = grid_alpha_bar(self.spec, num_train_timesteps)
        # Per step: the net's input is (y - shift_t) / div_t and its noise variance var_t (module docstring);
        # 1 + (A^2 - 1) a is exactly 1 when nothing is folded, so that case is the identity bit for bit.
        denom = 1.0 + (scale**2 - 1.0) * a  # (T,)
        self._div = np.sqrt(denom)
        self._shift = np.sqrt(a)[:, None] * shift[None, :]  # (T, C)
        self._cond = np.arange(num_train_timesteps, dtype=np.float64) if m.conditioning == "timestep" \
            else (1.0 - a) / denom

    def _steps(self, timestep: torch.Tensor | int, n: int) -> NDArray[np.int64]:
        t = torch.as_tensor(timestep).detach().reshape(-1).cpu()
        if t.numel() == 1:
            t = t.expand(n)
        if t.numel() != n or t.is_complex() or bool((t != t.round()).any()):
            raise ValueError(f"timestep must be one integer or one per image (got {tuple(t.shape)} for {n} images)")
        idx = t.to(torch.int64).numpy()
        if idx.min() < 0 or idx.max() >= len(self._cond):
            raise ValueError(f"timesteps must lie in 0..{len(self._cond) - 1}")
        return idx

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | int,
                return_dict: bool = True) -> UNet2DOutput | tuple[torch.Tensor]:
        """The predicted noise of ``sample`` (N, C, H, W) at the scheduler's integer ``timestep``."""
        n = sample.shape[0]
        idx = self._steps(timestep, n)

        def per_image(values: NDArray[np.float64], shape: tuple[int, ...]) -> torch.Tensor:
            return torch.from_numpy(values[idx]).to(device=sample.device, dtype=torch.float32).view(shape)

        x = ((sample.float() - per_image(self._shift, (n, -1, 1, 1))) / per_image(self._div, (n, 1, 1, 1)))
        cond = per_image(self._cond, (n,) if self.spec.model.conditioning == "timestep" else (n, 1, 1, 1))
        eps = self.net(x.to(sample.dtype), cond)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)
