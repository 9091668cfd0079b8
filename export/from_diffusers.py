"""A diffusers UNet2DModel folder as a ModelSpec and a denoiser module: ``ddim-export`` of a diffusers model.

Two layouts are recognised by their files (:func:`diffusers_layout`):

- a pipeline folder (``save_pretrained`` of DDPMPipeline / DDIMPipeline): ``model_index.json`` with a
  ``unet`` entry, the UNet in ``unet/``, the schedule in ``scheduler/scheduler_config.json``;
- a bare UNet folder: ``config.json`` + ``diffusion_pytorch_model.safetensors``; its schedule is
  ``scheduler_config.json`` in the same folder, else ``../scheduler/scheduler_config.json`` (the
  layout of a pipeline folder); with neither the schedule is unknown and the folder is refused.

Everything is checked from the JSON files and the safetensors header (:func:`read_folder`: nothing loaded,
nothing built) before diffusers is imported or a file is written; anything this toolkit cannot sample
exactly is refused with one line naming the field and the file. The mapping:

=======================================  ===============================================================
diffusers                                ddim-deploy
=======================================  ===============================================================
images in [-1, 1]                        normalisation mean 0.5, std 0.5 per channel
``beta_schedule`` linear                 schedule ``linear`` (beta_start, beta_end, T)
``beta_schedule`` scaled_linear          schedule ``scaled-linear``
``beta_schedule`` squaredcos_cap_v2      schedule ``cosine`` with cosine_s 0.008 (Nichol & Dhariwal)
``clip_sample``, ``clip_sample_range``   ScheduleConfig ``clip_sample``, ``clip_sample_range``
``prediction_type`` epsilon / sample /   the module returns epsilon: sample and v are converted with
v_prediction                             sqrt(alpha_bar), sqrt(1 - alpha_bar) at t (:class:`DiffusersDenoiser`)
=======================================  ===============================================================
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import numpy as np
import torch

from runtime.config import ConfigError, DiffusersUNetConfig, ModelSpec, NormalizationConfig, ScheduleConfig
from runtime.common.files import read_capped, read_regular
from runtime.common.limits import MAX_BLOCKS, MAX_WIDTH, SizeLimitError, SizeLimits

log = logging.getLogger(__name__)

MODEL_INDEX = "model_index.json"
UNET_CONFIG = "config.json"
UNET_WEIGHTS = "diffusion_pytorch_model.safetensors"
PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"
SCHEDULER_CONFIG = "scheduler_config.json"
LOOKED_FOR = (f"ddim-deploy's config.json + model.safetensors, or a diffusers folder: {MODEL_INDEX}, or a UNet "
              f"folder's {UNET_CONFIG} + {UNET_WEIGHTS}")

# diffusers' beta_schedule -> ours (schedule names are append-only on both sides).
SCHEDULES = {"linear": "linear", "scaled_linear": "scaled-linear", "squaredcos_cap_v2": "cosine"}
GLIDE_COSINE_S = 0.008  # betas_for_alpha_bar's offset: (t + 0.008) / 1.008
PREDICTIONS = ("epsilon", "sample", "v_prediction")
# Schedulers whose config is a DDPM beta schedule (DDIMPipeline converts either with DDIMScheduler.from_config).
SCHEDULER_CLASSES = ("DDPMScheduler", "DDIMScheduler")
# diffusers' defaults (DDPMScheduler and DDIMScheduler agree) for fields an older saved config may lack;
# tests check them against the installed diffusers.
SCHEDULER_DEFAULTS: dict[str, Any] = {
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
    "trained_betas": None, "clip_sample": True, "clip_sample_range": 1.0, "prediction_type": "epsilon",
    "thresholding": False, "timestep_spacing": "leading", "steps_offset": 0, "rescale_betas_zero_snr": False,
}
# A header lists names, dtypes, shapes and offsets (~100 bytes a tensor; a Stable Diffusion UNet has ~700).
MAX_HEADER_BYTES = 16 << 20
FLOAT_DTYPES = ("F32", "F16", "BF16")


class DiffusersFolderError(ConfigError):
    """A diffusers folder this toolkit cannot export; the message names the field and the file."""


@dataclass(frozen=True)
class DiffusersFolder:
    """A checked diffusers folder: where its parts are, and the spec it samples with."""

    path: Path
    unet_dir: Path
    weights: Path
    scheduler_file: Path
    unet: Mapping[str, Any]  # unet config.json as loaded
    scheduler: Mapping[str, Any]  # scheduler_config.json with diffusers' defaults filled in
    parameters: int  # from the safetensors header
    spec: ModelSpec
    diffusers_version: str | None
    notes: tuple[str, ...] = field(default_factory=tuple)  # what is honoured differently, for the report

    @property
    def prediction_type(self) -> str:
        return str(self.scheduler["prediction_type"])


def diffusers_layout(path: Path) -> Literal["pipeline", "unet"] | None:
    """Which diffusers layout ``path`` holds, by its files (None: not a diffusers folder)."""
    if (path / MODEL_INDEX).is_file():
        return "pipeline"
    if (path / UNET_WEIGHTS).is_file() or (path / PICKLED_WEIGHTS).is_file():
        return "unet"
    return None


def read_folder(path: Path, limits: SizeLimits = SizeLimits()) -> DiffusersFolder:
    """Check a diffusers folder from its JSON files and weights header (nothing is loaded); DiffusersFolderError
    naming the field and the file for anything that cannot be sampled exactly here."""
    layout = diffusers_layout(path)
    if layout is None:
        raise DiffusersFolderError(f"{path} is not a model folder: looked for {LOOKED_FOR}")
    index: Mapping[str, Any] = {}
    if layout == "pipeline":
        index = _read_json(path / MODEL_INDEX)
        unet_dir, scheduler_file = _pipeline_parts(path, index)
    else:
        unet_dir, scheduler_file = path, _sibling_scheduler(path)
    weights = unet_dir / UNET_WEIGHTS
    if not weights.is_file():
        pickled = " (diffusion_pytorch_model.bin is a pickle, never loaded here: re-save it with " \
                  "save_pretrained(..., safe_serialization=True))" if (unet_dir / PICKLED_WEIGHTS).is_file() else ""
        raise DiffusersFolderError(f"no {UNET_WEIGHTS} in {unet_dir}{pickled}")
    unet = _read_json(unet_dir / UNET_CONFIG)
    size, channels = _check_unet(unet, unet_dir / UNET_CONFIG, limits)
    scheduler = {**SCHEDULER_DEFAULTS, **_read_json(scheduler_file)}
    schedule, notes = _schedule(scheduler, scheduler_file)
    parameters = count_parameters(weights)
    if parameters > limits.parameters:
        raise SizeLimitError(f"{weights} holds {parameters:,} parameters, more than the limit {limits.parameters:,} "
                             "(raise it with --max-parameters)")
    try:
        model = DiffusersUNetConfig(image_size=size, channels=channels, prediction_type=scheduler["prediction_type"],
                                    unet=dict(unet))
        spec = ModelSpec(model, schedule, NormalizationConfig(mean=(0.5,) * channels, std=(0.5,) * channels))
    except ConfigError as exc:
        raise DiffusersFolderError(f"{unet_dir / UNET_CONFIG}: {exc}") from None
    version = index.get("_diffusers_version") or unet.get("_diffusers_version")
    return DiffusersFolder(path, unet_dir, weights, scheduler_file, unet, scheduler, parameters, spec,
                           str(version) if version is not None else None, tuple(notes))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(read_capped(path, what="diffusers config").decode("utf-8"))
    except FileNotFoundError:
        raise DiffusersFolderError(f"no {path.name} at {path.parent}") from None
    except (ValueError, UnicodeDecodeError) as exc:  # not a regular file, too large, not UTF-8 or not JSON
        raise DiffusersFolderError(f"cannot read {path}: {str(exc).splitlines()[0]}") from None
    except OSError as exc:
        raise DiffusersFolderError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise DiffusersFolderError(f"{path} is not a JSON object")
    return data


def _pipeline_parts(path: Path, index: Mapping[str, Any]) -> tuple[Path, Path]:
    where = path / MODEL_INDEX
    for latent in ("vae", "vqvae"):  # the UNet denoises latents; the runtime samples pixels
        if index.get(latent) not in (None, [None, None]):
            raise DiffusersFolderError(f"{where}: {latent} present: a latent pipeline (its UNet denoises latents "
                                       "that need the decoder); only pixel-space pipelines are supported")
    for part in ("unet", "scheduler"):
        entry = index.get(part)
        if not (isinstance(entry, list) and len(entry) == 2):
            raise DiffusersFolderError(f"{where}: no {part} entry (a pipeline of a UNet2DModel and its scheduler)")
    _check_class(index["unet"][1], where, "unet")
    if index["scheduler"][1] not in SCHEDULER_CLASSES:
        raise DiffusersFolderError(f"{where}: scheduler {index['scheduler'][1]!r} is not supported; allowed: "
                                   f"{', '.join(SCHEDULER_CLASSES)} (a DDPM beta schedule)")
    return path / "unet", path / "scheduler" / SCHEDULER_CONFIG


def _sibling_scheduler(unet_dir: Path) -> Path:
    for candidate in (unet_dir / SCHEDULER_CONFIG, unet_dir.resolve().parent / "scheduler" / SCHEDULER_CONFIG):
        if candidate.is_file():
            return candidate
    raise DiffusersFolderError(f"the noise schedule of {unet_dir} is unknown: no {SCHEDULER_CONFIG} there nor in "
                               f"../scheduler/ (copy the scheduler's {SCHEDULER_CONFIG} beside {UNET_CONFIG})")


def _check_class(name: object, where: Path, what: str) -> None:
    if name == "UNet2DModel":
        return
    why = " (text-conditional: cross-attention)" if isinstance(name, str) and "Condition" in name else ""
    raise DiffusersFolderError(f"{where}: {what} is {name!r}{why}; only unconditional UNet2DModel is supported")


def _check_unet(cfg: Mapping[str, Any], where: Path, limits: SizeLimits) -> tuple[int, int]:
    """The (square) image size and channels of a UNet2DModel config, or DiffusersFolderError."""
    _check_class(cfg.get("_class_name"), where, "_class_name")
    for key in ("num_class_embeds", "class_embed_type"):  # class labels the runtime cannot feed
        if cfg.get(key) is not None:
            raise DiffusersFolderError(f"{where}: {key} {cfg[key]!r}: class-conditional UNets are not supported")
    embedding = cfg.get("time_embedding_type", "positional")
    if embedding != "positional":  # fourier: score-SDE (VE) models; learned: an integer lookup table
        raise DiffusersFolderError(f"{where}: time_embedding_type {embedding!r} is not supported; allowed: positional")
    channels, out = cfg.get("in_channels", 3), cfg.get("out_channels", 3)
    if not _positive_int(channels) or out != channels:
        raise DiffusersFolderError(f"{where}: out_channels {out!r} differs from in_channels {channels!r} (a "
                                   "learned-variance UNet); only noise-predicting UNets with out = in are supported")
    size = cfg.get("sample_size")
    if isinstance(size, list) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not _positive_int(size):
        raise DiffusersFolderError(f"{where}: sample_size {cfg.get('sample_size')!r} must be one size (square images)")
    if size > limits.image_size:
        raise SizeLimitError(f"{where}: sample_size {size} is larger than the limit {limits.image_size} "
                             "(raise it with --max-image-size)")
    _check_structure(cfg, where)
    return size, channels


def _check_structure(cfg: Mapping[str, Any], where: Path) -> None:
    """Bound the module diffusers would build before the weights are read (a config claiming 10**6 layers must
    not take an hour to build): the limits of runtime.common.limits, as for our U-Nets."""
    widths, depth = cfg.get("block_out_channels", [224, 448, 672, 896]), cfg.get("layers_per_block", 2)
    depths = depth if isinstance(depth, list) else [depth]
    if not (isinstance(widths, list) and widths and all(_positive_int(w) for w in widths + depths)):
        raise DiffusersFolderError(f"{where}: block_out_channels and layers_per_block must be positive integers")
    blocks = len(widths) * (2 * max(depths) + 1) + 2  # down, up (one more each) and the middle
    if blocks > MAX_BLOCKS or max(widths) > MAX_WIDTH:
        raise SizeLimitError(f"{where}: the UNet would have {blocks:,} residual blocks and layers {max(widths):,} "
                             f"channels wide; at most {MAX_BLOCKS} and {MAX_WIDTH:,} are supported")


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _schedule(cfg: Mapping[str, Any], where: Path) -> tuple[ScheduleConfig, list[str]]:
    """Our ScheduleConfig for a DDPM/DDIM scheduler config, and notes on what is honoured differently."""
    name = cfg["beta_schedule"]
    if name not in SCHEDULES:
        raise DiffusersFolderError(f"{where}: beta_schedule {name!r} is not supported; allowed: {', '.join(SCHEDULES)}")
    refused = {"trained_betas": cfg["trained_betas"] is not None, "thresholding": cfg["thresholding"] is True,
               "rescale_betas_zero_snr": cfg["rescale_betas_zero_snr"] is True}
    for key, bad in refused.items():
        if bad:
            raise DiffusersFolderError(f"{where}: {key} {json.dumps(cfg[key])[:40]} is not supported")
    if cfg["prediction_type"] not in PREDICTIONS:
        raise DiffusersFolderError(f"{where}: prediction_type {cfg['prediction_type']!r} is not supported; allowed: "
                                   f"{', '.join(PREDICTIONS)}")
    if not isinstance(cfg["clip_sample"], bool):
        raise DiffusersFolderError(f"{where}: clip_sample must be true or false, got {cfg['clip_sample']!r}")
    try:
        schedule = ScheduleConfig(name=SCHEDULES[name], num_timesteps=cfg["num_train_timesteps"],  # type: ignore[arg-type]
                                  beta_start=float(cfg["beta_start"]), beta_end=float(cfg["beta_end"]),
                                  cosine_s=GLIDE_COSINE_S, clip_sample=cfg["clip_sample"],
                                  clip_sample_range=float(cfg["clip_sample_range"]))
    except (ConfigError, TypeError, ValueError) as exc:
        raise DiffusersFolderError(f"{where}: {str(exc).splitlines()[0]}") from None
    notes = []
    if cfg["steps_offset"]:
        notes.append(f"{where.name}: steps_offset {cfg['steps_offset']} not applied (ddim-run's spacings use offset 0)")
    if cfg.get("set_alpha_to_one") is False:
        notes.append(f"{where.name}: set_alpha_to_one false not applied (ddim-run's last step lands on alpha_bar 1)")
    if cfg["timestep_spacing"] != "leading":
        notes.append(f"{where.name}: timestep_spacing {cfg['timestep_spacing']}: sample with ddim-run --spacing "
                     f"{cfg['timestep_spacing']}")
    return schedule, notes


def count_parameters(weights: Path) -> int:
    """Parameters in a safetensors file, from its header alone (nothing is loaded)."""
    try:
        head = read_regular(weights, 8)
        size = int.from_bytes(head[:8], "little") if len(head) >= 8 else -1
        if not 0 < size <= MAX_HEADER_BYTES:
            raise ValueError("no safetensors header")
        header = json.loads(read_regular(weights, 8 + size)[8 : 8 + size])
        total = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in FLOAT_DTYPES or not all(isinstance(d, int) and d >= 0 for d in info["shape"]):
                raise ValueError(f"tensor {name!r} is {info['dtype']} {info['shape']}, not a float weight")
            total += math.prod(info["shape"])
        return total
    except OSError as exc:
        raise DiffusersFolderError(f"cannot read {weights}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DiffusersFolderError(f"corrupt weights file {weights}: {str(exc).splitlines()[0]}") from None


# --------------------------------------------------------------------------- the torch side


def load_denoiser(folder: DiffusersFolder) -> "DiffusersDenoiser":
    """The folder's UNet2DModel (float32, eval) behind our I/O: ``forward(noisy_images, timesteps) -> eps``."""
    try:
        from diffusers import UNet2DModel
    except ImportError:
        from runtime.common.extras import install_hint

        hint = install_hint("diffusers")
        raise DiffusersFolderError(f"reading a diffusers folder needs diffusers: {hint}") from None
    from runtime.schedule import build_schedule

    try:
        # low_cpu_mem_usage off: its default asks for accelerate (a warning without it) to save memory we do not need
        unet = UNet2DModel.from_pretrained(str(folder.unet_dir), use_safetensors=True, local_files_only=True,
                                           torch_dtype=torch.float32, low_cpu_mem_usage=False)
    except Exception as exc:  # diffusers raises many types for a bad folder (OSError, ValueError, EnvironmentError)
        raise DiffusersFolderError(f"cannot load {folder.weights}: {str(exc).strip().splitlines()[0]}") from None
    bad = [name for name, p in unet.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise DiffusersFolderError(f"{folder.weights}: non-finite values in {', '.join(bad[:3])}")
    alphas_cumprod = build_schedule(folder.spec.schedule).alphas_cumprod  # type: ignore[attr-defined]
    return DiffusersDenoiser(unet.eval(), folder.prediction_type, alphas_cumprod).eval()


class DiffusersDenoiser(torch.nn.Module):
    """``forward(noisy_images (N, C, H, W), timesteps (N,) float32) -> predicted noise (N, C, H, W)``.

    A UNet predicting the clean sample or v (Salimans & Ho 2022) is converted to epsilon here, so every
    exported file outputs epsilon and the runtime's one DDIM update serves them all: from
    x_t = sqrt(a) x0 + sqrt(1 - a) eps and v = sqrt(a) eps - sqrt(1 - a) x0, with a = alpha_bar at t,
    eps = (x_t - sqrt(a) x0) / sqrt(1 - a) and eps = sqrt(a) v + sqrt(1 - a) x_t.
    """

    def __init__(self, unet: torch.nn.Module, prediction_type: str, alphas_cumprod: np.ndarray) -> None:
        super().__init__()
        self.unet = unet
        self.prediction_type = prediction_type
        # sqrt(a) and sqrt(1 - a) per step, computed in float64 and stored in float32: 1 - a rounded in float32
        # (a -> 1 at t = 0) would be off by up to 1e-3 relative; only the sample / v conversions read them
        a = np.asarray(alphas_cumprod, dtype=np.float64)
        self.register_buffer("sqrt_a", torch.tensor(np.sqrt(a), dtype=torch.float32), persistent=False)
        self.register_buffer("sqrt_1ma", torch.tensor(np.sqrt(1.0 - a), dtype=torch.float32), persistent=False)

    def forward(self, noisy_images: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        out = self.unet(noisy_images, timesteps).sample
        if self.prediction_type == "epsilon":
            return out
        t = timesteps.round().long()
        sqrt_a, sqrt_1ma = self.sqrt_a[t].view(-1, 1, 1, 1), self.sqrt_1ma[t].view(-1, 1, 1, 1)  # (N, 1, 1, 1)
        if self.prediction_type == "v_prediction":
            return sqrt_a * out + sqrt_1ma * noisy_images
        return (noisy_images - sqrt_a * out) / sqrt_1ma  # sample


def source_info(folder: DiffusersFolder) -> dict[str, Any]:
    """What export_report.json and the ONNX metadata record of where the model came from."""
    from runtime.common.files import sha256_file

    return {"kind": "diffusers", "folder": str(folder.path.resolve()), "diffusers_version": folder.diffusers_version,
            "unet_sha256": sha256_file(folder.weights), "scheduler_config": str(folder.scheduler_file.resolve()),
            "prediction_type": folder.prediction_type, "parameters": folder.parameters}
