"""Training runs end to end on a tiny model: files written, exact resume, failures lose nothing."""

from __future__ import annotations

import csv
import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import tiny_config
from runtime.settings import SamplingSettings
from runtime.config import ModelSpec
from trainer import diffusion
from trainer.errors import CheckpointError, RunDirError, TrainingDivergedError
from trainer.rundir import load_model, load_run_config, step_dirs, with_train_overrides
from trainer.train import fit


def test_run_directory_contents(tmp_path, fashion_dir):
    run = tmp_path / "run"
    result = fit(tiny_config(), run, fashion_dir, progress=False)
    assert result.step == 6 and not result.interrupted
    for name in ("config.json", "model.safetensors", "train_state.pt", "samples.png", "loss.csv", "loss.png",
                 "train.log"):
        assert (run / name).is_file(), name
    assert [s for s, _ in step_dirs(run)] == [4, 6]  # keep_checkpoints=2
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-0000003.png", "step-0000006.png"]
    grid = Image.open(run / "samples.png")
    assert grid.mode == "L" and grid.size[0] > 2 * 32
    with open(run / "loss.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    tensors = load_file(run / "model.safetensors")
    assert any(k.startswith("ema.") for k in tensors) and any(k.startswith("raw.") for k in tensors)
    spec = ModelSpec.load(run / "config.json")
    assert spec.extra["train"]["steps"] == 6 and len(spec.normalization.mean) == 1
    model, _ = load_model(run)
    assert not model.training


def test_resume_continues_exactly(tmp_path, fashion_dir):
    straight = tmp_path / "straight"
    fit(tiny_config(steps=6), straight, fashion_dir, progress=False)
    split = tmp_path / "split"
    fit(tiny_config(steps=3, checkpoint_every=3), split, fashion_dir, progress=False)
    cfg = with_train_overrides(load_run_config(split), {"steps": 6})
    fit(cfg, split, fashion_dir, resume=True, progress=False)
    a, b = load_file(straight / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    with open(split / "loss.csv") as fh:
        assert [int(r["step"]) for r in csv.DictReader(fh)] == [1, 2, 3, 4, 5, 6]


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, fashion_dir, monkeypatch):
    run = tmp_path / "run"
    fit(tiny_config(steps=4), run, fashion_dir, progress=False)
    before = {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-0000004").iterdir()}
    real = diffusion.training_loss
    calls = []

    def exploding(*args, **kwargs):
        calls.append(1)
        loss = real(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(diffusion, "training_loss", exploding)
    cfg = with_train_overrides(load_run_config(run), {"steps": 8})
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 6.*step 4"):
        fit(cfg, run, fashion_dir, resume=True, progress=False)
    assert [s for s, _ in step_dirs(run)] == [2, 4]
    assert {p.name: p.read_bytes() for p in (run / "checkpoints" / "step-0000004").iterdir()} == before
    assert load_file(run / "model.safetensors").keys()  # the top-level weights still load


def test_run_directory_refusals(tmp_path, fashion_dir):
    run = tmp_path / "run"
    fit(tiny_config(steps=2), run, fashion_dir, progress=False)
    config_before = (run / "config.json").read_bytes()
    with pytest.raises(RunDirError, match="different config.*train.lr"):
        fit(tiny_config(steps=2, lr=5e-4), run, fashion_dir, progress=False)
    with pytest.raises(RunDirError, match="already holds this run at step 2; pass --resume"):
        fit(tiny_config(steps=2), run, fashion_dir, progress=False)
    with pytest.raises(RunDirError, match="trained with a different config"):
        fit(tiny_config(steps=4, lr=5e-4), run, fashion_dir, resume=True, progress=False)
    with pytest.raises(RunDirError, match="cannot change --lr when resuming"):
        with_train_overrides(load_run_config(run), {"lr": 1e-2})
    assert (run / "config.json").read_bytes() == config_before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(RunDirError, match="not a run directory"):
        fit(tiny_config(), other, fashion_dir, progress=False)
    assert (other / "notes.txt").read_text() == "keep me"
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(RunDirError, match="is not a folder"):
        fit(tiny_config(), blocker / "sub", fashion_dir, progress=False)
    with pytest.raises(RunDirError, match="nothing to resume"):
        load_run_config(tmp_path / "never")


def test_mismatched_or_corrupt_weights_are_refused(tmp_path, fashion_dir):
    run = tmp_path / "run"
    fit(tiny_config(steps=2), run, fashion_dir, progress=False)
    spec = ModelSpec.load(run / "config.json")
    wider = dataclasses.replace(spec, model=dataclasses.replace(spec.model, widths=(8, 32)))
    (run / "config.json").write_text(wider.to_json())
    with pytest.raises(CheckpointError, match="do not match the config's architecture.*wrong shape"):
        load_model(run)
    (run / "config.json").write_text(spec.to_json())
    (run / "model.safetensors").unlink()
    (run / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt weights"):
        load_model(run)


def test_bf16_autocast_trains(tmp_path, fashion_dir):
    result = fit(tiny_config(steps=2, precision="bf16"), tmp_path / "run", fashion_dir, progress=False)
    assert result.step == 2


def test_eager_sampling_is_seeded_and_batch_independent(tmp_path, fashion_dir):
    run = tmp_path / "run"
    fit(tiny_config(steps=2), run, fashion_dir, progress=False)
    model, spec = load_model(run)
    torch.nn.init.normal_(model.conv_out.weight, std=0.05)  # make the untrained head do something
    four = SamplingSettings(steps=4)
    a = diffusion.sample_images(model, spec, 5, four, seed=3, batch_size=5)
    b = diffusion.sample_images(model, spec, 5, four, seed=3, batch_size=2)
    c = diffusion.sample_images(model, spec, 5, four, seed=4, batch_size=5)
    assert a.shape == (5, 32, 32, 1) and a.dtype == np.uint8
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1  # conv batching may differ in the last bit
    assert not np.array_equal(a, c)
    eta = diffusion.sample_images(model, spec, 2, SamplingSettings(4, eta=1.0, clip_x0=True), seed=3)
    assert eta.shape == (2, 32, 32, 1)


def _tiny_model(model):
    if model.architecture == "ddpm":
        return dataclasses.replace(model, image_size=16, base_width=8, channel_mults=(1, 2), num_res_blocks=1,
                                   attention_resolutions=(8,), num_groups=4)
    return dataclasses.replace(model, image_size=16, widths=(8, 16), block_depth=1, embedding_dims=8)


@pytest.mark.parametrize("preset", ["fashion-mnist", "keras-flowers", "cifar10-64", "cifar10-128", "celebahq-64"])
def test_every_preset_trains_a_few_steps_on_local_data(preset, tmp_path, fashion_dir, image_folder, monkeypatch):
    from conftest import write_cifar_tarball, write_flowers_tgz
    from trainer.presets import get_preset

    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(tmp_path / "cache"))
    cfg = get_preset(preset).config
    data = {"fashion-mnist": fashion_dir, "celebahq-64": image_folder, "keras-flowers": None}.get(preset)
    if preset.startswith("cifar10"):
        data = write_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    if preset == "keras-flowers":
        (tmp_path / "cache" / "oxford-flowers-102").mkdir(parents=True)
        write_flowers_tgz(tmp_path / "cache" / "oxford-flowers-102" / "102flowers.tgz", n=24)
    train = dataclasses.replace(cfg.train, batch_size=4, steps=3, epochs=None, warmup_steps=1, sample_every=3,
                                sample_steps=2, num_samples=2, checkpoint_every=3)
    cfg = dataclasses.replace(cfg, model=_tiny_model(cfg.model), train=train)
    result = fit(cfg, tmp_path / "run", data, progress=False)
    assert result.step == 3
    model, spec = load_model(tmp_path / "run")
    assert spec.model == cfg.model and (tmp_path / "run" / "samples.png").is_file()


def test_fp16_needs_cuda(tmp_path, fashion_dir):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match="fp16 training needs a CUDA device"):
        fit(tiny_config(steps=1, precision="fp16"), tmp_path / "run", fashion_dir, progress=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_cuda_training_and_resume(precision, tmp_path, fashion_dir):
    run = tmp_path / "run"
    fit(tiny_config(steps=2, precision=precision, checkpoint_every=2), run, fashion_dir, device="cuda",
        progress=False)
    cfg = with_train_overrides(load_run_config(run), {"steps": 4})
    result = fit(cfg, run, fashion_dir, resume=True, device="cuda", progress=False)
    assert result.step == 4 and (run / "samples.png").is_file()
