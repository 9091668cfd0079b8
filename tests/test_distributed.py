"""Multi-process training on CPU (gloo): ranks agree, and K processes match one process."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config
from runtime.config import DDPMUNetConfig
from trainer.distributed import DistInfo, setup, teardown
from trainer.models import build_model
from trainer.train import fit

ROOT = Path(__file__).resolve().parents[1]
# GroupNorm (no cross-sample statistics) and no dropout: two processes of 4 images do exactly the
# maths of one process of 8, up to the order of floating-point reductions.
DDPM_TINY = DDPMUNetConfig(image_size=32, channels=1, base_width=8, channel_mults=(1, 2), num_res_blocks=1,
                           attention_resolutions=(16,), num_groups=4, dropout=0.0)
# Measured on the project's 2-core CPU: the 2-process and 1-process weights differ by 6.7e-7 at most
# after 4 AdamW steps at lr 1e-3 (reduction order only); 1e-5 leaves room while catching any wrong
# slice or random draw, which moves weights by about lr = 1e-3 per step.
ATOL = 1e-5


def ddpm_config():
    cfg = tiny_config(steps=4, batch_size=8, checkpoint_every=2, sample_every=4, lr=1e-3)
    return dataclasses.replace(cfg, model=DDPM_TINY, data=dataclasses.replace(cfg.data, random_flip=True))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, run_dir: str, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info, device = setup("cpu")
    try:
        result = fit(ddpm_config(), Path(run_dir), Path(data), device=device, progress=False, dist=info)
        torch.save(result.model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        teardown(info)


def test_two_processes_agree_and_match_one_process(tmp_path, fashion_dir):
    port = free_port()
    mp.spawn(_worker, args=(2, port, str(tmp_path / "ddp"), str(fashion_dir), str(tmp_path)), nprocs=2, join=True)
    rank0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    rank1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), f"ranks differ at {key}"
    torch.set_num_threads(1)
    single = fit(ddpm_config(), tmp_path / "single", fashion_dir, progress=False, dist=DistInfo()).model.state_dict()
    worst = max((single[k] - rank0[k]).abs().max().item() for k in single)
    print(f"2-process vs 1-process max weight difference: {worst:.3g}")
    assert worst < ATOL, f"2-process weights differ from 1-process by {worst:.3g}"
    torch.manual_seed(0)  # tiny_config's seed: the initial weights
    init = build_model(DDPM_TINY).state_dict()
    moved = max((single[k] - init[k]).abs().max().item() for k in single)
    assert moved > 100 * ATOL, "training must move the weights far more than the tolerance"
    assert (tmp_path / "ddp" / "model.safetensors").is_file() and (tmp_path / "ddp" / "samples.png").is_file()


def test_batch_must_split_evenly_across_processes():
    with pytest.raises(ValueError, match="not divisible by the 3 processes"):
        DistInfo(rank=0, world=3).shard(8)
    assert DistInfo(rank=1, world=2).shard(8) == slice(4, 8)


@pytest.mark.slow  # 20+ s; the DDP maths is checked by test_two_processes_agree_and_match_one_process by default
def test_torchrun_cli_trains_and_resumes_with_two_processes(tmp_path, fashion_dir):
    out = tmp_path / "run"
    tiny = ["--widths", "8,16", "--block-depth", "1", "--embedding-dims", "8", "--batch-size", "8",
            "--sample-steps", "2", "--num-samples", "4", "--no-progress", "--data", str(fashion_dir), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(free_port()),
            "-m", "trainer", "fit"]
    proc = subprocess.run([*base, "--steps", "2", "--sample-every", "2", *tiny], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "x 2 processes" in proc.stderr
    base[6] = str(free_port())
    proc = subprocess.run([*base, "--resume", "--steps", "4", *tiny[-5:]], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "done at step 4/4" in proc.stderr
    assert [p.name for p in sorted((out / "checkpoints").iterdir())][-1] == "step-0000004"
