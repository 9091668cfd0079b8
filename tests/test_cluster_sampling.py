"""ddim-run --cluster: shards sampled as Ray tasks give exactly a single process's images; --out-dir resumes,
redoing only what is missing or corrupt, and refuses another run's shards. One local Ray instance for the module
(``--cluster local`` uses the Ray this process already runs); the multi-process cluster (a head and a worker node,
a worker killed mid-run) is under ``-m slow``."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from runtime.cli import main as ddim_run
from runtime.cluster.shards import MANIFEST, Shard, ShardData, ShardError, differences, read_shard, shard_bytes, split
from runtime.common.shipped import SHIPPED_MODEL

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ["--backend", "onnxruntime", "--precision", "fp32", "--device", "cpu"]  # the same engine everywhere
SMALL = ["--num-images", "12", "--steps", "3", "--seed", "5", "--no-progress"]
CLUSTER = ["--cluster", "local", "--shard-size", "4"]


def ddim(*args: str | Path) -> Any:
    return CliRunner().invoke(ddim_run, [str(SHIPPED_MODEL), *ENGINE, *map(str, args)])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, np.ndarray]:
    """The single-process ddim-run's arrays and grid (no Ray involved)."""
    out = tmp_path_factory.mktemp("single")
    result = ddim(*SMALL, "--out", out / "grid.png", "--npz", out / "s.npz")
    assert result.exit_code == 0, result.output
    with np.load(out / "s.npz") as f:
        return {"images": f["images"], "samples": f["samples"], "grid": (out / "grid.png").read_bytes()}


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray instance for the module (2 CPUs: two workers); ddim-run --cluster local uses it as it is."""
    ray = pytest.importorskip("ray")
    from runtime.serving.cli import quiet_ray_logs, serve_environment

    quiet_ray_logs()
    serve_environment()
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def sharded(ray_local, reference, tmp_path_factory) -> Path:
    """A complete --out-dir of the small run (3 shards of 4), made once; tests copy it."""
    out = tmp_path_factory.mktemp("cluster")
    result = ddim(*SMALL, *CLUSTER, "--out-dir", out / "shards", "--out", out / "grid.png", "--npz", out / "s.npz")
    assert result.exit_code == 0, result.output
    return out


def copy_of(sharded: Path, tmp_path: Path) -> Path:
    import shutil

    shutil.copytree(sharded / "shards", tmp_path / "shards")
    return tmp_path / "shards"


def test_cluster_gives_the_single_process_images_bit_for_bit(sharded, reference):
    with np.load(sharded / "s.npz") as f:
        np.testing.assert_array_equal(f["images"], reference["images"])
        np.testing.assert_array_equal(f["samples"], reference["samples"])
    assert (sharded / "grid.png").read_bytes() == reference["grid"]
    manifest = json.loads((sharded / "shards" / MANIFEST).read_text())
    assert manifest["identity"]["settings"]["steps"] == 3 and manifest["identity"]["seed"] == 5
    assert manifest["identity"]["engine"] == {"backend": "onnxruntime", "precision": "fp32", "device": "cpu"}
    assert [(r["first"], r["count"]) for r in manifest["shards"].values()] == [(0, 4), (4, 4), (8, 4)]
    for i, record in manifest["shards"].items():  # each file holds exactly its indices
        with np.load(sharded / "shards" / record["file"]) as f:
            assert f["indices"].tolist() == list(range(4 * int(i), 4 * int(i) + 4))
            np.testing.assert_array_equal(f["images"], reference["images"][4 * int(i):4 * int(i) + 4])


def test_a_rerun_redoes_only_the_missing_and_the_corrupt_shard(sharded, reference, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="runtime")
    shards = copy_of(sharded, tmp_path)
    kept = (shards / "shard-000000.npz").stat()
    (shards / "shard-000001.npz").unlink()
    corrupt = bytearray((shards / "shard-000002.npz").read_bytes())
    corrupt[len(corrupt) // 2] ^= 0xFF
    (shards / "shard-000002.npz").write_bytes(bytes(corrupt))
    result = ddim(*SMALL, *CLUSTER, "--out-dir", shards, "--out", tmp_path / "g.png", "--npz", tmp_path / "s.npz")
    assert result.exit_code == 0, result.output
    assert "redoing shard 1 (images 4-7): its file is missing" in caplog.text
    assert "redoing shard 2 (images 8-11): its file's sha256 differs" in caplog.text
    assert "12 images, 8 sampled now" in caplog.text
    after = (shards / "shard-000000.npz").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)  # the good shard was not rewritten
    with np.load(tmp_path / "s.npz") as f:
        np.testing.assert_array_equal(f["images"], reference["images"])
    assert (tmp_path / "g.png").read_bytes() == reference["grid"]
    # Complete now: a third run samples nothing and still writes the merged result.
    caplog.clear()
    result = ddim(*SMALL, *CLUSTER, "--out-dir", shards, "--out", tmp_path / "g2.png")
    assert result.exit_code == 0 and "12 images, 0 sampled now" in caplog.text, result.output
    assert (tmp_path / "g2.png").read_bytes() == reference["grid"]


@pytest.mark.parametrize("change,expected", [
    (["--steps", "4"], "settings.steps 3 there, 4 here"),
    (["--seed", "6"], "seed 5 there, 6 here"),
    (["--shard-size", "3"], "shard_size 4 there, 3 here"),
])
def test_shards_of_another_run_are_refused_in_one_line(sharded, tmp_path, change, expected):
    shards = copy_of(sharded, tmp_path)
    before = {p.name: p.read_bytes() for p in shards.iterdir()}
    args = [*SMALL, *CLUSTER, *change, "--out-dir", shards, "--out", tmp_path / "g.png"]
    result = ddim(*args)
    assert result.exit_code == 1, result.output
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("error: --out-dir") and expected in error and "never mixed" in error, error
    assert {p.name: p.read_bytes() for p in shards.iterdir()} == before
    assert not (tmp_path / "g.png").exists()


def test_a_foreign_manifest_is_refused(ray_local, tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / MANIFEST).write_text("{not json")
    result = ddim(*SMALL, *CLUSTER, "--out-dir", tmp_path / "shards", "--out", tmp_path / "g.png")
    assert result.exit_code == 1 and "is not a ddim-run shard manifest" in result.output, result.output


def test_an_unreachable_cluster_is_one_line(tmp_path):
    from test_distributed import free_port

    port = free_port()
    result = ddim(*SMALL, "--cluster", f"127.0.0.1:{port}", "--out", tmp_path / "g.png")
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1].startswith(f"error: --cluster 127.0.0.1:{port}: cannot reach a "
                                                             "Ray cluster there"), result.output


def test_without_ray_the_error_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    result = ddim(*SMALL, "--cluster", "local", "--out", tmp_path / "g.png")
    assert result.exit_code == 1
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("error: ddim-run --cluster needs Ray: pip install 'ray[serve]") and "'.[serve]'" in line


@pytest.mark.parametrize("args,expected", [
    (["--shard-size", "4"], "--shard-size only apply with --cluster"),
    (["--cluster", "local", "--interpolate", "1", "2"], "--interpolate runs in one process"),
    (["--cluster", "local", "--device", "cuda"], "--device cuda is not supported"),
])
def test_cluster_options_are_checked_before_work(tmp_path, args, expected):
    result = CliRunner().invoke(ddim_run, [str(SHIPPED_MODEL), *args, "--out", str(tmp_path / "g.png")])
    assert result.exit_code == 2 and expected in result.output, result.output


# -- Ray-free pieces ----------------------------------------------------------------------------------------------
def test_shards_tile_the_range():
    shards = split(10, 4)
    assert [(s.first, s.count) for s in shards] == [(0, 4), (4, 4), (8, 2)]
    assert [s.name for s in shards] == ["shard-000000.npz", "shard-000001.npz", "shard-000002.npz"]
    assert np.concatenate([s.indices for s in shards]).tolist() == list(range(10))


def test_a_shard_file_must_hold_exactly_its_images():
    shard = Shard(1, 4, 2)
    data = ShardData(np.zeros((2, 1, 3, 3), np.float32), np.zeros((2, 3, 3, 1), np.uint8))
    raw = shard_bytes(shard, 7, data)
    np.testing.assert_array_equal(read_shard(raw, shard, 7, (1, 3, 3)).images, data.images)
    for other, seed, shape in ((Shard(1, 5, 2), 7, (1, 3, 3)), (shard, 8, (1, 3, 3)), (shard, 7, (1, 4, 4))):
        with pytest.raises(ShardError):
            read_shard(raw, other, seed, shape)
    with pytest.raises(ShardError, match="cannot be read"):
        read_shard(raw[:100], shard, 7, (1, 3, 3))


def test_differences_name_each_changed_field():
    there = {"model_sha256": "a" * 64, "settings": {"steps": 3, "eta": 0.0}, "seed": 5}
    here = {"model_sha256": "b" * 64, "settings": {"steps": 3, "eta": 0.5}, "seed": 5}
    assert differences(there, here) == [f"model_sha256 {'a' * 12}... there, {'b' * 12}... here",
                                        "settings.eta 0.0 there, 0.5 here"]


def test_a_shard_task_is_the_same_images_without_ray(reference):
    from runtime.cluster.run import ShardJob, sample_shard
    from runtime.latents import model_identity
    from runtime.settings import SamplingSettings

    settings = SamplingSettings(steps=3, spacing="uniform", clip_x0=False)
    job = ShardJob(str(SHIPPED_MODEL), model_identity(SHIPPED_MODEL), "onnxruntime", "cpu", "fp32", 1, settings, 5,
                   Shard(1, 4, 4), 3)
    out = sample_shard(job)
    np.testing.assert_array_equal(out.data.images, reference["images"][4:8])
    with pytest.raises(ValueError, match="every node needs the same model file"):
        sample_shard(dataclasses.replace(job, model_sha256="0" * 64))


# -- a real multi-process cluster (slow) --------------------------------------------------------------------------
# A head that `ray start` makes takes only clients with its token (Ray 2.60: ~/.ray/auth_token, made by the head on
# first use); a node or driver given an explicit address sends it only with RAY_AUTH_MODE=token.
CLUSTER_ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token"}


def ray_cli() -> str:
    return str(Path(sys.executable).parent / "ray")


def _processes_named(word: bytes) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        if _cmdline(int(cmdline.parent.name)).startswith(word):
            found.append(int(cmdline.parent.name))
    return found


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _reachable(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def _wait_for(ready: Any, what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not ready():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not up within {timeout_s:g} s")
        time.sleep(0.2)


@pytest.fixture
def two_node_cluster():
    """`ray start --head` (no CPUs: it schedules nothing) and `ray start --address` (2 CPUs) as two blocking
    processes of this test, each in its own session; ended with every process below them."""
    pytest.importorskip("ray")
    from runtime.serving.cluster import descendants, end_processes
    from test_distributed import free_port

    port = free_port()
    env = CLUSTER_ENV
    common = ["--block", "--disable-usage-stats", "--include-dashboard", "false"]
    head = subprocess.Popen([ray_cli(), "start", "--head", f"--port={port}", "--num-cpus=0", *common], env=env,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs = [head]
    try:
        _wait_for(lambda: _reachable(port), "the head's port")
        worker = subprocess.Popen([ray_cli(), "start", f"--address=127.0.0.1:{port}", "--num-cpus=2", "--block",
                                   "--disable-usage-stats"], env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        procs.append(worker)
        _wait_for(lambda: any(b"raylet" in _cmdline(p) for p in descendants(worker.pid)), "the worker's raylet")
        time.sleep(3)  # the raylet registers its CPUs with the head
        yield f"127.0.0.1:{port}"
    finally:
        end_processes([p for proc in procs for p in descendants(proc.pid)] + [proc.pid for proc in procs], 10.0)
        for proc in procs:
            proc.poll()


@pytest.mark.slow
def test_a_two_node_cluster_redoes_a_killed_workers_shard(two_node_cluster, tmp_path):
    """ddim-run --cluster HEAD:PORT in its own process; a worker killed mid-shard: Ray runs its shard again, the
    run completes and every image equals a single process's."""
    args = [str(SHIPPED_MODEL), *ENGINE, "--num-images", "96", "--steps", "20", "--seed", "3", "--no-progress"]
    ref = subprocess.run([sys.executable, "-m", "runtime.cli", *args, "--out", str(tmp_path / "ref.png"), "--npz",
                          str(tmp_path / "ref.npz")], capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr
    run = subprocess.Popen([sys.executable, "-m", "runtime.cli", *args, "--cluster", two_node_cluster, "--shard-size", "6", "--out-dir",
                            str(tmp_path / "shards"), "--out", str(tmp_path / "g.png"), "--npz",
                            str(tmp_path / "s.npz")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=CLUSTER_ENV)
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and run.poll() is None:
        busy = _processes_named(b"ray::sample_shard")
        if busy and (tmp_path / "shards" / MANIFEST).exists():
            manifest = json.loads((tmp_path / "shards" / MANIFEST).read_text())
            if manifest["shards"]:  # one shard done: the workers have their model loaded and are mid-shard
                killed = busy[0]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    out, err = run.communicate(timeout=300)
    assert killed is not None, err
    assert run.returncode == 0, err
    # The killed process was mid-shard (ray::sample_shard) and never returned that shard: every shard being there
    # means Ray ran it again.
    manifest = json.loads((tmp_path / "shards" / MANIFEST).read_text())
    assert sorted(int(k) for k in manifest["shards"]) == list(range(16))
    with np.load(tmp_path / "s.npz") as f, np.load(tmp_path / "ref.npz") as r:
        np.testing.assert_array_equal(f["images"], r["images"])


@pytest.mark.slow
def test_cluster_local_starts_and_ends_its_own_ray(tmp_path, reference):
    """The real `--cluster local` in its own process: starts Ray, samples, ends every process it started."""
    pytest.importorskip("ray")
    run = subprocess.run([sys.executable, "-m", "runtime.cli", str(SHIPPED_MODEL), *ENGINE, *SMALL, *CLUSTER,
                          "--npz", str(tmp_path / "s.npz"), "--out", str(tmp_path / "g.png")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    with np.load(tmp_path / "s.npz") as f:
        np.testing.assert_array_equal(f["images"], reference["images"])
