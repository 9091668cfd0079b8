"""ddim-export of a diffusers folder: peer parity with diffusers' own DDIMPipeline, the schedules, the refusals.

The peer test runs the real command lines (``ddim-export``, then ``ddim-run --npz``) on a small randomly
initialised UNet2DModel saved with ``save_pretrained``, and diffusers' real ``DDIMPipeline.__call__`` on the
same UNet, fed the runtime's own x_T and per-step noises (``randn_tensor`` hands out the draws of
``runtime.noise.ImageNoise`` in the runtime's order: x_T first, then one draw per stochastic step).

What is compared: the float samples de-normalised to diffusers' image scale (x / 2 + 0.5, [0, 1] for
images in range), before any clamping or quantisation: ours from the npz, diffusers' as the last
``scheduler.step``'s ``prev_sample`` (recorded by wrapping the real step; the pipeline's own output is
clamped to [0, 1], which hides the saturated pixels), as ``max|ours - diffusers| / max(1, max|diffusers|)``:
absolute where clipping keeps the samples in range, relative to the scale where an unclipped random
network drives them to 1e2-1e4. The pipeline's clamped ``output_type="np"`` images are compared too.
Bound: 1e-4 (float32). What remains is diffusers' float32 schedule (its alphas_cumprod carry relative
errors up to 1.3e-5 at the noisy end of squaredcos_cap_v2, against our float64) and ONNX Runtime
against eager PyTorch (~1e-6).
"""

from __future__ import annotations

import inspect
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

diffusers = pytest.importorskip("diffusers")

import diffusers.pipelines.ddim.pipeline_ddim as pipeline_ddim  # noqa: E402
import diffusers.schedulers.scheduling_ddim as scheduling_ddim  # noqa: E402
import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm  # noqa: E402
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from export import cli as export_cli  # noqa: E402
from export.from_diffusers import SCHEDULER_DEFAULTS, read_folder  # noqa: E402
from runtime import cli as run_cli  # noqa: E402
from runtime.config import ScheduleConfig  # noqa: E402
from runtime.noise import ImageNoise  # noqa: E402
from runtime.schedule import build_schedule, cosine_betas, linear_betas, scaled_linear_betas  # noqa: E402

TOLERANCE = 1e-4
SEED, IMAGES, STEPS = 7, 4, 20
TINY_UNET = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 layers_per_block=1, norm_num_groups=8)
# One pipeline folder per beta schedule; clip_sample differs so that ddim-run's default is seen to follow it.
SCHEDULERS = {"linear": dict(beta_schedule="linear", clip_sample=True),
              "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2", clip_sample=False)}
FIGURES: dict[str, float] = {}


def tiny_unet(seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    return UNet2DModel(**TINY_UNET).eval()


def save_pipeline(folder: Path, unet: UNet2DModel, **scheduler: object) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)).save_pretrained(str(folder))
    return folder


