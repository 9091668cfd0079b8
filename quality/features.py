"""Feature extractors whose features the Fréchet distance and KID of :mod:`quality.metrics` compare.

Two extractors: ``classifier`` (the Fashion-MNIST CNN of :mod:`quality.classifier`, the shipped one
unless told otherwise; its scores are "FD-classifier", never FID) and ``inception`` (pytorch-fid's
InceptionV3 pool3 with the ``pt_inception-2015-12-05`` weights: the standard FID, for users who can
install pytorch-fid / torchvision and fetch the weights).
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from numpy.typing import NDArray

from quality.errors import QualityError
from runtime.extras import install_hint

INCEPTION_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth"
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


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
        from quality.classifier import SHIPPED, load_classifier

        self.model, self.info = load_classifier(folder or SHIPPED)

    def features(self, images: NDArray[np.uint8]) -> NDArray[np.float64]:
        from quality.classifier import extract_features

        return extract_features(self.model, images)


class InceptionFeatures(FeatureExtractor):
    """pytorch-fid's InceptionV3 pool3 (2048 features) with the TF FID weights: the standard FID."""

    name, score_name = "inception", "FID"

    def __init__(self, weights: Path | None = None, device: str = "cpu",
                 fetch: Callable[[], Path] | None = None) -> None:
        try:
            from pytorch_fid import inception as pfi
        except Exception as exc:  # ImportError, or torchvision failing to import beside this torch
            raise QualityError(f"the Inception extractor needs pytorch-fid ({install_hint('fid')}): "
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
