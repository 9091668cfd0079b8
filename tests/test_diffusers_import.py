"""ddim-export of a diffusers folder: peer parity with diffusers' own DDIMPipeline, and the refusals (the
schedule mapping: tests/test_diffusers_schedules.py).

The peer test runs the real command lines (``ddim-export``, then ``ddim-run --npz``) on a small randomly
initialised UNet2DModel saved with ``save_pretrained``, and diffusers' real ``DDIMPipeline.__call__`` on the
same UNet, fed the runtime's own x_T and per-step noises (``randn_tensor`` hands out the draws of
``runtime.noise.ImageNoise`` in the runtime's order: x_T first, then one draw per stochastic step).

What is compared: the float samples at diffusers' image scale (x / 2 + 0.5: [0, 1] for images in range),
before any clamping or quantisation: ours from the npz, diffusers' as the last ``scheduler.step``'s
``prev_sample`` (recorded by wrapping the real step; the pipeline's own output is clamped to [0, 1], which hides
saturated pixels), as ``max|ours - diffusers| / max(1, max|diffusers|)``: absolute where clipping keeps the
samples in range, relative to the scale where an unclipped random network drives them to 1e2-1e4. The
pipeline's clamped ``output_type="np"`` images are compared too, absolutely.

Bounds: 1e-4 (float32) against the pipeline with its step's scalars in float64 (as ours are; see ``theirs``),
1e-3 against the pipeline exactly as shipped: its float32 scalars cancel in ``1 - a_prev - sigma^2`` where
alpha_bar is ~1e-9 (2e-4 measured at squaredcos_cap_v2, trailing, eta 1). For ``linspace`` diffusers' step reads
alpha_bar_prev at ``t - T // S``, not at the next timestep of its own list (diffusers #12633 / #11347), so
linspace is compared with the real step reading the next listed timestep; the test also shows the unmodified
one differs by 1e-1.
"""

from __future__ import annotations

import functools
import json
import re
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
from diffusers import DDIMPipeline, DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

from export import cli as export_cli  # noqa: E402
from export.from_diffusers import read_folder  # noqa: E402
from runtime.exportdir import REPORT
from runtime import cli as run_cli  # noqa: E402
from runtime.noise import ImageNoise  # noqa: E402

TOLERANCE = 1e-4
SEED, IMAGES, STEPS = 7, 4, 20
TINY_UNET = dict(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 layers_per_block=1, norm_num_groups=8)
# One pipeline folder per beta schedule; clip_sample differs so that ddim-run's default is seen to follow it.
SCHEDULERS = {"linear": dict(beta_schedule="linear", clip_sample=True),
              "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2", clip_sample=False)}


