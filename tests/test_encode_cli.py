"""ddim-encode and ddim-run's --latents, --init-images and --interpolate on the shipped model, as typed: the
round trip, bit-for-bit decoding of ddim-run's own noise, and one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from runtime.cli import encode_main, main
from runtime.common.shipped import SHIPPED_MODEL
from runtime.latents import latents_bytes, model_identity, read_latents, slerp
from runtime.noise import ImageNoise
from runtime.settings import SamplingSettings

CPU = ["--backend", "onnxruntime", "--device", "cpu", "--precision", "fp32", "--no-progress"]


def run(command, *args):
    return CliRunner().invoke(command, [str(SHIPPED_MODEL), *map(str, args), *CPU])


def test_encode_then_decode_and_ddim_runs_own_noise(tmp_path):
    assert run(main, "--steps", 10, "--num-images", 4, "--seed", 3, "--out", tmp_path / "s.png",
               "--npz", tmp_path / "s.npz").exit_code == 0
    result = run(encode_main, tmp_path / "s.npz", "--steps", 10, "--out", tmp_path / "lat.npz", "--batch-size", 3)
    assert result.exit_code == 0, result.output
    latents, settings = read_latents(tmp_path / "lat.npz", (1, 32, 32), model_identity(SHIPPED_MODEL))
    assert latents.shape == (4, 1, 32, 32) and settings["steps"] == 10 and settings["spacing"] == "uniform"
    with np.load(tmp_path / "lat.npz", allow_pickle=False) as data:
        assert data["names"].tolist() == [f"s.npz[{i}]" for i in range(4)]
    assert run(main, "--latents", tmp_path / "lat.npz", "--steps", 10, "--out", tmp_path / "d.png",
               "--npz", tmp_path / "d.npz").exit_code == 0
    original, decoded = np.load(tmp_path / "s.npz")["images"], np.load(tmp_path / "d.npz")["images"]
    assert np.abs(original.astype(int) - decoded).mean() < 30  # grey levels; falls with steps (benchmarks)
    # The x_T ddim-run --seed 3 draws, written as a latents file: decoding it gives ddim-run's images bit for bit.
    x_T = ImageNoise(3, range(4)).draw((1, 32, 32))
    (tmp_path / "drawn.npz").write_bytes(latents_bytes(x_T, SamplingSettings(10), model_identity(SHIPPED_MODEL),
                                                       ["0", "1", "2", "3"]))
    for eta in ("0", "0.5"):
        assert run(main, "--steps", 10, "--eta", eta, "--num-images", 4, "--seed", 3, "--out", tmp_path / "r.png",
                   "--npz", tmp_path / "r.npz").exit_code == 0
        assert run(main, "--latents", tmp_path / "drawn.npz", "--steps", 10, "--eta", eta, "--seed", 3,
                   "--batch-size", 3, "--out", tmp_path / "x.png", "--npz", tmp_path / "x.npz").exit_code == 0
        np.testing.assert_array_equal(np.load(tmp_path / "x.npz")["samples"], np.load(tmp_path / "r.npz")["samples"])


def test_image_to_image_and_interpolation(tmp_path):
    assert run(main, "--steps", 10, "--num-images", 2, "--out", tmp_path / "s.png", "--npz",
               tmp_path / "s.npz").exit_code == 0
    r = run(main, "--init-images", tmp_path / "s.npz", "--strength", 0.4, "--steps", 10, "--out", tmp_path / "e.png",
            "--npz", tmp_path / "e.npz")
    assert r.exit_code == 0, r.output
    assert np.load(tmp_path / "e.npz")["images"].shape == (2, 32, 32, 1)
    r = run(main, "--interpolate", 1, 2, "--frames", 5, "--steps", 10, "--out", tmp_path / "i.png", "--npz",
            tmp_path / "i.npz")
    assert r.exit_code == 0, r.output
    samples = np.load(tmp_path / "i.npz")["samples"]
    ends = [ImageNoise(s, [0]).draw((1, 32, 32)) for s in (1, 2)]
    ref = [run(main, "--steps", 10, "--num-images", 1, "--seed", s, "--out", tmp_path / f"{s}.png", "--npz",
               tmp_path / f"{s}.npz") for s in (1, 2)]
    assert all(x.exit_code == 0 for x in ref)
    np.testing.assert_array_equal(samples[0], np.load(tmp_path / "1.npz")["samples"][0])  # the ends are the seeds
    np.testing.assert_array_equal(samples[-1], np.load(tmp_path / "2.npz")["samples"][0])
    path = slerp(ends[0][0], ends[1][0], 5)
    norms = np.linalg.norm(path.reshape(5, -1), axis=1)
    assert np.ptp(norms) < 0.05 * norms.mean()  # spherical: the middle keeps a Gaussian latent's norm


def test_bad_input_is_one_line(tmp_path):
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((28, 28), np.uint8)).save(tmp_path / "small.png")
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("hello")
    np.savez(tmp_path / "nan.npz", latents=np.full((1, 1, 32, 32), np.nan, np.float32))
    np.savez(tmp_path / "wrong.npz", latents=np.zeros((1, 3, 32, 32), np.float32))
    other = latents_bytes(np.zeros((1, 1, 32, 32), np.float32), SamplingSettings(), "0" * 64, ["x"])
    (tmp_path / "other.npz").write_bytes(other)
    cases = [
        ((encode_main, tmp_path / "rgb.png"), "rgb.png has 3 channels (RGB); the model takes 1 (grey)"),
        ((encode_main, tmp_path / "small.png"), "small.png is 28x28; the model takes 32x32 images (pass --resize"),
        ((encode_main, tmp_path / "empty"), "empty holds no images"),
        ((encode_main, tmp_path / "notes.txt"), "notes.txt is not an image"),
        ((encode_main, tmp_path / "small.png", "--eta", 0.5), "inversion is deterministic DDIM"),
        ((main, "--latents", tmp_path / "nan.npz"), "latents hold NaN or Inf"),
        ((main, "--latents", tmp_path / "wrong.npz"), "this model takes (N, 1, 32, 32)"),
        ((main, "--latents", tmp_path / "other.npz"), "holds latents of another model"),
        ((main, "--init-images", tmp_path / "small.png", "--resize", "--strength", 0), "--strength must be in (0, 1]"),
        ((main, "--init-images", tmp_path / "small.png", "--resize", "--strength", 1.5), "--strength must be in (0, 1]"),
    ]
    for (command, *args), text in cases:
        result = run(command, *args, "--out", tmp_path / ("o.npz" if command is encode_main else "o.png"))
        lines = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 1 and len(lines) == 1 and text in lines[0], (args, result.output)
    ok = run(encode_main, tmp_path / "small.png", "--resize", "--steps", 5, "--out", tmp_path / "ok.npz")
    assert ok.exit_code == 0, ok.output
