"""Feature extractors whose features the Fréchet distance and KID of :mod:`quality.metrics` compare.

Two extractors: ``classifier`` (the Fashion-MNIST CNN of :mod:`quality.classifier`, the shipped one
unless told otherwise; its scores are "FD-classifier", never FID) and ``inception`` (InceptionV3 pool3
with the TF FID weights, :mod:`quality.inception`: the standard FID; extra ``fid``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from quality.errors import QualityError


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


def make_extractor(name: str, inception_weights: Path | None = None, classifier: Path | None = None,
                   device: str = "cpu", **inception: Any) -> FeatureExtractor:
    """``classifier`` or ``inception`` (keyword arguments of :class:`quality.inception.InceptionFeatures`
    pass through: threads, resize, engine, batch_size, progress)."""
    if name == "classifier":
        return ClassifierFeatures(classifier)
    if name == "inception":
        from quality.inception import InceptionFeatures

        return InceptionFeatures(inception_weights, device, **inception)
    raise QualityError(f"unknown feature extractor {name!r}; allowed: classifier, inception")
