"""ddim-export --diffusers: our nets as diffusers DDIMPipeline folders, against our net and against ddim-run.

Parity is measured, never pinned: the UNet2DModel against our DDPM U-Net on the same inputs (relative
error <= 1e-5 of the output's scale, ten times tighter than the export's gate), and DDIMPipeline's images
against ddim-run's from the same noise (x_T, then one draw per step; max difference <= 1e-4 on [0, 1]
pixels). The figures are printed (pytest -s).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

pytest.importorskip("diffusers")

from conftest import tiny_config, write_fashion
from diffusers import DDIMPipeline, UNet2DModel
from diffusers.pipelines.ddim import pipeline_ddim
from diffusers.schedulers import scheduling_ddim

import trainer.diffusers_model  # DDIMDeployUNet folders load only once it is imported
from export.cli import main as export_main
from export.diffusers_unet import to_unet2d, unet2d_mismatch
from export.to_diffusers import export_diffusers, max_difference, scheduler_config
from runtime.exportdir import REPORT
from runtime.cli import main as run_main
from runtime.config import DDPMUNetConfig, KerasUNetConfig, ModelSpec, NormalizationConfig, ScheduleConfig
from runtime.noise import ImageNoise
from runtime.sampler import PlannedStep, SamplerHooks, SamplingPlan, ddim_sample
from runtime.schedule import build_schedule, select_steps, step_coefficients
from trainer.config import DataConfig
from trainer.diffusers_model import DiffusersExportError, grid_alpha_bar
from trainer.models import build_model
from trainer.presets import get_preset
from trainer.rundir import WEIGHTS, write_config
from trainer.train import fit

# [0, 1] pixels after a few float32 steps through two samplers and two nets: measured 4e-7 to 5e-6 (tiny nets),
# 2.2e-5 (cifar10-64); a wrong step, noise draw or timestep shows at 1e-2 or more.
PIXEL_TOLERANCE = 1e-4
# The net against the UNet2DModel, relative to the output's scale: the bound asked of the mapping, tighter than
# the export's gate (export.to_diffusers.TOLERANCE); measured 7e-7 (tiny nets), 2.5e-6 (cifar10-64).
NET_TOLERANCE = 1e-5
LINEAR = ScheduleConfig(name="linear", num_timesteps=1000)
COSINE_ANGLE = ScheduleConfig(name="cosine-angle")


def minus_one_one(channels: int) -> NormalizationConfig:
    return NormalizationConfig((0.5,) * channels, (0.5,) * channels)


def ddpm(**kw: object) -> DDPMUNetConfig:
    base = {"image_size": 16, "channels": 3, "base_width": 16, "channel_mults": (1, 2), "num_res_blocks": 1,
            "attention_resolutions": (8,), "num_groups": 4, "dropout": 0.1, "conditioning": "timestep"}
    return DDPMUNetConfig(**{**base, **kw})


def keras(**kw: object) -> KerasUNetConfig:
    base = {"image_size": 16, "channels": 3, "widths": (8, 16), "block_depth": 1, "embedding_dims": 8}
    return KerasUNetConfig(**{**base, **kw})


def randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """``net`` with its zero-initialised layers (residual outputs, attention projections, the head) and
    BatchNorm statistics given real values, so every path shows in the output."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() > 1 and not p.any():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
    return net.eval()


def write_run(folder: Path, spec: ModelSpec, seed: int = 0) -> Path:
    """A run directory as the trainer leaves it (config.json + EMA and raw weights), random weights; the raw
    weights differ from the EMA ones, so an export of the wrong set fails its gate."""
    torch.manual_seed(seed)
    net = randomised(build_model(spec.model), seed)
    folder.mkdir(parents=True)
    write_config(folder, spec)
    sd = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    raw = {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in sd.items()}
    save_file({**{f"ema.{k}": v for k, v in sd.items()}, **{f"raw.{k}": v for k, v in raw.items()}}, folder / WEIGHTS)
    return folder


def ddim_run(model: Path, tmp: Path, steps: int, eta: float, n: int, seed: int, *extra: str) -> np.ndarray:
    """ddim-run's samples as [0, 1] pixels (N, H, W, C), from its --npz."""
    npz = tmp / f"run-{steps}-{eta}-{seed}.npz"
    result = CliRunner().invoke(run_main, [str(model), "--steps", str(steps), "--eta", str(eta), "--num-images",
                                           str(n), "--seed", str(seed), "--backend", "torch", "--npz", str(npz),
                                           "--out", str(tmp / "grid.png"), "--no-progress", *extra])
    assert result.exit_code == 0, result.output
    spec = ModelSpec.load(model / "config.json")
    mean, std = (np.asarray(v).reshape(1, -1, 1, 1) for v in (spec.normalization.mean, spec.normalization.std))
    return np.clip(np.load(npz)["samples"] * std + mean, 0, 1).transpose(0, 2, 3, 1)


