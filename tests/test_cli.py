"""The command lines as a user types them: exit codes and one-line errors, never tracebacks."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--widths", "8,16", "--block-depth", "1", "--embedding-dims", "8", "--batch-size", "8",
        "--sample-steps", "2", "--num-samples", "4", "--no-progress"]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd or ROOT, env=env,
                          timeout=300)


def fit(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return run("-m", "trainer", "fit", *args, cwd=cwd)


def assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str, code: int = 1) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:") or line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    assert re.search(pattern, errors[0]), errors[0]


def test_fit_trains_and_writes_a_run(tmp_path, fashion_dir):
    out = tmp_path / "run"
    proc = fit("--data", str(fashion_dir), "--steps", "4", "--sample-every", "2", "--out", str(out), *TINY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines()[0].startswith("fit: preset fashion-mnist (the default preset) -> ")
    assert (out / "samples.png").is_file() and (out / "model.safetensors").is_file()
    again = fit("--out", str(out), "--resume", "--steps", "6", "--data", str(fashion_dir), "--no-progress")
    assert again.returncode == 0, again.stderr
    assert "done at step 6/6" in again.stderr


def test_fit_default_out_is_a_new_run_directory(tmp_path, fashion_dir):
    proc = fit("--data", str(fashion_dir), "--steps", "1", "--sample-every", "1", *TINY, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("fashion-mnist-") and (run_dir / "config.json").is_file()
    first = proc.stderr.splitlines()[0]
    assert first.startswith(f"fit: preset fashion-mnist (the default preset) -> runs/{run_dir.name} on cpu"), first


@pytest.mark.parametrize(
    "args,pattern,code",
    [
        (["--preset", "imagenet"], r"Invalid value for '--preset'", 2),
        (["--schedule", "sigmoid"], r"Invalid value for '--schedule'", 2),
        (["--widths", "32,x"], r"comma-separated integers", 2),
        (["--image-size", "36", "--widths", "8,16,32,64"], r"--image-size 36 does not fit --widths", 1),
        (["--steps", "5", "--epochs", "1"], r"not both", 1),
        (["--lr", "-1"], r"--lr must lie in \(0, 1\), got -1", 1),
        (["--preset", "cifar10-64", "--widths", "8,16"], r"has no --widths; they set the keras U-Net", 1),
        (["--data", "/nonexistent/fmnist"], r"/nonexistent/fmnist does not exist", 1),
        (["--resume", "--preset", "fashion-mnist"], r"drop --preset", 2),
        (["--resume"], r"nothing to resume: .*config.json does not exist", 1),
        (["--device", "cuda"], r"no usable CUDA GPU|", 1),
    ],
)
def test_fit_bad_input_is_one_line(tmp_path, args, pattern, code):
    if args == ["--device", "cuda"]:
        pytest.importorskip("torch")
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has CUDA")
    proc = fit(*args, "--out", str(tmp_path / "run"), "--no-progress")
    assert_one_line_error(proc, pattern, code)
    assert not (tmp_path / "run").exists()


def test_fit_refuses_a_run_directory_with_another_config(tmp_path, fashion_dir):
    out = tmp_path / "run"
    assert fit("--data", str(fashion_dir), "--steps", "1", "--sample-every", "1", "--out", str(out), *TINY).returncode == 0
    before = (out / "config.json").read_bytes()
    proc = fit("--data", str(fashion_dir), "--steps", "1", "--sample-every", "1", "--lr", "0.01", "--out", str(out),
               *TINY)
    assert_one_line_error(proc, r"already holds a run with a different config \(train.lr differ\); pick another "
                                r"--out, or continue that run with --resume and no config options")
    assert (out / "config.json").read_bytes() == before
    refusals = {  # read-only refusals of the same run: run side by side
        r"cannot change --lr when resuming": ("--lr", "0.01", "--no-progress"),
        r"cannot change --schedule when resuming": ("--flip", "--schedule", "linear", "--no-flip", "--no-progress"),
        r"cannot change --flip when resuming .*allowed: --checkpoint-every, ": ("--flip", "--print-config"),
    }  # (--no-flip is the stored value)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {pattern: subprocess.Popen([sys.executable, "-m", "trainer", "fit", "--out", str(out), "--resume", *args],
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for pattern, args in refusals.items()}
    for pattern, proc in procs.items():
        out_text, err_text = proc.communicate(timeout=300)
        assert_one_line_error(subprocess.CompletedProcess(proc.args, proc.returncode, out_text, err_text), pattern)


def test_resume_needs_a_run_directory():
    assert_one_line_error(fit("--resume"), r"--resume needs --out", 2)


def test_fit_corrupt_image_and_unwritable_output(tmp_path, image_folder):
    (image_folder / "bad.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    proc = fit("--preset", "keras-flowers", "--data", str(image_folder), "--split", "all", "--image-size", "16",
               *TINY, "--out", str(tmp_path / "run"))
    assert_one_line_error(proc, r"cannot read image .*bad.jpg")
    blocker = tmp_path / "file"
    blocker.write_text("")
    proc = fit("--out", str(blocker / "run"), "--no-progress")
    assert_one_line_error(proc, r"cannot create run directory")


def test_info_lists_presets_with_size_and_flops():
    proc = run("-m", "trainer", "info")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("fashion-mnist") and "GFLOPs/forward" in line for line in lines)
    assert any(line.startswith("keras-flowers") and "1,950,627" in line for line in lines)


@pytest.mark.parametrize("module", ["runtime.cli", "export.cli"])
def test_console_scripts_are_wired(module):
    proc = run("-m", module, "--help")
    assert proc.returncode == 0 and "Usage" in proc.stdout



def test_runtime_imports_without_torch():
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import runtime, runtime.api, runtime.cli, runtime.images, runtime.noise, runtime.sampler\n"
        "import runtime.backends.ort_backend, runtime.metadata, runtime.schedule\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    proc = run("-c", blocker)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_every_command_line_prints_the_one_version():
    """--version everywhere, and the version is written once (runtime.__version__, read by pyproject.toml)."""
    import importlib.metadata

    from click.testing import CliRunner

    import runtime

    assert importlib.metadata.version("ddim-deploy") == runtime.__version__
    assert runtime.__version__ not in (ROOT / "pyproject.toml").read_text()
    from export.cli import main as export_main
    from quality.cli import main as quality_main
    from runtime.cli import main as run_main
    from trainer.cli import main as trainer_main

    from runtime.serving.cli import main as serve_main

    commands = {"trainer": trainer_main, "trainer fit": trainer_main, "ddim-export": export_main, "ddim-run": run_main,
                "ddim-serve": serve_main, "quality": quality_main, "quality classifier": quality_main}
    for name, command in commands.items():
        args = [name.split()[1], "--version"] if " " in name else ["--version"]
        result = CliRunner().invoke(command, args)
        assert result.exit_code == 0 and result.output == f"ddim-deploy {runtime.__version__}\n", (name, result.output)
    scripts = ("latency", "fid", "fd_by_step", "int8_tradeoff", "train_throughput", "serve_load", "serve_hostile")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = {script: subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / f"{script}.py"), "--version"],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
             for script in scripts}  # all at once: each mostly waits for its imports
    for script, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and out == f"ddim-deploy {runtime.__version__}\n", (script, err)


def test_runtime_exports_its_public_api():
    import runtime
    from runtime.api import SampleResult, Sampler, load

    assert {"load", "Sampler", "SampleResult", "__version__"} <= set(runtime.__all__)
    assert (runtime.load, runtime.Sampler, runtime.SampleResult) == (load, Sampler, SampleResult)
