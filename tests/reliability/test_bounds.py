"""Bounds a hostile tester found missing: every count, thread number, file size and float a user (or a file) gives
is checked before the work it would size, in one line naming the flag (or field) and the limit."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import onnx
import pytest
from click.testing import CliRunner

from faults import SHIPPED, TINY_FLAGS, cli, one_error_line, run_here, shipped_export, tiny_data, tiny_run
from runtime.metadata import METADATA_KEY

BILLION = "1000000000"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("bounds")
    return tiny_run(tmp / "run", tiny_data(tmp / "data"), steps=1)


def ddim_run(tmp: Path, *flags: str) -> str:
    return one_error_line(run_here("runtime.cli", *flags, "--steps", "2", "--no-progress", "--out",
                                   str(tmp / "s.png"), env={"DDIM_DEPLOY_CACHE": str(tmp / "cache")}))


def test_a_billion_images_are_refused_before_sampling(tmp_path):
    start = time.perf_counter()  # a child process, as the user runs it: start-up and model loading included
    proc = cli("runtime.cli", str(SHIPPED), "--num-images", BILLION, "--steps", "2", "--no-progress", "--out",
               str(tmp_path / "s.png"), env={"DDIM_DEPLOY_CACHE": str(tmp_path / "cache")})
    seconds = time.perf_counter() - start
    line = one_error_line(proc)
    assert proc.returncode == 1 and seconds < 10, (proc.returncode, seconds)
    assert line.startswith("error: --num-images 1,000,000,000: at most ") and "images of 32x32x1 fit" in line
    assert not (tmp_path / "s.png").exists()


def test_thousands_of_threads_are_refused_at_once(tmp_path):
    start = time.perf_counter()
    proc = cli("runtime.cli", str(SHIPPED), "--threads", "10000", "--num-images", "2", "--out",
               str(tmp_path / "s.png"))
    seconds = time.perf_counter() - start
    cap = len(os.sched_getaffinity(0))
    assert proc.returncode == 2 and seconds < 10, (proc.returncode, seconds, proc.stderr[-500:])
    assert f"'--threads': 10,000 is more than the {cap} logical CPUs" in one_error_line(proc)


@pytest.mark.parametrize("command", ["ddim-encode", "fid"])
def test_every_threads_flag_has_the_cap(tmp_path, command):
    from quality.cli import main as quality
    from runtime.cli import encode_main

    main, args = {"ddim-encode": (encode_main, [str(SHIPPED), str(tmp_path)]),
                  "fid": (quality, ["fid", str(tmp_path / "a"), str(tmp_path / "b")])}[command]
    result = CliRunner().invoke(main, [*args, "--threads", "10000"])
    assert result.exit_code == 2 and "Invalid value for '--threads': 10,000 is more than" in result.stderr


def test_the_library_caps_threads_too():
    from runtime.api import load

    with pytest.raises(ValueError, match=r"threads 10,000: at most \d+ threads \(the logical CPUs"):
        load(SHIPPED, "onnxruntime", "cpu", threads=10000)


def test_fit_bounds_timesteps_and_sample_grids(tmp_path):
    for flags, message in [(("--schedule", "linear", "--num-timesteps", BILLION),
                            "error: --num-timesteps must be at most 100,000, got 1,000,000,000"),
                           (("--num-samples", BILLION), "error: --num-samples must be at most 1,024")]:
        proc = run_here("trainer", "fit", *TINY_FLAGS, "--steps", "1", "--out", str(tmp_path / "run"), *flags)
        assert proc.returncode == 1 and one_error_line(proc).startswith(message)
        assert not (tmp_path / "run").exists()


def test_timesteps_in_a_run_config_and_in_onnx_metadata(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    cfg = json.loads((run / "config.json").read_text())
    cfg["schedule"].update(name="linear", num_timesteps=10**9)
    (run / "config.json").write_text(json.dumps(cfg))
    line = one_error_line(run_here("export.cli", str(run), "--out", str(tmp_path / "out")))
    assert "num_timesteps must be at most 100,000, got 1,000,000,000" in line
    exp = shipped_export(tmp_path / "exp")
    model = onnx.load(str(exp / "model.onnx"))
    for prop in model.metadata_props:
        if prop.key == METADATA_KEY:
            data = json.loads(prop.value)
            data["schedule"].update(name="linear", num_timesteps=10**8)
            prop.value = json.dumps(data)
    onnx.save(model, str(exp / "model.onnx"))
    start = time.perf_counter()
    line = ddim_run(tmp_path, str(exp), "--num-images", "2")
    assert "num_timesteps must be at most 100,000, got 100,000,000" in line and time.perf_counter() - start < 10


def test_a_model_file_larger_than_its_config_allows_is_not_read(tmp_path):
    exp = shipped_export(tmp_path / "exp")
    os.truncate(exp / "model.onnx", 1 << 30)  # sparse: 1 GiB on paper, its metadata intact
    start = time.perf_counter()
    line = ddim_run(tmp_path, str(exp), "--num-images", "2")
    assert time.perf_counter() - start < 10
    assert "is 1,024.0 MiB, more than the" in line and "a keras U-Net of its config can hold" in line


def test_a_weights_file_larger_than_its_model_is_not_read(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    os.truncate(run / "model.safetensors", 1 << 30)
    line = one_error_line(run_here("export.cli", str(run), "--out", str(tmp_path / "out")))
    assert "weights file" in line and "is 1,024.0 MiB, more than the" in line and "refused before reading it" in line


@pytest.mark.parametrize("flags,flag", [
    (("--embedding-max-frequency", "inf"), "--embedding-max-frequency"),
    (("--lr", "nan"), "--lr"),
    (("--max-memory-gib", "inf"), "--max-memory-gib"),
])
def test_fit_floats_are_finite(tmp_path, flags, flag):
    proc = run_here("trainer", "fit", *TINY_FLAGS, "--steps", "1", "--out", str(tmp_path / "run"), *flags)
    assert proc.returncode == 2 and f"Invalid value for '{flag}': {flags[1]} is not a finite number" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module,flags", [
    ("runtime.cli", ("--strength", "nan", "--init-images", "x.png")),
    ("runtime.cli", ("--eta", "inf")),  # SamplingSettings says it: "--eta must be a finite number >= 0"
    ("export.cli", ("--int8-min-psnr", "inf")),
])
def test_other_float_flags_are_finite(tmp_path, module, flags):
    proc = run_here(module, *flags, "--out", str(tmp_path / "out.png"))
    assert proc.returncode == 2 and f"'{flags[0]}'" in proc.stderr and "finite number" in proc.stderr


def test_config_floats_are_finite_however_they_are_built():
    import dataclasses

    from runtime.config import ConfigError, KerasUNetConfig, ScheduleConfig
    from trainer.config import DataConfig, TrainConfig

    with pytest.raises(ConfigError, match="embedding_max_frequency must be a finite number, got inf"):
        dataclasses.replace(KerasUNetConfig(32, 1), embedding_max_frequency=float("inf"))
    with pytest.raises(ConfigError, match="cosine_s must be a finite number"):
        ScheduleConfig(cosine_s=float("nan"))
    with pytest.raises(ConfigError, match="val_fraction must be a finite number"):
        DataConfig(val_fraction=float("nan"))
    with pytest.raises(ConfigError, match="grad_clip must be a finite number"):
        TrainConfig(steps=1, grad_clip=float("inf"))


def test_a_run_directory_that_is_not_utf8_logs_escaped(tmp_path):
    out = tmp_path / "runs" / "bad\udcff\udcfe"
    proc = run_here("trainer", "fit", *TINY_FLAGS, "--steps", "1", "--data", str(tiny_data(tmp_path / "data")),
                    "--out", str(out))
    assert proc.returncode == 0 and "Logging error" not in proc.stderr and "Traceback" not in proc.stderr
    assert "bad\\udcff\\udcfe" in (out / "train.log").read_text()
    assert (out / "model.safetensors").is_file()


def test_nan_weights_in_float32_blame_the_weights(tmp_path):
    import numpy as np
    from onnx import numpy_helper

    model = onnx.load(str(SHIPPED / "model.onnx"))
    init = next(i for i in model.graph.initializer if i.name.endswith("bias"))
    init.CopyFrom(numpy_helper.from_array(np.full(numpy_helper.to_array(init).shape, np.nan, np.float32), init.name))
    exp = shipped_export(tmp_path / "exp")
    onnx.save(model, str(exp / "model.onnx"))
    line = ddim_run(tmp_path, str(exp), "--num-images", "2", "--precision", "fp32")
    assert "non-finite values at sampling step 1/2" in line and "in float32: its weights" in line
    assert "try float32" not in line


def test_the_advice_follows_the_precision():
    from runtime.sampler import NonFiniteError

    assert "try float32 precision" in str(NonFiniteError("at sampling step 1/2", "fp16"))
    assert "try float32" not in str(NonFiniteError("at sampling step 1/2", "fp32"))
    import pickle

    assert str(pickle.loads(pickle.dumps(NonFiniteError("at x", "int8")))) == str(NonFiniteError("at x", "int8"))


def test_a_symlinked_run_directory_is_called_a_symlink(tmp_path):
    from trainer.errors import CheckpointError
    from trainer.rundir import read_spec

    (tmp_path / "file").write_text("x")
    os.symlink(tmp_path / "file", tmp_path / "link")
    with pytest.raises(CheckpointError, match="link is a symlink to .*file, not a run directory"):
        read_spec(tmp_path / "link")
