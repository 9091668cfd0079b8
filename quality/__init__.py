"""Sample-quality scoring: Fréchet distance / KID maths, feature extractors, the Fashion-MNIST classifier.

Never used by training: ``quality`` imports ``trainer`` (datasets, weight loading) and ``runtime``,
neither of which imports it. The classifier's names load PyTorch on first use only, so the maths
(numpy + scipy) imports without it.

    python -m quality fid A B               # the standard FID of two image sets (see quality.fid)
    python -m quality classifier            # train the FD-classifier's feature network (see quality.cli)
"""

from __future__ import annotations

import importlib
from typing import Any

from quality.errors import QualityError
from quality.features import ClassifierFeatures, FeatureExtractor, make_extractor
from quality.metrics import (
    Stats, feature_stats, frechet_distance, kernel_inception_distance, max_abs_diff, psnr, reference_stats,
)

_CLASSIFIER = ("FORMAT", "SHIPPED", "ClassifierInfo", "FashionClassifier", "extract_features", "load_classifier",
               "predict", "save_classifier", "train_classifier", "write_classifier_folder")

__all__ = [
    "QualityError",
    "Stats", "feature_stats", "reference_stats", "frechet_distance", "kernel_inception_distance", "psnr",
    "max_abs_diff",
    "FeatureExtractor", "ClassifierFeatures", "InceptionFeatures", "make_extractor",
    *_CLASSIFIER,
]


def __getattr__(name: str) -> Any:
    """The classifier's names, imported (with PyTorch) when first asked for."""
    if name in _CLASSIFIER:
        return getattr(importlib.import_module("quality.classifier"), name)
    if name == "InceptionFeatures":
        return importlib.import_module("quality.inception").InceptionFeatures
    raise AttributeError(f"module 'quality' has no attribute {name!r}")
