"""Real training on real data: run on purpose with ``./scripts/test -m slow``."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest

from trainer.data.fashion_mnist import DEBIAN_DIR
from trainer.presets import get_preset
from trainer.train import fit

pytestmark = pytest.mark.slow


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_preset_learns(tmp_path: Path):
    """300 steps of the real preset on the real data: the loss must fall well below its start."""
    cfg = get_preset("fashion-mnist").config
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=300, sample_every=300,
                                                             checkpoint_every=300, log_every=10))
    result = fit(cfg, tmp_path / "run", progress=False)
    assert result.step == 300
    with open(tmp_path / "run" / "loss.csv") as fh:
        losses = [float(r["loss"]) for r in csv.DictReader(fh)]
    assert sum(losses[-5:]) / 5 < 0.6 * losses[0]
