"""Sample-quality maths: Fréchet distance, KID and same-noise parity (PSNR, largest pixel difference).

The Fréchet distance between Gaussians fitted to two feature sets is
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017), with the matrix square root
from ``scipy.linalg.sqrtm`` and the numerical care of pytorch-fid (a small diagonal offset when the
product is near-singular, the imaginary rounding residue dropped only when negligible). KID is the
unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3`` averaged over random subsets
(Binkowski et al. 2018), as in torch-fidelity and torchmetrics. The features come from
:mod:`quality.features`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import NDArray
from scipy import linalg

from quality.errors import QualityError

if TYPE_CHECKING:
    from quality.features import FeatureExtractor


@dataclass(frozen=True)
class Stats:
    mu: NDArray[np.float64]
    sigma: NDArray[np.float64]
    n: int


def feature_stats(features: NDArray[np.floating]) -> Stats:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise QualityError(f"need at least two feature vectors (N, D), got shape {f.shape}")
    return Stats(f.mean(axis=0), np.cov(f, rowvar=False), len(f))


def reference_stats(ext: "FeatureExtractor", images: NDArray[np.uint8], n: int = 10_000, seed: int = 0) -> Stats:
    """Feature statistics of up to ``n`` images drawn (seeded, without replacement) from a reference set
    ``(N, C, H, W)`` uint8."""
    pick = np.random.default_rng(seed).choice(len(images), min(n, len(images)), replace=False)
    return feature_stats(ext.features(images[pick].transpose(0, 2, 3, 1)))


def frechet_distance(a: Stats, b: Stats, eps: float = 1e-6) -> float:
    """Fréchet distance between the Gaussians ``N(a.mu, a.sigma)`` and ``N(b.mu, b.sigma)``."""
    if a.mu.shape != b.mu.shape:
        raise QualityError(f"feature sizes differ: {a.mu.shape[0]} vs {b.mu.shape[0]}")
    diff = a.mu - b.mu
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sqrtm warns on near-singular products; handled below
        covmean = linalg.sqrtm(a.sigma @ b.sigma)
    if not np.isfinite(covmean).all():
        offset = np.eye(a.sigma.shape[0]) * eps
        covmean = linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise QualityError(f"matrix square root has a large imaginary part ({np.abs(covmean.imag).max():.3g})")
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))


def kernel_inception_distance(x: NDArray[np.floating], y: NDArray[np.floating], subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """KID (mean, std over subsets): unbiased MMD^2 with the kernel ``(x.y / d + 1)^3``."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise QualityError(f"KID needs two (N, D) feature sets of the same D, got {x.shape} and {y.shape}")
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise QualityError("KID needs at least two samples in each set")
    d = x.shape[1]
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(subsets):
        a = x[rng.choice(len(x), m, replace=False)]
        b = y[rng.choice(len(y), m, replace=False)]
        kxx, kyy, kxy = ((a @ a.T / d + 1) ** 3, (b @ b.T / d + 1) ** 3, (a @ b.T / d + 1) ** 3)
        off = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        scores.append(off - 2 * kxy.mean())
    return float(np.mean(scores)), float(np.std(scores))


def psnr(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> float:
    """Peak signal-to-noise ratio of two uint8 image sets, in dB (inf when identical)."""
    if a.shape != b.shape:
        raise QualityError(f"image sets differ in shape: {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def max_abs_diff(a: NDArray[np.uint8], b: NDArray[np.uint8]) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
