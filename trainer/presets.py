"""Named training setups. Every field can be overridden from the command line."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.config import DDPMUNetConfig, KerasUNetConfig, ScheduleConfig
from trainer.config import DataConfig, RunConfig, TrainConfig


@dataclass(frozen=True)
class Preset:
    """A run config plus what the user should know about it."""

    config: RunConfig
    summary: str


KERAS_SCHEDULE = ScheduleConfig(name="cosine-angle", min_signal_rate=0.02, max_signal_rate=0.95)
DDPM_SCHEDULE = ScheduleConfig(name="linear", num_timesteps=1000, beta_start=1e-4, beta_end=0.02)


def _keras_flowers() -> Preset:
    # The Keras DDIM example's model card: Oxford Flowers 102 at 64x64, widths 32-128, depth 2,
    # cosine-angle schedule 0.02/0.95, MAE on the noise, AdamW 1e-3 / 1e-4, EMA 0.999, batch 64,
    # 80 epochs of 5 dataset repetitions, per-channel mean/variance normalisation.
    cfg = RunConfig(
        preset="keras-flowers",
        model=KerasUNetConfig(image_size=64, channels=3, widths=(32, 64, 96, 128), block_depth=2),
        schedule=KERAS_SCHEDULE,
        data=DataConfig(source="oxford-flowers", split="train", val_fraction=0.2, normalization="dataset-stats"),
        train=TrainConfig(
            batch_size=64, lr=1e-3, weight_decay=1e-4, ema_decay=0.999, ema_warmup=False, loss="mae",
            epochs=80, dataset_repetitions=5, sample_every=2000, checkpoint_every=1000,
        ),
    )
    return Preset(cfg, "Keras DDIM example: Oxford Flowers 102, 64x64x3")


def _fashion_mnist() -> Preset:
    # Sized for 2 CPU cores: three widths at 32x32 (28x28 padded) train at ~75 images/s there,
    # so 4,000 steps of 64 images (about 4 epochs) take roughly an hour.
    cfg = RunConfig(
        preset="fashion-mnist",
        model=KerasUNetConfig(image_size=32, channels=1, widths=(32, 64, 96), block_depth=2),
        schedule=KERAS_SCHEDULE,
        data=DataConfig(source="fashion-mnist", split="train", normalization="dataset-stats"),
        train=TrainConfig(
            batch_size=64, lr=1e-3, weight_decay=1e-4, ema_decay=0.999, loss="mae",
            steps=4000, sample_every=500, checkpoint_every=250,
        ),
    )
    return Preset(cfg, "the embedded default: Fashion-MNIST, 32x32x1, about an hour on 2 CPU cores")


# The DDPM paper's presets condition on the integer timestep as the paper does, which also makes their U-Net
# diffusers' UNet2DModel layer for layer (ddim-export --diffusers writes a plain UNet2DModel folder).


def _ddpm_train(steps: int) -> TrainConfig:
    # DDPM (Ho et al. 2020, App. B): Adam 2e-4, batch 128, 5,000 warm-up steps, gradient clipping
    # at 1, EMA 0.9999, MSE on the noise; no weight decay.
    return TrainConfig(
        batch_size=128, lr=2e-4, weight_decay=0.0, ema_decay=0.9999, loss="mse", steps=steps,
        warmup_steps=5000, grad_clip=1.0, sample_every=5000, checkpoint_every=5000,
    )


def _cifar10(width: int) -> Preset:
    cfg = RunConfig(
        preset=f"cifar10-{width}",
        model=DDPMUNetConfig(image_size=32, channels=3, base_width=width, channel_mults=(1, 2, 2, 2),
                             num_res_blocks=2, attention_resolutions=(16,), dropout=0.1, conditioning="timestep"),
        schedule=DDPM_SCHEDULE,
        data=DataConfig(source="cifar10", split="train", random_flip=True, normalization="minus-one-one"),
        train=_ddpm_train(800_000),
    )
    return Preset(cfg, f"DDPM-style U-Net, base width {width}: CIFAR-10 32x32x3 (DDPM / DDIM paper setup)")


def _celebahq64() -> Preset:
    # The DDIM paper's CelebA 64x64 model: channel multipliers 1-2-2-2-4, attention at 16x16.
    cfg = RunConfig(
        preset="celebahq-64",
        model=DDPMUNetConfig(image_size=64, channels=3, base_width=128, channel_mults=(1, 2, 2, 2, 4),
                             num_res_blocks=2, attention_resolutions=(16,), dropout=0.1, conditioning="timestep"),
        schedule=DDPM_SCHEDULE,
        data=DataConfig(source="folder", split="all", random_flip=True, normalization="minus-one-one"),
        train=_ddpm_train(500_000),
    )
    return Preset(cfg, "DDPM-style U-Net: CelebA-HQ resized to 64x64x3 (a folder of images you provide)")


PRESETS: dict[str, Preset] = {
    p.config.preset: p for p in (_fashion_mnist(), _keras_flowers(), _cifar10(64), _cifar10(128), _celebahq64())
}
DEFAULT_PRESET = "fashion-mnist"


def get_preset(name: str) -> Preset:
    """The preset called ``name``; ValueError listing the known ones otherwise."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; allowed: {', '.join(PRESETS)}") from None
