"""The README.md model card of a ``ddim-export --diffusers`` folder: what it holds and how to load it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runtime import __version__
from runtime.config import ModelSpec

if TYPE_CHECKING:
    from export.to_diffusers import DiffusersReport


def model_card(spec: ModelSpec, report: DiffusersReport, info: dict[str, str]) -> str:
    """Markdown for the folder's README.md."""
    m, s = spec.model, spec.schedule
    custom = report.kind == "DDIMDeployUNet"
    schedule = f"{s.name} (T = {s.num_timesteps})" if s.discrete else f"{s.name} (continuous time)"
    clip = ", use_clipped_model_output=True" if s.clip_sample else ""
    checked = ("the folder, loaded back, computes what the wrapper around our net computes" if custom else
               f"the UNet2DModel, loaded back, agrees with our net to {report.max_rel:.2g} of its output scale")
    lines = [
        f"# {info['source_run']}: a ddim-deploy model as a diffusers DDIMPipeline",
        "",
        f"Written by `ddim-export --diffusers` (ddim-deploy {__version__}) from the run `{info['source_run']}`, "
        f"{info['weights']} weights.",
        "",
        f"- Model: the {m.architecture} U-Net, {m.image_size}x{m.image_size}x{m.channels}, conditioned on "
        f"{m.conditioning.replace('_', ' ')}; schedule {schedule}.",
        f"- `unet/`: a `{report.kind}`: {report.why}.",
        f"- Checked before writing: {checked} (max abs difference {report.max_abs:.2g}); the scheduler's "
        f"alpha_bar agrees with ours to {report.schedule_max_rel:.2g} relative.",
        "",
        "## Load and sample",
        "",
        "```python",
        *(["import trainer.diffusers_model  # ddim-deploy's DDIMDeployUNet: diffusers loads it only once imported"]
          if custom else []),
        "from diffusers import DDIMPipeline",
        "",
        'pipe = DDIMPipeline.from_pretrained("PATH/TO/THIS/FOLDER")',
        f'images = pipe(batch_size=16, num_inference_steps=50, eta=0.0{clip}, output_type="np").images',
        "```",
        "",
    ]
    if custom:
        lines += ["The `unet` entry of `model_index.json` names `trainer.diffusers_model.DDIMDeployUNet`, so this "
                  "folder needs ddim-deploy (with torch and diffusers) installed; no code is in the folder and no "
                  "`trust_remote_code` is needed. diffusers warns that the unet is not a UNet2DModel: expected.", ""]
    if report.same_noise_as_ddim_run:
        steps = "any number of steps" if s.discrete else "a number of steps dividing 1000"
        lines += [f"Fed the same noise (x_T, then one draw per step for eta > 0), `pipe(num_inference_steps=S, "
                  f"eta=E{clip})` gives the images of `ddim-run {info['source_run']} --steps S --eta E` for "
                  f"{steps} (ddim-run's default spacing `uniform` is the scheduler's "
                  f"`{'leading' if s.discrete else 'trailing'}` here).", ""]
    lines += [f"Clipping of the predicted clean image is {'on' if s.clip_sample else 'off'} by default, as in "
              "ddim-run; ddim-run's `--clip-x0` is `DDIMScheduler.from_config(pipe.scheduler.config, "
              "clip_sample=True)` plus `use_clipped_model_output=True` in the call (ddim-run recomputes the noise "
              "from the clipped image).", ""]
    if report.notes:
        lines += ["## Notes", "", *(f"- {note}" for note in report.notes), ""]
    return "\n".join(lines)