INT8_SMALL = ["--int8-calibration-size", "16", "--int8-calibration-steps", "4", "--int8-gate-images", "4",
              "--int8-gate-steps", "4", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The eager runs are tiny: one thread keeps them from stalling on a busy 2-core CI machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    # linear: + FP16; squaredcos_cap_v2: + INT8 (calibrated on the model's own samples, a small gate)
    extra = ["--fp16"] if request.param == "linear" else ["--int8", *INT8_SMALL]
    result = invoke(export_cli.main, folder, "--out", out, *extra)
    assert result.exit_code == 0, result.stderr
    return SimpleNamespace(name=request.param, folder=folder, out=out, tmp=tmp)


def ours(exported, spacing: str, eta: float, clip: bool | None) -> np.ndarray:
    npz = exported.tmp / f"{spacing}-{eta}-{clip}.npz"
    flag = [] if clip is None else ["--clip-x0" if clip else "--no-clip-x0"]
    result = invoke(run_cli.main, exported.out, "--steps", STEPS, "--num-images", IMAGES, "--seed", SEED,
                    "--eta", eta, "--spacing", spacing, "--device", "cpu", "--precision", "fp32", "--no-progress",
                    "--npz", npz, "--out", exported.tmp / "grid.png", *flag)
    assert result.exit_code == 0, result.stderr
    return np.load(npz)["samples"]  # (N, C, H, W), model space: diffusers' [-1, 1]


def theirs(folder: Path, spacing: str, eta: float, clip: bool, monkeypatch, next_listed: bool = False,
           float64_scalars: bool = False):
    """diffusers' DDIMPipeline on the folder's UNet and scheduler config, fed the runtime's noise: the last
    step's unclamped prev_sample and the pipeline's own (clamped) images.

    ``float64_scalars``: its alphas_cumprod table (float32 values) held as float64, so that the step's scalars
    (sqrt(a), sigma, sqrt(1 - a_prev - sigma^2)) are computed in float64 as ours are; the images stay float32.
    """
    config = DDPMScheduler.load_config(str(folder / "scheduler"))
    scheduler = DDIMScheduler.from_config(config, timestep_spacing=spacing, set_alpha_to_one=True, clip_sample=clip)
    pipe = DDIMPipeline(unet=load_unet(folder), scheduler=scheduler)
    if float64_scalars:
        pipe.scheduler.alphas_cumprod = pipe.scheduler.alphas_cumprod.double()
        pipe.scheduler.final_alpha_cumprod = pipe.scheduler.final_alpha_cumprod.double()
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
        if next_listed:
            out = _step_to_next_listed(pipe.scheduler, real_step, model_output, timestep, sample, **kwargs)
        else:
            out = real_step(model_output, timestep, sample, **kwargs)
        last[:] = [out.prev_sample]
        return out

    pipe.scheduler.step = step
    with torch.no_grad():
        images = pipe(batch_size=IMAGES, eta=eta, num_inference_steps=STEPS, output_type="np",
                      use_clipped_model_output=clip or None).images
    return last[0].numpy(), images


@functools.cache
def load_unet(folder: Path) -> UNet2DModel:
    """The folder's UNet as diffusers loads it (once per folder: the pipeline does not change it)."""
    return UNet2DModel.from_pretrained(str(folder / "unet"), low_cpu_mem_usage=False).eval()


def strides_to_next_listed(spacing: str, num_train_timesteps: int = 1000) -> bool:
    """Whether DDIMScheduler.step's previous step, t - T // S, is the next timestep of its own list."""
    scheduler = DDIMScheduler(num_train_timesteps=num_train_timesteps, timestep_spacing=spacing)
    scheduler.set_timesteps(STEPS)
    listed = scheduler.timesteps.tolist()
    prev = [t - num_train_timesteps // STEPS for t in listed]
    return prev[:-1] == listed[1:] and prev[-1] < 0


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
    """Ours against the real pipeline twice: with its step's scalars in float64 (the bound, 1e-4), and exactly as
    shipped, whose float32 scalars cancel in 1 - a_prev - sigma^2 where alpha_bar is ~1e-9 (squaredcos_cap_v2's
    t = 999, eta = 1: 2e-4 measured; the same table in float64 gives 3e-6), bounded at 1e-3."""
    default = SCHEDULERS[exported.name]["clip_sample"] == clip
    got = ours(exported, spacing, eta, None if default else clip)  # the config's clip_sample is the default
    linspace = spacing == "linspace"
    # leading and trailing (20 of 1000): diffusers' stride lands on the next listed step, as our plan does
    assert strides_to_next_listed(spacing) != linspace
    ref, images = theirs(exported.folder, spacing, eta, clip, monkeypatch, linspace, float64_scalars=True)
    shipped, _ = theirs(exported.folder, spacing, eta, clip, monkeypatch, linspace)
    diff, diff32 = difference(got, ref), difference(got, shipped)
    clamped = float(np.abs(np.clip(got / 2 + 0.5, 0, 1).transpose(0, 2, 3, 1) - images).max())
    case = f"{exported.name} {spacing} eta={eta:g} {'clip' if clip else 'noclip'}"
    line = (f"peer parity {case}: {diff:.3g}, as shipped (float32 scalars) {diff32:.3g}; clamped images "
            f"{clamped:.3g}; scale {np.abs(ref).max():.3g}")
    print(line)
    assert diff <= TOLERANCE and clamped <= TOLERANCE and diff32 <= 10 * TOLERANCE, line
    if linspace and eta == 0 and clip:  # the stride diffusers takes for linspace is not a rounding matter
        unpatched, _ = theirs(exported.folder, spacing, eta, clip, monkeypatch)
        print(f"peer parity {case}: against diffusers' own linspace stride {difference(got, unpatched):.3g}")
        assert difference(got, unpatched) > 1e-2


def test_export_records_the_source_and_keeps_the_timestep_embedding_in_float32(exported):
    import onnx

    from export.onnx_graph import embedding_nodes
    from runtime.common.files import sha256_file

    report = json.loads((exported.out / REPORT).read_text())
    source = report["source"]
    assert source["kind"] == "diffusers" and source["diffusers_version"] == diffusers.__version__
    assert source["unet_sha256"] == sha256_file(exported.folder / "unet" / "diffusion_pytorch_model.safetensors")
    graph = onnx.load(str(exported.out / "model.onnx")).graph
    assert [i.name for i in graph.input] == ["noisy_images", "timesteps"]
    assert [d.dim_param or d.dim_value for d in graph.input[1].type.tensor_type.shape.dim] == ["batch"]
    if exported.name != "linear":  # the INT8 export: calibrated on the model's own DDIM samples, no FD gate
        assert report["int8"]["calibration"].startswith("16 pairs (sampler)")
        assert report["int8"]["gate"]["passed"] and report["int8"]["gate"]["fd_ratio"] is None
        assert any("calibrated on the model's own DDIM samples" in n for n in report["notes"])
        return
    half = onnx.shape_inference.infer_shapes(onnx.load(str(exported.out / "model.fp16.onnx")))
    types = {v.name: v.type.tensor_type.elem_type for v in list(half.graph.value_info) + list(half.graph.input)}
    embed = set(embedding_nodes(half.graph))
    trig = [n for n in half.graph.node if n.op_type in ("Sin", "Cos")]
    assert trig and all(n.name in embed for n in trig)
    for node in trig:  # the angles reach 999 radians: float32 from timesteps up to Sin / Cos
        assert types.get(node.input[0]) == onnx.TensorProto.FLOAT, node.name
    assert report["float32_in_fp16"][0].startswith("embedding path (") and "Sin" in report["float32_in_fp16"][0]


# Sample and v predictions are converted to the noise inside the graph, and the runtime's float32 update turns the
# noise back into x0: at squaredcos_cap_v2's t = 999 (sqrt(alpha_bar) = 4.9e-5) that round trip loses ~14 bits of
# x0 in the first step (8e-5 measured at the end, trailing, eta 0), so these cases are bounded at 3e-4.
PREDICTION_TOLERANCE = 3e-4
PREDICTION_CASES = [("linear", "leading", 0.0, True), ("linear", "trailing", 1.0, False),
                    ("squaredcos_cap_v2", "trailing", 0.0, True)]


@pytest.mark.parametrize("prediction", ["v_prediction", "sample"])
def test_sample_and_v_predictions_match_the_pipeline(prediction, tmp_path, monkeypatch):
    """The conversion to epsilon against DDIMPipeline with that prediction_type, through the eager reference
    backend and the runtime's one sampling loop (the export of a v model is checked below)."""
    from export.from_diffusers import load_denoiser
    from runtime.api import Sampler
    from trainer.torch_backend import TorchBackend

    for schedule, spacing, eta, clip in PREDICTION_CASES:
        folder = save_pipeline(tmp_path / schedule, tiny_unet(), beta_schedule=schedule, prediction_type=prediction)
        source = read_folder(folder)
        sampler = Sampler(TorchBackend(model=load_denoiser(source), spec=source.spec, threads=1))
        got = sampler.sample(IMAGES, steps=STEPS, seed=SEED, eta=eta, spacing=spacing, clip_x0=clip).samples
        ref, _ = theirs(folder, spacing, eta, clip, monkeypatch, float64_scalars=True)
        diff = difference(got, ref)
        print(f"{prediction} {schedule} {spacing} eta={eta:g} {'clip' if clip else 'noclip'}: {diff:.3g}")
        assert diff <= PREDICTION_TOLERANCE


def test_a_v_prediction_export_keeps_its_conversion_in_float32(tmp_path, monkeypatch):
    import onnx

    from export.onnx_graph import float32_nodes

    folder = save_pipeline(tmp_path / "pipe", tiny_unet(), beta_schedule="linear", prediction_type="v_prediction")
    out = tmp_path / "export"
    assert invoke(export_cli.main, folder, "--out", out, "--fp16").exit_code == 0
    report = json.loads((out / REPORT).read_text())
    assert report["source"]["prediction_type"] == "v_prediction" and all(r["passed"] for r in report["parity"])
    graph = onnx.load(str(out / "model.onnx"))
    kept = {n.name for n in float32_nodes(graph)}
    gathers = [n for n in graph.graph.node if n.op_type == "Gather" and n.input[0] in
               {i.name for i in graph.graph.initializer}]
    assert len(gathers) == 2 and all(n.name in kept for n in gathers)  # sqrt(a), sqrt(1 - a) by t, float32
    half = onnx.load(str(out / "model.fp16.onnx"))
    tables = {i.name: i.data_type for i in half.graph.initializer}
    assert all(tables[n.input[0]] == onnx.TensorProto.FLOAT for n in half.graph.node
               if n.op_type == "Gather" and n.input[0] in tables)
    exported = SimpleNamespace(name="v", folder=folder, out=out, tmp=tmp_path)
    got = ours(exported, "leading", 0.0, True)
    ref, _ = theirs(folder, "leading", 0.0, True, monkeypatch, float64_scalars=True)
    print(f"v_prediction export, linear leading eta=0 clip: {difference(got, ref):.3g}")
    assert difference(got, ref) <= PREDICTION_TOLERANCE


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


def _neither(folder: Path) -> Path:
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    return folder


def _bare_unet_alone(folder: Path) -> Path:
    shutil.rmtree(folder / "scheduler")
    (folder / "model_index.json").unlink()
    return folder / "unet"


def _pickled_only(folder: Path) -> Path:
    unet = folder / "unet"
    (unet / "diffusion_pytorch_model.safetensors").rename(unet / "diffusion_pytorch_model.bin")
    return unet


def _bad_json(folder: Path) -> Path:
    (folder / "unet" / "config.json").write_text("{")
    return folder


INDEX, UNET, SCHEDULER = "model_index.json", "unet/config.json", "scheduler/scheduler_config.json"
# case: (a JSON file of the good folder and the fields set in it, or a function making the folder to export;
#        extra flags; the error line)
REFUSALS = {
    "neither": (_neither, [], r"is not a model folder: looked for ddim-deploy's config.json \+ model.safetensors, "
                              r"or a diffusers folder: model_index.json, or a UNet folder's config.json \+ "
                              r"diffusion_pytorch_model.safetensors"),
    "vae": ((INDEX, {"vae": ["diffusers", "AutoencoderKL"]}), [], r"model_index.json: vae present: a latent pipeline"),
    "vqvae": ((INDEX, {"vqvae": ["diffusers", "VQModel"]}), [], r"model_index.json: vqvae present"),
    "no-unet": ((INDEX, {"unet": None}), [], r"model_index.json: no unet entry"),
    "text-index": ((INDEX, {"unet": ["diffusers", "UNet2DConditionModel"]}), [],
                   r"model_index.json: unet is 'UNet2DConditionModel' \(text-conditional: cross-attention\)"),
    "text": ((UNET, {"_class_name": "UNet2DConditionModel"}), [],
             r"unet/config.json: _class_name is 'UNet2DConditionModel' \(text-conditional: cross-attention\)"),
    "class-labels": ((UNET, {"num_class_embeds": 10}), [], r"config.json: num_class_embeds 10: class-conditional"),
    "class-embed": ((UNET, {"class_embed_type": "timestep"}), [],
                    r"config.json: class_embed_type 'timestep': class-conditional"),
    "learned-variance": ((UNET, {"out_channels": 6}), [], r"out_channels 6 differs from in_channels 3"),
    "not-square": ((UNET, {"sample_size": [16, 32]}), [], r"sample_size \[16, 32\] must be one size"),
    "deep": ((UNET, {"layers_per_block": 10**6}), [], r"the UNet would have 4,000,004 residual blocks"),
    "fourier": ((UNET, {"time_embedding_type": "fourier"}), [],
                r"time_embedding_type 'fourier' is not supported; allowed: positional"),
    "sigmoid": ((SCHEDULER, {"beta_schedule": "sigmoid"}), [], r"scheduler_config.json: beta_schedule 'sigmoid' is "
                                                               r"not supported; allowed: linear, scaled_linear, "
                                                               r"squaredcos_cap_v2"),
    "trained-betas": ((SCHEDULER, {"trained_betas": [0.1] * 1000}), [],
                      r"scheduler_config.json: trained_betas \[0.1, .* is not supported"),
    "prediction": ((SCHEDULER, {"prediction_type": "x0"}), [],
                   r"prediction_type 'x0' is not supported; allowed: epsilon, sample, v_prediction"),
    "thresholding": ((SCHEDULER, {"thresholding": True}), [], r"scheduler_config.json: thresholding true is not"),
    "zero-snr": ((SCHEDULER, {"rescale_betas_zero_snr": True}), [], r"rescale_betas_zero_snr true is not supported"),
    "scheduler-class": ((INDEX, {"scheduler": ["diffusers", "ScoreSdeVeScheduler"]}), [],
                        r"scheduler 'ScoreSdeVeScheduler' is not supported; allowed: DDPMScheduler, DDIMScheduler"),
    "no-schedule": (_bare_unet_alone, [], r"the noise schedule of .*unet is unknown: no scheduler_config.json"),
    "pickle": (_pickled_only, [], r"no diffusion_pytorch_model.safetensors in .*unet \(diffusion_pytorch_model.bin "
                                  r"is a pickle"),
    "bad-json": (_bad_json, [], r"cannot read .*unet/config.json"),
    "too-large": ((INDEX, {}), ["--max-parameters", "1000"],
                  r"holds [\d,]+ parameters, more than the limit 1,000 \(raise it with --max-parameters\)"),
    "raw-weights": ((INDEX, {}), ["--raw-weights"], r"--raw-weights: a diffusers folder holds one set of weights"),
    "int8-data": ((INDEX, {}), ["--int8", "--int8-calibration", "data"],
                  r"--int8-calibration data: a diffusers folder names no training data"),
    "int8-data-path": ((INDEX, {}), ["--int8", "--data", "."], r"--data: a diffusers folder names no training data"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_are_one_line_and_write_nothing(case, good_folder, tmp_path):
    make, flags, pattern = REFUSALS[case]
    folder = Path(shutil.copytree(good_folder, tmp_path / "in" / "pipe"))
    if callable(make):
        folder = make(folder)
    else:
        name, changes = make
        (folder / name).write_text(json.dumps({**json.loads((folder / name).read_text()), **changes}))
    out_parent = tmp_path / "exports"
    result = invoke(export_cli.main, folder, "--out", out_parent / "x", *flags)
    assert result.exit_code == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert not out_parent.exists()  # not even the lock or the folder --out lies in


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_inversion_matches_diffusers_ddim_inverse_scheduler(exported, spacing, monkeypatch):
    """ddim-encode's inversion (the export on ONNX Runtime) against diffusers' DDIMInverseScheduler and its loop on
    the same UNet2DModel, step scalars in float64: latents within 1e-4. Decoding those latents equals DDIMPipeline
    started from them."""
    from diffusers import DDIMInverseScheduler

    from runtime.api import load

    sampler = load(exported.out, "onnxruntime", "cpu", "fp32", threads=1)
    m = sampler.spec.model
    x0 = np.random.default_rng(3).uniform(-1, 1, (IMAGES, m.channels, m.image_size, m.image_size)).astype(np.float32)
    got = sampler.encode(x0, steps=STEPS, spacing=spacing).samples
    config = DDPMScheduler.load_config(str(exported.folder / "scheduler"))
    inverse = DDIMInverseScheduler.from_config(config, timestep_spacing=spacing, set_alpha_to_one=True,
                                               clip_sample=False)
    inverse.alphas_cumprod = inverse.alphas_cumprod.double()
    inverse.initial_alpha_cumprod = inverse.initial_alpha_cumprod.double()
    inverse.set_timesteps(STEPS)
    unet, x = load_unet(exported.folder), torch.from_numpy(x0)
    assert strides_to_next_listed(spacing)  # its stride T // S lands on the listed steps here (20 of 1000)
    with torch.no_grad():
        for t in inverse.timesteps:
            x = inverse.step(unet(x.float(), t).sample, t, x).prev_sample
    ref = x.double().numpy()
    diff = difference(got, ref)
    print(f"inversion parity {exported.name} {spacing}: {diff:.3g}")
    assert diff <= TOLERANCE
    decoded = sampler.decode(got, steps=STEPS, spacing=spacing, clip_x0=False).samples

    def randn_tensor(shape, generator=None, device=None, dtype=None, layout=None):
        return torch.from_numpy(got.copy())

    monkeypatch.setattr(pipeline_ddim, "randn_tensor", randn_tensor)
    scheduler = DDIMScheduler.from_config(config, timestep_spacing=spacing, set_alpha_to_one=True, clip_sample=False)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    pipe = DDIMPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    last = []
    real_step = pipe.scheduler.step

    def step(model_output, timestep, sample, **kwargs):
        out = real_step(model_output, timestep, sample, **kwargs)
        last[:] = [out.prev_sample]
        return out

    pipe.scheduler.step = step
    with torch.no_grad():
        pipe(batch_size=IMAGES, eta=0.0, num_inference_steps=STEPS, output_type="np")
    assert difference(decoded, last[0].double().numpy()) <= TOLERANCE