def pipeline_images(folder: Path, monkeypatch: pytest.MonkeyPatch, steps: int, eta: float, n: int, seed: int,
                    **call: object) -> np.ndarray:
    """DDIMPipeline's images (N, H, W, C) in [0, 1], its randn_tensor fed ddim-run's noise streams."""
    noise = ImageNoise(seed, range(n))

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(noise.draw(tuple(shape[1:]))).to(device=device, dtype=dtype)

    monkeypatch.setattr(pipeline_ddim, "randn_tensor", randn_tensor)
    monkeypatch.setattr(scheduling_ddim, "randn_tensor", randn_tensor)
    pipe = DDIMPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=n, num_inference_steps=steps, eta=eta, output_type="np", **call).images


def compare_with_ddim_run(run: Path, folder: Path, tmp: Path, monkeypatch: pytest.MonkeyPatch, label: str,
                          steps: int = 5, n: int = 2, seed: int = 3, **call: object) -> None:
    for eta in (0.0, 1.0):
        ours = ddim_run(run, tmp, steps, eta, n, seed)
        theirs = pipeline_images(folder, monkeypatch, steps, eta, n, seed, **call)
        diff = float(np.abs(theirs - ours).max())
        print(f"{label}: DDIMPipeline vs ddim-run, {steps} steps, eta {eta}: max |pixel diff| {diff:.3g}")
        assert diff <= PIXEL_TOLERANCE, (label, eta, diff)
        assert ours.std() > 0.05  # real images, not a constant: the comparison means something


# --------------------------------------------------------------------------- (a) UNet2DModel parity


