"""``ddim-export RUN --diffusers OUT``: a trainer run as a diffusers ``DDIMPipeline`` folder.

Two kinds of folder; :func:`export_diffusers` picks one and says why (``DiffusersReport.kind`` / ``why``):

- ``UNet2DModel``: the DDPM-style U-Net conditioned on timesteps is diffusers' UNet2DModel layer for
  layer (``export/diffusers_unet.py``); the folder needs nothing of ours to load.
- ``DDIMDeployUNet``: anything else (the Keras U-Net, noise-variance conditioning, the continuous
  cosine-angle schedule) is wrapped by ``trainer.diffusers_model.DDIMDeployUNet``; ``model_index.json``
  names that module, which must be imported before ``from_pretrained`` (no ``trust_remote_code``, no code
  in the folder).

Both hold ``scheduler/`` (a DDIMScheduler holding our schedule, :func:`scheduler_config`),
``model_index.json``, all written by diffusers' own ``save_pretrained``, plus ``README.md`` and
``export_report.json``. The report is written last, lists every file written, and marks the folder complete
and ours: the folder follows ``export/pipeline.py``'s rules (staged in ``.NAME.partial-PID``, committed by one
rename under the folder's lock; only an earlier export of ours holding only the files its report lists is
replaced, and only with ``--force``).

The gate: the folder is loaded back with ``DDIMPipeline.from_pretrained`` before the commit; its unet
must agree with our net on noisy images at timesteps spread over the schedule (relative error <=
:data:`TOLERANCE`) and its scheduler's alpha_bar with ours (<= :data:`SCHEDULE_TOLERANCE`), or nothing
is written.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from export.diffusers_card import model_card
from export.diffusers_unet import to_unet2d, unet2d_mismatch
from export.parity import FP32_TOLERANCE
from export.pipeline import ParityError, export_folder
from runtime.exportdir import REPORT, REPORT_FILES, written_files
from runtime import __version__
from runtime.config import ModelSpec
from runtime.common.files import replace_dir, sha256_file
from runtime.common.limits import SizeLimits
from trainer.diffusers_model import (
    CONTINUOUS_GRID, DDIMDeployUNet, DiffusersExportError, folds, grid_alpha_bar, grid_size, pixel_affine,
)
from trainer.rundir import WEIGHTS, load_model

log = logging.getLogger(__name__)

Kind = Literal["UNet2DModel", "DDIMDeployUNet"]
# float32 through two implementations that order their sums differently (SDPA vs bmm, Linear vs 1x1 conv):
# measured 7e-7 (tiny nets) to 4.4e-6 (cifar10-128, celebahq-64 at full size, random weights) of the output's
# scale; a wrong weight or head layout shows at 1e-2 or more. The ONNX float32 gate's tolerance, 20x margin.
TOLERANCE = FP32_TOLERANCE
# diffusers keeps alpha_bar in float32 (a cumulative product of 1,000 float32 factors): ~1e-6 relative.
SCHEDULE_TOLERANCE = 1e-4
# Our schedule names -> DDIMScheduler's beta_schedule (the cosine one only with its fixed s = 0.008).
BETA_SCHEDULES = {"linear": "linear", "scaled-linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}


@dataclass
class DiffusersReport:
    """Which folder was written, why, and how well it agrees with our net."""

    out: Path
    kind: Kind
    why: str
    max_abs: float = float("nan")
    max_rel: float = float("nan")
    schedule_max_rel: float = float("nan")
    same_noise_as_ddim_run: bool = True  # False where the normalisation was folded in (other noise levels)
    notes: list[str] = field(default_factory=list)


def export_diffusers(run_dir: Path, out: Path, raw_weights: bool = False, force: bool = False,
                     limits: SizeLimits = SizeLimits()) -> DiffusersReport:
    """Write the model of ``run_dir`` as a DDIMPipeline folder ``out`` (see the module docstring)."""
    with export_folder(out, force, "--diffusers") as out:
        return _export(run_dir, out, "raw" if raw_weights else "ema", limits)


def _export(run_dir: Path, out: Path, weights: str, limits: SizeLimits) -> DiffusersReport:
    net, spec = load_model(run_dir, weights, limits)
    report = plan(spec, out)  # refuses what no folder can hold before anything is written
    log.info("unet: %s: %s", report.kind, report.why)
    unet, reference = _unet(net, spec, report.kind)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        from diffusers import DDIMPipeline, DDIMScheduler

        scheduler = DDIMScheduler(**scheduler_config(spec))
        DDIMPipeline(unet=unet, scheduler=scheduler).save_pretrained(staging, safe_serialization=True)
        _gate(staging, spec, reference, report)
        info = {"source_run": run_dir.resolve().name, "weights": weights,
                "weights_sha256": sha256_file(run_dir / WEIGHTS)}
        (staging / "README.md").write_text(model_card(spec, report, info))
        summary = {**_summary(report, info), REPORT_FILES: written_files(staging)}  # what --force may replace later
        (staging / REPORT).write_text(json.dumps(summary, indent=2) + "\n")  # last: complete
        replace_dir(staging, out)  # fsyncs the subfolders diffusers wrote too
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def plan(spec: ModelSpec, out: Path) -> DiffusersReport:
    """Which folder ``spec``'s model becomes and why; DiffusersExportError for a model no folder can hold."""
    mismatch = unet2d_mismatch(spec)
    if spec.model.architecture not in ("keras", "ddpm"):
        raise DiffusersExportError(f"{mismatch}; export the original model instead")
    folded = folds(spec)  # refuses normalisations that cannot be folded in
    clip_range(spec)  # refuses a clip range diffusers cannot express
    if mismatch is None:
        report = DiffusersReport(out, "UNet2DModel", "its layers are UNet2DModel's (timestep-conditioned DDPM U-Net)")
    else:
        report = DiffusersReport(out, "DDIMDeployUNet", f"not a UNet2DModel: {mismatch}")
    if folded:
        report.same_noise_as_ddim_run = False
        report.notes.append(
            f"the normalisation (mean {_floats(spec.normalization.mean)}, std {_floats(spec.normalization.std)}) is "
            "folded into the wrapper: DDIMPipeline samples the model's distribution, but at other noise levels "
            "than ddim-run, so the same noise gives other images")
    if not spec.schedule.discrete:
        report.notes.append(
            f"the continuous {spec.schedule.name!r} schedule is written on a grid of {CONTINUOUS_GRID} steps "
            "(trained_betas, timestep_spacing 'trailing'): num_inference_steps dividing "
            f"{CONTINUOUS_GRID} gives ddim-run's uniform times exactly, other counts a nearby grid")
    return report