def invoke(main, *args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


@pytest.fixture(scope="module", params=sorted(SCHEDULERS))
def exported(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    folder = save_pipeline(tmp / "pipe", tiny_unet(), **SCHEDULERS[request.param])
    out = tmp / "export"
    result = invoke(export_cli.main, folder, "--out", out, *(["--fp16"] if request.param == "linear" else []))
    assert result.exit_code == 0, result.stderr
    return SimpleNamespace(name=request.param, folder=folder, out=out, tmp=tmp)


def ours(exported, spacing: str, eta: float, clip: bool | None) -> np.ndarray:
    npz = exported.tmp / f"{spacing}-{eta}-{clip}.npz"
    flag = [] if clip is None else ["--clip-x0" if clip else "--no-clip-x0"]
    result = invoke(run_cli.main, exported.out, "--steps", STEPS, "--num-images", IMAGES, "--seed", SEED,
                    "--eta", eta, "--spacing", spacing, "--device", "cpu", "--no-progress", "--npz", npz,
                    "--out", exported.tmp / "grid.png", *flag)
    assert result.exit_code == 0, result.stderr
    return np.load(npz)["samples"]  # (N, C, H, W), model space: diffusers' [-1, 1]


def theirs(folder: Path, spacing: str, eta: float, clip: bool, monkeypatch, next_listed: bool = False):
    """diffusers' DDIMPipeline on the folder's UNet and scheduler config, fed the runtime's noise: the last
    step's unclamped prev_sample and the pipeline's own (clamped) images."""
    config = DDPMScheduler.load_config(str(folder / "scheduler"))
    scheduler = DDIMScheduler.from_config(config, timestep_spacing=spacing, set_alpha_to_one=True, clip_sample=clip)
    pipe = DDIMPipeline(unet=UNet2DModel.from_pretrained(str(folder / "unet")).eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    noise = ImageNoise(SEED, range(IMAGES))

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        assert shape[0] == IMAGES
        return torch.from_numpy(noise.draw(tuple(shape[1:])))

    monkeypatch.setattr(pipeline_ddim, "randn_tensor", randn_tensor)
    monkeypatch.setattr(scheduling_ddim, "randn_tensor", randn_tensor)
    last = []
    real_step = pipe.scheduler.step

    def step(model_output, timestep, sample, **kwargs):
        out = (_step_to_next_listed if next_listed else _plain_step)(pipe.scheduler, real_step, model_output,
                                                                     timestep, sample, **kwargs)
        last[:] = [out.prev_sample]
        return out

    pipe.scheduler.step = step
    with torch.no_grad():
        images = pipe(batch_size=IMAGES, eta=eta, num_inference_steps=STEPS, output_type="np",
                      use_clipped_model_output=clip or None).images
    return last[0].numpy(), images


def _plain_step(scheduler, real_step, model_output, timestep, sample, **kwargs):
    listed = scheduler.timesteps.tolist()
    i = listed.index(int(timestep))
    stride_prev = int(timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    # leading and trailing (20 of 1000): diffusers' stride lands on the next listed step, as our plan does
    assert stride_prev == (listed[i + 1] if i + 1 < len(listed) else stride_prev) and (i + 1 < len(listed)
                                                                                       or stride_prev < 0)
    return real_step(model_output, timestep, sample, **kwargs)


def _step_to_next_listed(scheduler, real_step, model_output, timestep, sample, **kwargs):
    """The real step, reading alpha_bar_prev at the next listed timestep (where our plan steps to) instead
    of at t - T // S: for linspace the two differ (diffusers issues #12633 and #11347; open in 0.42.1).
    The table entry diffusers reads is swapped for the duration of the call."""
    listed = scheduler.timesteps.tolist()
    i = listed.index(int(timestep))
    read = int(timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    table = scheduler.alphas_cumprod
    if i + 1 < len(listed):
        assert read >= 0, "the next listed step exists, so diffusers must read a table entry"
        patched = table.clone()
        patched[read] = table[listed[i + 1]]
        scheduler.alphas_cumprod = patched
    try:
        return real_step(model_output, timestep, sample, **kwargs)
    finally:
        scheduler.alphas_cumprod = table


def difference(ours_x: np.ndarray, theirs_x: np.ndarray) -> float:
    """max |a - b| / max(1, max |b|) of the samples at diffusers' image scale (x / 2 + 0.5)."""
    a, b = ours_x.astype(np.float64) / 2 + 0.5, theirs_x.astype(np.float64) / 2 + 0.5
    return float(np.abs(a - b).max() / max(1.0, np.abs(b).max()))


@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_peer_parity_with_diffusers_ddim_pipeline(exported, spacing, eta, clip, monkeypatch):
    default = SCHEDULERS[exported.name]["clip_sample"] == clip
    got = ours(exported, spacing, eta, None if default else clip)  # the config's clip_sample is the default
    linspace = spacing == "linspace"
    ref, images = theirs(exported.folder, spacing, eta, clip, monkeypatch, next_listed=linspace)
    diff = difference(got, ref)
    clamped = float(np.abs(np.clip(got / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) - images).max())
    case = f"{exported.name} {spacing} eta={eta:g} {'clip' if clip else 'noclip'}"
    FIGURES[case] = diff
    line = f"peer parity {case}: {diff:.3g} (clamped images {clamped:.3g}; scale {np.abs(ref).max():.3g})"
    if linspace:
        unpatched, _ = theirs(exported.folder, spacing, eta, clip, monkeypatch)
        line += f"; against diffusers' own linspace stride: {difference(got, unpatched):.3g}"
    print(line)
    assert diff <= TOLERANCE and clamped <= TOLERANCE, line


def test_export_records_the_source_and_keeps_the_timestep_embedding_in_float32(exported):
    import onnx

    from export.onnx_graph import embedding_nodes
    from runtime.files import sha256_file

    report = json.loads((exported.out / "export_report.json").read_text())
    source = report["source"]
    assert source["kind"] == "diffusers" and source["diffusers_version"] == diffusers.__version__
    assert source["unet_sha256"] == sha256_file(exported.folder / "unet" / "diffusion_pytorch_model.safetensors")
    graph = onnx.load(str(exported.out / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["noisy_images", "timesteps"]
    assert [d.dim_param or d.dim_value for d in graph.input[1].type.tensor_type.shape.dim] == ["batch"]
    if exported.name != "linear":
        return
    half = onnx.shape_inference.infer_shapes(onnx.load(str(exported.out / "model.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in list(half.graph.value_info) + list(half.graph.input)}
    embed = set(embedding_nodes(half.graph))
    trig = [n for n in half.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and all(n.name in embed for n in trig)
    for node in trig:  # the angles reach 999 radians: float32 from timesteps up to Sin / Cos
        assert types.get(node.input[0]) == onnx.TensorProto.FLOAT, node.name
    assert report["float32_in_fp16"][0].startswith("embedding path (") and "Sin" in report["float32_in_fp16"][0]


# --------------------------------------------------------------------------- schedules


def test_cosine_is_diffusers_squaredcos_cap_v2_to_1e12(monkeypatch):
    """diffusers' own betas_for_alpha_bar, its float64 values captured before its float32 cast."""
    monkeypatch.setattr(scheduling_ddpm, "torch", SimpleNamespace(
        tensor=lambda data, dtype=None: np.asarray(data, dtype=np.float64), float32=None))
    for T in (50, 1000, 4000):
        theirs_betas = scheduling_ddpm.betas_for_alpha_bar(T)
        np.testing.assert_allclose(cosine_betas(T, 0.008), theirs_betas, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name,ours_fn", [("linear", linear_betas), ("scaled_linear", scaled_linear_betas)])
def test_linear_schedules_match_diffusers(name, ours_fn):
    """diffusers computes these with torch.linspace in float32: the formula is checked in float64 to 1e-15, the
    float32 betas diffusers uses to one float32 rounding (relative 2**-23 ~ 1.2e-7, two of them for the square)."""
    start, end, T = 0.00085, 0.012, 1000
    ours_betas = ours_fn(T, start, end)
    if name == "linear":
        f64 = torch.linspace(start, end, T, dtype=torch.float64).numpy()
    else:
        f64 = (torch.linspace(start**0.5, end**0.5, T, dtype=torch.float64) ** 2).numpy()
    np.testing.assert_allclose(ours_betas, f64, rtol=1e-15, atol=0)
    f32 = DDPMScheduler(num_train_timesteps=T, beta_start=start, beta_end=end, beta_schedule=name).betas.double()
    np.testing.assert_allclose(ours_betas, f32.numpy(), rtol=3 * 2.0**-24 * (1 if name == "linear" else 2), atol=0)


def test_alphas_cumprod_agree_to_float32_accumulation():
    """Our float64 alpha_bar against diffusers' float32 cumprod: what the peer test's residual comes from."""
    for theirs_name, ours_name in (("linear", "linear"), ("squaredcos_cap_v2", "cosine")):
        ref = DDIMScheduler(beta_schedule=theirs_name).alphas_cumprod.double().numpy()
        got = build_schedule(ScheduleConfig(name=ours_name)).alphas_cumprod  # type: ignore[attr-defined]
        rel = float((np.abs(got - ref) / got).max())
        print(f"alphas_cumprod {theirs_name}: max relative difference {rel:.3g}")
        assert rel < 5e-5


def test_scheduler_defaults_are_diffusers_defaults():
    """Fields an older scheduler_config.json may lack take diffusers' own defaults."""
    for cls in (DDPMScheduler, DDIMScheduler):
        params = inspect.signature(cls.__init__).parameters
        for key, value in SCHEDULER_DEFAULTS.items():
            assert params[key].default == value, (cls.__name__, key)


def test_a_bare_unet_folder_takes_the_sibling_scheduler(tmp_path):
    folder = save_pipeline(tmp_path / "pipe", tiny_unet(), beta_schedule="squaredcos_cap_v2", clip_sample=True,
                           clip_sample_range=2.0, steps_offset=1, timestep_spacing="trailing")
    whole, bare = read_folder(folder), read_folder(folder / "unet")
    assert whole.spec == bare.spec and bare.scheduler_file == folder / "scheduler" / "scheduler_config.json"
    schedule = whole.spec.schedule
    assert (schedule.name, schedule.cosine_s, schedule.clip_sample, schedule.clip_sample_range) == \
        ("cosine", 0.008, True, 2.0)
    assert whole.spec.normalization.mean == (0.5,) * 3 and whole.spec.model.conditioning == "timestep"
    assert whole.parameters == sum(p.numel() for p in tiny_unet().parameters())
    assert any("steps_offset 1" in n for n in whole.notes) and any("--spacing trailing" in n for n in whole.notes)
    shutil.rmtree(folder / "scheduler")
    (folder / "unet" / "scheduler_config.json").write_text(json.dumps({"_class_name": "DDPMScheduler"}))
    assert read_folder(folder / "unet").spec.schedule.name == "linear"


# --------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    return save_pipeline(tmp_path_factory.mktemp("good") / "pipe", tiny_unet(), beta_schedule="linear")


def _edit(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text())
    path.write_text(json.dumps({**data, **changes}))


def _bare_unet_alone(folder: Path) -> Path:
    shutil.rmtree(folder / "scheduler")
    (folder / "model_index.json").unlink()
    return folder / "unet"


def _pickled_only(folder: Path) -> Path:
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    return unet


REFUSALS = {
    "neither": (lambda f: (shutil.rmtree(f), f.mkdir(), (f / "notes.txt").write_text("x"), f)[-1], [],
                r"is not a model folder: looked for ddim-deploy's config.json \+ model.safetensors, or a diffusers "
                r"folder: model_index.json, or a UNet folder's config.json \+ diffusion_pytorch_model.safetensors"),
    "vae": (lambda f: (_edit(f / "model_index.json", vae=["diffusers", "AutoencoderKL"]), f)[-1], [],
            r"model_index.json: vae present: a latent pipeline"),
    "vqvae": (lambda f: (_edit(f / "model_index.json", vqvae=["diffusers", "VQModel"]), f)[-1], [],
              r"model_index.json: vqvae present"),
    "text": (lambda f: (_edit(f / "unet" / "config.json", _class_name="UNet2DConditionModel"), f)[-1], [],
             r"unet/config.json: _class_name is 'UNet2DConditionModel' \(text-conditional: cross-attention\)"),
    "class-labels": (lambda f: (_edit(f / "unet" / "config.json", num_class_embeds=10), f)[-1], [],
                     r"config.json: num_class_embeds 10: class-conditional"),
    "class-embed": (lambda f: (_edit(f / "unet" / "config.json", class_embed_type="timestep"), f)[-1], [],
                    r"config.json: class_embed_type 'timestep': class-conditional"),
    "learned-variance": (lambda f: (_edit(f / "unet" / "config.json", out_channels=6), f)[-1], [],
                         r"out_channels 6 differs from in_channels 3"),
    "not-square": (lambda f: (_edit(f / "unet" / "config.json", sample_size=[16, 32]), f)[-1], [],
                   r"sample_size \[16, 32\] must be one size"),
    "fourier": (lambda f: (_edit(f / "unet" / "config.json", time_embedding_type="fourier"), f)[-1], [],
                r"time_embedding_type 'fourier' is not supported; allowed: positional"),
    "sigmoid": (lambda f: (_edit(f / "scheduler" / "scheduler_config.json", beta_schedule="sigmoid"), f)[-1], [],
                r"scheduler_config.json: beta_schedule 'sigmoid' is not supported; allowed: linear, scaled_linear, "
                r"squaredcos_cap_v2"),
    "trained-betas": (lambda f: (_edit(f / "scheduler" / "scheduler_config.json", trained_betas=[0.1] * 1000), f)[-1],
                      [], r"scheduler_config.json: trained_betas \[0.1, .* is not supported"),
    "prediction": (lambda f: (_edit(f / "scheduler" / "scheduler_config.json", prediction_type="x0"), f)[-1], [],
                   r"prediction_type 'x0' is not supported; allowed: epsilon, sample, v_prediction"),
    "thresholding": (lambda f: (_edit(f / "scheduler" / "scheduler_config.json", thresholding=True), f)[-1], [],
                     r"scheduler_config.json: thresholding true is not supported"),
    "zero-snr": (lambda f: (_edit(f / "scheduler" / "scheduler_config.json", rescale_betas_zero_snr=True), f)[-1],
                 [], r"rescale_betas_zero_snr true is not supported"),
    "scheduler-class": (lambda f: (_edit(f / "model_index.json", scheduler=["diffusers", "ScoreSdeVeScheduler"]),
                                   f)[-1], [], r"scheduler 'ScoreSdeVeScheduler' is not supported; allowed: "
                                               r"DDPMScheduler, DDIMScheduler"),
    "no-schedule": (_bare_unet_alone, [], r"the noise schedule of .*unet is unknown: no scheduler_config.json"),
    "pickle": (_pickled_only, [], r"no diffusion_pytorch_model.safetensors in .*unet \(diffusion_pytorch_model.bin "
                                  r"is a pickle"),
    "bad-json": (lambda f: ((f / "unet" / "config.json").write_text("{"), f)[-1], [],
                 r"cannot read .*config.json"),
    "too-large": (lambda f: f, ["--max-parameters", "1000"],
                  r"holds [\d,]+ parameters, more than the limit 1,000 \(raise it with --max-parameters\)"),
    "raw-weights": (lambda f: f, ["--raw-weights"], r"--raw-weights: a diffusers folder holds one set of weights"),
    "int8-data": (lambda f: f, ["--int8", "--int8-calibration", "data"],
                  r"--int8-calibration data: a diffusers folder names no training data"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_one_line_and_write_nothing(case, good_folder, tmp_path):
    make, flags, pattern = REFUSALS[case]
    folder = make(Path(shutil.copytree(good_folder, tmp_path / "in" / "pipe")))
    out_parent = tmp_path / "exports"
    result = invoke(export_cli.main, folder, "--out", out_parent / "x", *flags)
    assert result.exit_code == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert __import__("re").search(pattern, errors[0]), errors[0]
    assert not out_parent.exists()  # not even the lock or the folder --out lies in