@pytest.mark.parametrize("heads", [1, 2])
def test_ddpm_unet_maps_onto_unet2dmodel(heads: int) -> None:
    cfg = ddpm(num_heads=heads, attention_resolutions=(8,))
    spec = ModelSpec(cfg, LINEAR, minus_one_one(3))
    assert unet2d_mismatch(spec) is None
    torch.manual_seed(1)
    net = randomised(build_model(cfg))
    unet = to_unet2d(net)
    assert isinstance(unet, UNet2DModel)
    assert unet.config.attention_head_dim == (None if heads == 1 else 32 // heads)
    max_abs, max_rel = max_difference(lambda x, t: net(x, t.float()), unet, spec, batch=5)
    print(f"UNet2DModel vs DDPMUNet, {heads} head(s): max abs {max_abs:.3g}, max rel {max_rel:.3g}")
    assert max_rel <= NET_TOLERANCE


@pytest.mark.parametrize("spec, why", [
    (ModelSpec(ddpm(num_heads=2, attention_resolutions=(16, 8)), LINEAR, minus_one_one(3)), "attention_head_dim"),
    (ModelSpec(ddpm(channel_mults=(2, 2)), LINEAR, minus_one_one(3)), "first level"),
    (ModelSpec(ddpm(conditioning="noise_variance"), LINEAR, minus_one_one(3)), "noise variance"),
    (ModelSpec(keras(), COSINE_ANGLE, minus_one_one(3)), "BatchNorm"),
])
def test_what_does_not_map_says_why(spec: ModelSpec, why: str) -> None:
    reason = unet2d_mismatch(spec)
    assert reason is not None and why in reason


@pytest.mark.parametrize("schedule", [LINEAR, COSINE_ANGLE], ids=["linear", "cosine-angle"])
def test_scheduler_timesteps_are_ddim_runs_steps(schedule: ScheduleConfig) -> None:
    """"leading" is our "uniform" for every step count; a continuous schedule's "trailing" grid steps t land on
    our uniform times as (t + 1) / 1000 when the count divides 1000."""
    from diffusers import DDIMScheduler

    spec = ModelSpec(keras(), schedule, minus_one_one(3))
    sched = DDIMScheduler(**scheduler_config(spec))
    counts = (1, 7, 50, 999, 1000) if schedule.discrete else (1, 8, 10, 25, 50, 1000)
    for steps in counts:
        sched.set_timesteps(steps)
        ours = select_steps(build_schedule(schedule), steps, "uniform")
        theirs = sched.timesteps.numpy()
        np.testing.assert_array_equal(theirs if schedule.discrete else (theirs + 1) / 1000, ours)


# --------------------------------------------------------------------------- (b) the UNet2DModel folder


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (one-step) trainer run of a timestep-conditioned DDPM U-Net on [-1, 1] Fashion-MNIST-like data."""
    tmp = tmp_path_factory.mktemp("ddpm")
    cfg = dataclasses.replace(
        tiny_config(steps=1, sample_every=1, checkpoint_every=1),
        model=ddpm(image_size=32, channels=1, base_width=8, attention_resolutions=(16,), num_heads=2),
        schedule=LINEAR, data=DataConfig(source="fashion-mnist", normalization="minus-one-one"))
    fit(cfg, tmp / "run", write_fashion(tmp / "fmnist", train=16, test=8), progress=False)
    from safetensors.torch import load_file

    tensors = load_file(tmp / "run" / WEIGHTS)  # one step from zero: give the zero-started layers real weights
    gen = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.05 if v.dim() > 1 and v.abs().max() < 1e-2 else v
               for k, v in tensors.items()}
    (tmp / "run" / WEIGHTS).unlink()  # a hard link to the checkpoint: replace, never write through it
    save_file(tensors, tmp / "run" / WEIGHTS)
    return tmp / "run"


def test_ddpm_run_becomes_a_unet2dmodel_folder_with_ddim_runs_images(ddpm_run: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "diffusers"
    report = export_diffusers(ddpm_run, out)
    print(f"export gate (UNet2DModel, tiny run): max abs {report.max_abs:.3g}, max rel {report.max_rel:.3g}; "
          f"schedule {report.schedule_max_rel:.3g}")
    assert report.kind == "UNet2DModel" and report.same_noise_as_ddim_run
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["diffusers", "UNet2DModel"] and index["scheduler"] == ["diffusers", "DDIMScheduler"]
    assert sorted(p.name for p in out.iterdir()) == ["README.md", REPORT, "model_index.json",
                                                    "scheduler", "unet"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert (sched["beta_schedule"], sched["timestep_spacing"], sched["steps_offset"], sched["set_alpha_to_one"],
            sched["clip_sample"], sched["clip_sample_range"]) == ("linear", "leading", 0, True, False, 1.0)
    assert "DDIMPipeline.from_pretrained" in (out / "README.md").read_text()
    compare_with_ddim_run(ddpm_run, out, tmp_path, monkeypatch, "UNet2DModel (tiny run)")


# --------------------------------------------------------------------------- (c) the custom-model folder


@pytest.mark.parametrize("label, spec, steps, call", [
    ("Keras U-Net, cosine-angle", ModelSpec(keras(), COSINE_ANGLE, minus_one_one(3)), 10, {}),
    ("DDPM U-Net, timestep, unequal head widths",
     ModelSpec(ddpm(num_heads=2, attention_resolutions=(16, 8)), LINEAR, minus_one_one(3)), 5, {}),
    ("DDPM U-Net, noise variance, clipped",
     ModelSpec(ddpm(conditioning="noise_variance"), dataclasses.replace(LINEAR, clip_sample=True), minus_one_one(3)),
     5, {"use_clipped_model_output": True}),
])
def test_other_models_become_a_custom_folder_with_ddim_runs_images(label: str, spec: ModelSpec, steps: int,
                                                                   call: dict, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    run = write_run(tmp_path / "run", spec)
    out = tmp_path / "diffusers"
    report = export_diffusers(run, out)
    print(f"export gate ({label}): max abs {report.max_abs:.3g}; schedule {report.schedule_max_rel:.3g}")
    assert report.kind == "DDIMDeployUNet" and report.same_noise_as_ddim_run
    index = json.loads((out / "model_index.json").read_text())
    assert index["unet"] == ["trainer.diffusers_model", "DDIMDeployUNet"]
    assert "import trainer.diffusers_model" in (out / "README.md").read_text()
    compare_with_ddim_run(run, out, tmp_path, monkeypatch, label, steps=steps, **call)
    if spec.schedule.clip_sample:  # the clipping compared is real: without it the images differ
        unclipped = ddim_run(run, tmp_path, steps, 0.0, 2, 3, "--no-clip-x0")
        assert np.abs(unclipped - ddim_run(run, tmp_path, steps, 0.0, 2, 3)).max() > 1e-2


def test_a_fashion_mnist_normalisation_is_folded_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Dataset-stats normalisation (the fashion-mnist preset's): DDIMPipeline's [-1, 1] sampling is our
    DDIM at the noise levels whose signal-to-noise ratio is A^2 = (2 std)^2 times the scheduler's, started
    from the wrapper's view of x_T (trainer/diffusers_model.py): rebuilt here with the runtime's own loop."""
    norm = NormalizationConfig((0.286,), (0.353,))
    spec = ModelSpec(keras(channels=1), COSINE_ANGLE, norm)
    run = write_run(tmp_path / "run", spec)
    report = export_diffusers(run, tmp_path / "diffusers")
    assert report.kind == "DDIMDeployUNet" and not report.same_noise_as_ddim_run
    net = randomised(build_model(spec.model))
    net.load_state_dict(trainer.diffusers_model.DDIMDeployUNet.from_pretrained(tmp_path / "diffusers" / "unet")
                        .net.state_dict())
    steps, n, seed = 10, 2, 5
    a_grid = grid_alpha_bar(spec, 1000)
    a = a_grid[999 - np.arange(steps) * (1000 // steps)]  # the "trailing" timesteps, noisiest first
    scale, shift = 2 * norm.std[0], 2 * norm.mean[0] - 1
    denom = 1 + (scale**2 - 1) * a
    a_net = scale**2 * a / denom  # the same signal-to-noise ratio times A^2
    for eta in (0.0, 1.0):
        noise = ImageNoise(seed, range(n))
        x_T = (noise.draw((1, 16, 16)) - np.sqrt(a[0]) * shift) / np.sqrt(denom[0])
        prev = np.append(a_net[1:], 1.0)
        plan = SamplingPlan(tuple(PlannedStep(i, 0.0, 1 - a_net[i], step_coefficients(a_net[i], prev[i], eta),
                                              1 - a_net[i]) for i in range(steps)), eta)
        hooks = SamplerHooks(denoise=lambda x, v: net(torch.from_numpy(x), torch.full((n, 1, 1, 1), v)).detach().numpy(),
                             noise_like=lambda x, i: noise.draw((1, 16, 16)))  # noqa: B023
        with torch.no_grad():
            z0 = ddim_sample(x_T.astype(np.float32), plan, hooks)
        ours = np.clip(z0 * norm.std[0] + norm.mean[0], 0, 1).transpose(0, 2, 3, 1)
        theirs = pipeline_images(tmp_path / "diffusers", monkeypatch, steps, eta, n, seed)
        diff = float(np.abs(theirs - ours).max())
        print(f"folded normalisation (Keras, fashion-mnist stats): DDIMPipeline vs the runtime's loop at the "
              f"folded noise levels, eta {eta}: max |pixel diff| {diff:.3g}")
        assert diff <= PIXEL_TOLERANCE and ours.std() > 0.05


# --------------------------------------------------------------------------- (d) the cifar10-64 preset


def test_cifar10_64_preset_at_full_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = get_preset("cifar10-64").config
    spec = cfg.to_spec(minus_one_one(3))
    start = time.perf_counter()
    run = write_run(tmp_path / "run", spec)
    report = export_diffusers(run, tmp_path / "diffusers")
    print(f"cifar10-64 export gate (UNet2DModel, random weights): max abs {report.max_abs:.3g}, max rel "
          f"{report.max_rel:.3g}; schedule {report.schedule_max_rel:.3g}; {time.perf_counter() - start:.1f} s")
    assert report.kind == "UNet2DModel" and report.max_rel <= NET_TOLERANCE
    compare_with_ddim_run(run, tmp_path / "diffusers", tmp_path, monkeypatch, "cifar10-64", steps=3, n=2)
    print(f"cifar10-64 in all: {time.perf_counter() - start:.1f} s")


# --------------------------------------------------------------------------- (e) bad input


def test_refuses_what_no_folder_can_hold(tmp_path: Path) -> None:
    stats = NormalizationConfig((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))  # keras-flowers-like: stds differ
    run = write_run(tmp_path / "run", ModelSpec(keras(), COSINE_ANGLE, stats))
    with pytest.raises(DiffusersExportError, match="stds differ"):
        export_diffusers(run, tmp_path / "out")
    run2 = write_run(tmp_path / "run2", ModelSpec(ddpm(), LINEAR, NormalizationConfig((0.3,) * 3, (0.5,) * 3)))
    with pytest.raises(DiffusersExportError, match="timestep-conditioned"):
        export_diffusers(run2, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.partial-*"))


def test_folder_ownership(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run", ModelSpec(keras(), COSINE_ANGLE, minus_one_one(3)))
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--diffusers .* not an export"):
        export_diffusers(run, foreign, force=True)
    assert (foreign / "notes.txt").read_text() == "mine"
    with pytest.raises(FileExistsError, match="training run directory"):
        export_diffusers(run, run, force=True)
    out = tmp_path / "out"
    export_diffusers(run, out)
    with pytest.raises(FileExistsError, match="--force"):
        export_diffusers(run, out)
    export_diffusers(run, out, raw_weights=True, force=True)  # the gate compares with the raw weights then
    assert json.loads((out / REPORT).read_text())["weights"] == "raw"


def test_custom_folder_names_the_module_to_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers never imports a module because a folder names it: without the import, loading says which."""
    run = write_run(tmp_path / "run", ModelSpec(keras(), COSINE_ANGLE, minus_one_one(3)))
    export_diffusers(run, tmp_path / "out")
    monkeypatch.delitem(sys.modules, "trainer.diffusers_model")
    with pytest.raises(ValueError, match="import trainer.diffusers_model before"):
        DDIMPipeline.from_pretrained(tmp_path / "out")


def test_cli(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    run = write_run(tmp_path / "run", ModelSpec(ddpm(), LINEAR, minus_one_one(3)))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        result = CliRunner().invoke(export_main, [str(run), "--diffusers", str(out)])
    assert result.exit_code == 0, result.output
    assert "unet: UNet2DModel" in caplog.text and (out / "model_index.json").is_file()
    assert not list(out.glob("*.onnx"))
    bad = CliRunner().invoke(export_main, [str(run), "--diffusers", str(tmp_path / "x"), "--fp16"])
    assert bad.exit_code != 0 and "--fp16" in bad.output and not (tmp_path / "x").exists()
    missing = CliRunner().invoke(export_main, [str(tmp_path / "nope"), "--diffusers", str(tmp_path / "y")])
    assert missing.exit_code == 1 and missing.output.count("\n") == 1 and not (tmp_path / "y").exists()
    flowers = write_run(tmp_path / "flowers", ModelSpec(keras(), COSINE_ANGLE,
                                                        NormalizationConfig((0.5, 0.4, 0.3), (0.25, 0.2, 0.3))))
    refused = CliRunner().invoke(export_main, [str(flowers), "--diffusers", str(tmp_path / "z")])
    assert refused.exit_code == 1 and refused.output.startswith("error: the normalisation's stds differ")
    assert refused.output.count("\n") == 1 and not (tmp_path / "z").exists()


def test_round_trip_ours_to_diffusers_and_back_samples_the_same_images(ddpm_run: Path, tmp_path: Path) -> None:
    """Our run -> ddim-export --diffusers -> ddim-export of that folder (the import) -> ddim-run: the same
    samples as ddim-run of our own export of the run. Both directions, both gates, one check."""
    import onnx

    from export.cli import main as export_main
    from runtime.metadata import spec_from_metadata

    folder, ours, back = tmp_path / "diffusers", tmp_path / "ours", tmp_path / "back"
    for args in ([str(ddpm_run), "--diffusers", str(folder)], [str(ddpm_run), "--out", str(ours)],
                 [str(folder), "--out", str(back)]):
        result = CliRunner().invoke(export_main, args)
        assert result.exit_code == 0, result.output
    meta = {p.key: p.value for p in onnx.load(str(back / "model.onnx")).metadata_props}
    spec_back = spec_from_metadata(meta, "model.onnx")
    assert spec_back.model.architecture == "diffusers"
    spec = ModelSpec.load(ddpm_run / "config.json")
    # diffusers always states a clip range (1.0); ours leaves it to the normalisation, here the same [-1, 1]
    assert dataclasses.replace(spec_back.schedule, clip_sample_range=None) == spec.schedule
    assert spec_back.clip_bounds() == spec.clip_bounds()
    for eta in ("0", "1"):
        samples = []
        for model in (ours, back):
            npz = tmp_path / f"{model.name}-{eta}.npz"
            result = CliRunner().invoke(run_main, [str(model), "--steps", "6", "--eta", eta, "--num-images", "3",
                                                   "--seed", "5", "--backend", "onnxruntime", "--device", "cpu",
                                                   "--npz", str(npz), "--out", str(tmp_path / "g.png"),
                                                   "--no-progress"])
            assert result.exit_code == 0, result.output
            samples.append(np.load(npz)["samples"])
        diff = float(np.abs(samples[0] - samples[1]).max())
        print(f"round trip ours -> diffusers -> ours, eta {eta}: max |diff| of the samples {diff:.2e}")
        assert diff <= PIXEL_TOLERANCE  # model space [-1, 1]: twice the pixel scale
