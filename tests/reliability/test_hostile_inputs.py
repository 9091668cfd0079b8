"""Hostile configs, weights and ONNX files: each gets one line and a non-zero exit, quickly, and
never garbage with exit 0."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import externalize_largest_initializer
from faults import ROOT, one_error_line, run_here, shipped_export, tiny_data, tiny_run
from runtime.metadata import METADATA_KEY


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("hostile")
    return tiny_run(tmp / "run", tiny_data(tmp / "data"), steps=1)


def copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest)
    return dest


def export_error(run: Path, tmp: Path, *flags: str) -> str:
    start = time.perf_counter()
    line = one_error_line(run_here("export.cli", str(run), "--out", str(tmp / "out"), *flags))
    assert time.perf_counter() - start < 60
    assert not (tmp / "out").exists()
    return line


def edit_config(run: Path, edit) -> None:
    cfg = json.loads((run / "config.json").read_text())
    edit(cfg)
    (run / "config.json").write_text(json.dumps(cfg))


def test_config_that_never_ends_or_is_too_big(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "zero")
    (run / "config.json").unlink()
    os.symlink("/dev/zero", run / "config.json")
    assert "is not a regular file" in export_error(run, tmp_path)
    fifo = copy_run(run_dir, tmp_path / "fifo")
    (fifo / "config.json").unlink()
    os.mkfifo(fifo / "config.json")
    assert "is not a regular file" in export_error(fifo, tmp_path)
    big = copy_run(run_dir, tmp_path / "big")
    (big / "config.json").write_text(" " * (2 << 20) + "{}")
    assert "larger than 1024 KiB" in export_error(big, tmp_path)


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "1e999"])
def test_non_finite_normalisation_in_a_config(run_dir, tmp_path, literal):
    run = copy_run(run_dir, tmp_path / "run")
    text = (run / "config.json").read_text()
    cfg = json.loads(text)
    cfg["normalization"]["std"] = ["__X__"]
    (run / "config.json").write_text(json.dumps(cfg).replace('"__X__"', literal))
    assert "normalization.std must be a finite number" in export_error(run, tmp_path)


def test_non_finite_normalisation_in_onnx_metadata(tmp_path):
    exp = shipped_export(tmp_path / "exp")
    model = onnx.load(str(exp / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            prop.value = json.dumps({**json.loads(prop.value), "normalization": {"mean": [float("nan")], "std": [1.0]}})
    onnx.save(model, str(exp / "model.onnx"))
    proc = run_here("runtime.cli", str(exp), "--steps", "2", "--num-images", "2", "--out", str(tmp_path / "s.png"),
               "--no-progress", env={"DDIM_DEPLOY_CACHE": str(tmp_path / "cache")})
    assert "must be a finite number" in one_error_line(proc)
    assert not (tmp_path / "s.png").exists()


@pytest.mark.parametrize("dtype", [torch.int64, torch.float16, torch.float64])
def test_weights_of_another_dtype_are_not_cast(run_dir, tmp_path, dtype):
    run = copy_run(run_dir, tmp_path / "run")
    tensors = load_file(run / "model.safetensors")
    key = next(k for k, v in tensors.items() if k.startswith("ema.") and v.is_floating_point() and v.dim() == 4)
    tensors[key] = tensors[key].to(dtype)
    (run / "model.safetensors").unlink()
    save_file(tensors, run / "model.safetensors")
    line = export_error(run, tmp_path)
    assert "wrong dtype" in line and str(dtype).removeprefix("torch.") in line


def test_nan_weights_are_named_not_compared(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    tensors = load_file(run / "model.safetensors")
    key = next(k for k, v in tensors.items() if k.startswith("ema.") and v.is_floating_point() and v.dim() == 4)
    tensors[key][0] = float("nan")
    (run / "model.safetensors").unlink()
    save_file(tensors, run / "model.safetensors")
    line = export_error(run, tmp_path)
    assert "hold NaN or infinite values" in line and "differs by" not in line


@pytest.mark.parametrize("edit,message", [
    (lambda c: c["model"].update(block_depth=10**9), "residual blocks; at most 512"),
    (lambda c: c["model"].update(image_size=65536), "image_size 65536 is larger than the limit 1024"),
    (lambda c: c["model"].update(widths=[8, 10**6]), "channels wide"),
    (lambda c: c["model"].update(widths=[512, 1024], block_depth=8), "parameters, more than the limit"),
])
def test_huge_architectures_are_refused_before_allocation(run_dir, tmp_path, edit, message):
    run = copy_run(run_dir, tmp_path / "run")
    edit_config(run, edit)
    line = export_error(run, tmp_path, "--max-parameters", "1000000")
    assert message in line


def test_limits_can_be_raised_by_flag(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path / "run")
    edit_config(run, lambda c: c["model"].update(image_size=2048))
    assert "--max-image-size" in export_error(run, tmp_path)
    from runtime.config import ModelSpec
    from runtime.common.limits import SizeLimits
    from trainer.models import check_size

    check_size(ModelSpec.load(run / "config.json").model, SizeLimits(image_size=4096))  # raised: accepted


def test_fit_refuses_a_batch_that_cannot_fit(tmp_path):
    proc = run_here("trainer", "fit", "--preset", "fashion-mnist", "--image-size", "1024", "--batch-size", "512",
               "--out", str(tmp_path / "run"), "--no-progress")
    line = one_error_line(proc)
    assert "would need about" in line and "--max-memory-gib" in line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/hostname"])
def test_onnx_external_data_outside_the_model_folder_is_refused(tmp_path, location):
    exp = shipped_export(tmp_path / "exp")
    externalize_largest_initializer(exp / "model.onnx", exp / "model.onnx", tmp_path / "secret.bin", location)
    proc = run_here("runtime.cli", str(exp), "--steps", "2", "--num-images", "2", "--out", str(tmp_path / "s.png"),
               "--no-progress", cwd=tmp_path, env={"DDIM_DEPLOY_CACHE": str(tmp_path / "cache")})
    line = one_error_line(proc)
    assert "cannot load" in line and ("escapes" in line or "Absolute path not allowed" in line)
    assert not (tmp_path / "s.png").exists()


def test_onnx_external_data_inside_the_folder_resolves_there_not_in_the_working_directory(tmp_path):
    exp = shipped_export(tmp_path / "exp")
    size = externalize_largest_initializer(exp / "model.onnx", exp / "model.onnx", exp / "weights.bin", "weights.bin")
    (tmp_path / "weights.bin").write_bytes(b"\0" * size)  # a decoy in the working directory
    args = ("--steps", "3", "--num-images", "2", "--no-progress", "--npz")
    env = {"DDIM_DEPLOY_CACHE": str(tmp_path / "cache")}
    got = run_here("runtime.cli", str(exp), *args, str(tmp_path / "a.npz"), "--out", str(tmp_path / "a.png"),
              cwd=tmp_path, env=env)
    assert got.returncode == 0, got.stderr
    ref = run_here("runtime.cli", str(ROOT / "models" / "fashion-mnist" / "model.onnx"), *args, str(tmp_path / "b.npz"),
              "--out", str(tmp_path / "b.png"), cwd=tmp_path, env=env)
    assert ref.returncode == 0, ref.stderr
    import numpy as np

    assert np.array_equal(np.load(tmp_path / "a.npz")["images"], np.load(tmp_path / "b.npz")["images"])


def test_non_onnx_bytes(tmp_path):
    exp = shipped_export(tmp_path / "exp")
    (exp / "model.onnx").write_bytes(b"PK\x03\x04 not a model" * 100)
    proc = run_here("runtime.cli", str(exp), "--steps", "2", "--num-images", "2", "--out", str(tmp_path / "s.png"),
               "--no-progress", env={"DDIM_DEPLOY_CACHE": str(tmp_path / "cache")})
    assert "cannot load" in one_error_line(proc)


@pytest.mark.parametrize("arch", ["keras", "ddpm"])
def test_the_activation_estimate_bounds_what_autograd_keeps(arch):
    """The memory limit's estimate against the tensors a real training forward saves (tiny models)."""
    from runtime.config import DDPMUNetConfig, KerasUNetConfig
    from trainer.memory import activation_bytes
    from trainer.models import build_model

    cfg = (KerasUNetConfig(image_size=32, channels=3, widths=(16, 32, 48), block_depth=2) if arch == "keras" else
           DDPMUNetConfig(image_size=32, channels=3, base_width=32, channel_mults=(1, 2, 2), num_res_blocks=2,
                          attention_resolutions=(16,), num_groups=8))
    model = build_model(cfg).train()
    params = {p.data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.dtype.is_floating_point and t.data_ptr() not in params:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(1, 3, 32, 32), torch.rand(1, 1, 1, 1))
    ratio = activation_bytes(cfg) / sum(storages.values())
    assert 1.0 <= ratio <= 1.6, ratio  # never below what is kept; not wildly above
