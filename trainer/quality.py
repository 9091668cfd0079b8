"""Sample-quality maths: Fréchet distance, KID, same-noise parity, and the feature extractors.

The Fréchet distance between Gaussians fitted to two feature sets is
``|mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1 S2)^(1/2))`` (Heusel et al. 2017), with the matrix square root
from ``scipy.linalg.sqrtm`` and the numerical care of pytorch-fid (a small diagonal offset when the
product is near-singular, the imaginary rounding residue dropped only when negligible). KID is the
unbiased MMD^2 with the cubic polynomial kernel ``(x.y / d + 1)^3`` averaged over random subsets
(Binkowski et al. 2018), as in torch-fidelity and torchmetrics.

Two extractors: ``classifier`` (the shipped Fashion-MNIST CNN; its scores are "FD-classifier",
never FID) and ``inception`` (pytorch-fid's InceptionV3 pool3 with the ``pt_inception-2015-12-05``
weights: the standard FID, for users who can install pytorch-fid / torchvision and fetch the weights).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from numpy.typing import NDArray
from scipy import linalg

from trainer.errors import TrainerError

INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


class QualityError(TrainerError, ValueError):
    """Feature sets that cannot be compared, or an extractor that cannot be built."""


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


class FeatureExtractor:
    """``name`` (what its distance is called), ``features(images uint8 NHWC) -> (N, D)``."""

    name: str
    score_name: str

    def features(self, images: NDArray[np.uint8]) -> NDArray[np.float64]:
        raise NotImplementedError


class ClassifierFeatures(FeatureExtractor):
    """The shipped Fashion-MNIST classifier's 128 penultimate features (32x32 grey images)."""

    name, score_name = "classifier", "FD-classifier"

    def __init__(self, folder: Path | None = None) -> None:
        from trainer.classifier import SHIPPED, load_classifier

        self.model, self.info = load_classifier(folder or SHIPPED)

    def features(self, images: NDArray[np.uint8]) -> NDArray[np.float64]:
        from trainer.classifier import extract_features

        return extract_features(self.model, images)


class InceptionFeatures(FeatureExtractor):
    """pytorch-fid's InceptionV3 pool3 (2048 features) with the TF FID weights: the standard FID."""

    name, score_name = "inception", "FID"

    def __init__(self, weights: Path | None = None, device: str = "cpu",
                 fetch: Callable[[], Path] | None = None) -> None:
        try:
            from pytorch_fid import inception as pfi
        except Exception as exc:  # ImportError, or torchvision failing to import beside this torch
            raise QualityError(f"the Inception extractor needs pytorch-fid (pip install 'ddim-deploy[fid]'): "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        path = weights if weights is not None else (fetch or fetch_inception_weights)()
        if not path.is_file():
            raise QualityError(f"Inception weights {path} do not exist")
        import torch

        with _local_weights(pfi, path):
            self.model = pfi.InceptionV3([pfi.InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                         normalize_input=True, use_fid_inception=True).eval().to(device)
        self.device = device
        self._torch = torch

    def features(self, images: NDArray[np.uint8]) -> NDArray[np.float64]:
        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(images), 50):
                x = torch.from_numpy(np.ascontiguousarray(images[i : i + 50])).permute(0, 3, 1, 2).float() / 255.0
                if x.shape[1] == 1:
                    x = x.expand(-1, 3, -1, -1)
                out.append(self.model(x.to(self.device))[0].flatten(1).double().cpu())
        return torch.cat(out).numpy()


@contextlib.contextmanager
def _local_weights(pfi: Any, path: Path) -> Iterator[None]:
    """pytorch-fid fetches its weights by URL and unpickles them fully; give it the local file, tensors only."""
    import torch

    def load(*_: Any, **__: Any) -> Any:
        return torch.load(path, map_location="cpu", weights_only=True)

    saved = pfi.load_state_dict_from_url
    pfi.load_state_dict_from_url = load
    try:
        yield
    finally:
        pfi.load_state_dict_from_url = saved


def fetch_inception_weights() -> Path:
    """The pytorch-fid Inception weights in the cache folder, downloaded once (SHA-256 prefix checked)."""
    from runtime.files import cache_dir
    from trainer.data.download import RemoteFile, fetch

    remote = RemoteFile(INCEPTION_FILE, (INCEPTION_URL,), None, sha256_prefix="6726825d")
    return fetch(remote, cache_dir() / "inception")


def make_extractor(name: str, inception_weights: Path | None = None, classifier: Path | None = None,
                   device: str = "cpu") -> FeatureExtractor:
    if name == "classifier":
        return ClassifierFeatures(classifier)
    if name == "inception":
        return InceptionFeatures(inception_weights, device)
    raise QualityError(f"unknown feature extractor {name!r}; allowed: classifier, inception")