def _floats(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def _unet(net: torch.nn.Module, spec: ModelSpec, kind: Kind) -> tuple[torch.nn.Module,
                                                                      Callable[[torch.Tensor, torch.Tensor], Any]]:
    """The diffusers model to save, and what the reloaded one must agree with: ``(x, t) -> noise``."""
    if kind == "UNet2DModel":
        return to_unet2d(net), lambda x, t: net(x, t.float())
    m = spec.model
    wrapper = DDIMDeployUNet(spec=spec.to_dict(), sample_size=m.image_size, in_channels=m.channels,
                             out_channels=m.channels, num_train_timesteps=grid_size(spec))
    wrapper.net.load_state_dict(net.state_dict())
    wrapper.eval()
    # The reloaded wrapper against the one in memory: the saved weights and config, and the import by name.
    return wrapper, lambda x, t: wrapper(x, t).sample


def clip_range(spec: ModelSpec) -> float:
    """DDIMScheduler's ``clip_sample_range`` for our clip bounds, in its [-1, 1] pixels; DiffusersExportError
    where they are not one symmetric range for every channel (diffusers clips to [-r, r])."""
    scale, shift = pixel_affine(spec.normalization)
    lo, hi = (scale * np.asarray(b) + shift for b in spec.clip_bounds())
    r = float(hi.max())
    if not (np.allclose(hi, r, rtol=1e-6, atol=1e-9) and np.allclose(lo, -r, rtol=1e-6, atol=1e-9)):
        raise DiffusersExportError(f"the clip bounds {np.round(lo, 4).tolist()} .. {np.round(hi, 4).tolist()} (in "
                                   "[-1, 1] pixels) are not one symmetric range, which is all DDIMScheduler clips to")
    return r


def scheduler_config(spec: ModelSpec) -> dict[str, Any]:
    """A DDIMScheduler config sampling as ddim-run does: alpha_bar = 1 after the last step, epsilon
    prediction, timesteps "leading" with offset 0 (= our "uniform"; "trailing" for a continuous schedule on
    its grid), clipping as the model's ``clip_sample`` says (ddim-run's default)."""
    s = spec.schedule
    grid = grid_size(spec)
    cfg: dict[str, Any] = {
        "num_train_timesteps": grid, "clip_sample": s.clip_sample, "clip_sample_range": clip_range(spec),
        "set_alpha_to_one": True, "steps_offset": 0, "prediction_type": "epsilon", "thresholding": False,
        "timestep_spacing": "leading" if s.discrete else "trailing", "rescale_betas_zero_snr": False,
    }
    named = BETA_SCHEDULES.get(s.name)
    if named is not None and not (s.name == "cosine" and s.cosine_s != 0.008):
        cfg.update(beta_schedule=named, beta_start=s.beta_start, beta_end=s.beta_end)
    else:  # the cosine-angle schedule on its grid, or a cosine schedule with another s: the betas themselves
        a = grid_alpha_bar(spec, grid)
        cfg["trained_betas"] = (1.0 - a / np.append(1.0, a[:-1])).tolist()
    return cfg


def _gate(staging: Path, spec: ModelSpec, reference: Callable[[torch.Tensor, torch.Tensor], Any],
          report: DiffusersReport) -> None:
    from diffusers import DDIMPipeline

    with quiet_diffusers():
        loaded = DDIMPipeline.from_pretrained(staging, low_cpu_mem_usage=False)  # as users load it, by name
    report.max_abs, report.max_rel = max_difference(reference, loaded.unet, spec)
    log.info("parity: the reloaded %s against our net: max abs error %.3g, max relative error %.3g (tolerance %g)",
             report.kind, report.max_abs, report.max_rel, TOLERANCE)
    if not report.max_rel <= TOLERANCE:
        raise ParityError(f"parity gate failed: the diffusers {report.kind} differs from our net by "
                          f"{report.max_rel:.3g} relative (max abs {report.max_abs:.3g}; tolerance {TOLERANCE:g}); "
                          "nothing was written")
    ours = grid_alpha_bar(spec, loaded.scheduler.config.num_train_timesteps)
    theirs = loaded.scheduler.alphas_cumprod.double().numpy()
    report.schedule_max_rel = float(np.abs(theirs / ours - 1.0).max())
    if not report.schedule_max_rel <= SCHEDULE_TOLERANCE:
        raise ParityError(f"schedule gate failed: the DDIMScheduler's alpha_bar differs from ours by "
                          f"{report.schedule_max_rel:.3g} relative (tolerance {SCHEDULE_TOLERANCE:g}); "
                          "nothing was written")


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
    """diffusers' loading bar and its warnings off for the gate's reload (the unet type warning of a
    DDIMDeployUNet folder is expected), restored after."""
    from diffusers.utils import logging as dlog

    verbosity, bar = dlog.get_verbosity(), dlog.is_progress_bar_enabled()
    dlog.set_verbosity_error()
    dlog.disable_progress_bar()
    try:
        yield
    finally:
        dlog.set_verbosity(verbosity)
        if bar:
            dlog.enable_progress_bar()


def max_difference(reference: Callable[[torch.Tensor, torch.Tensor], Any], unet: torch.nn.Module, spec: ModelSpec,
                   batch: int = 4, seed: int = 0) -> tuple[float, float]:
    """``unet(x, t).sample`` (as DDIMPipeline calls it) against ``reference(x, t)`` on noisy images at integer
    timesteps spread over the schedule, both ends included: ``(max abs, max abs / max(max|reference|, 1))``,
    the parity gate's measure (``export/parity.py``)."""
    m, grid = spec.model, grid_size(spec)
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, grid - 1, batch).round().to(torch.int64)
    a = torch.from_numpy(grid_alpha_bar(spec, grid)[t.numpy()]).float().view(-1, 1, 1, 1)
    x0, eps = torch.randn((2, batch, m.channels, m.image_size, m.image_size), generator=gen)
    x = a.sqrt() * x0 + (1 - a).sqrt() * eps  # x_t as the sampler meets it
    with torch.no_grad():
        ref = reference(x, t).double()
        got = unet(x, t).sample.double()
    max_abs = float((got - ref).abs().max())
    return max_abs, max_abs / max(float(ref.abs().max()), 1.0)


def _summary(report: DiffusersReport, info: dict[str, str]) -> dict[str, Any]:
    import diffusers

    return {"format": "diffusers", "kind": report.kind, "why": report.why, **info,
            "toolkit_version": __version__, "diffusers_version": diffusers.__version__,
            "parity": {"max_abs": report.max_abs, "max_rel": report.max_rel, "tolerance": TOLERANCE},
            "schedule_max_rel": report.schedule_max_rel, "same_noise_as_ddim_run": report.same_noise_as_ddim_run,
            "notes": report.notes}
