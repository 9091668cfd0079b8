"""The Fashion-MNIST domain classifier whose penultimate features score samples (FD-classifier).

The standard FID needs InceptionV3 weights from the internet; this small CNN is trained here on
the Fashion-MNIST training split (32x32, zero-padded like the diffusion model's data) and shipped
in ``models/fashion-mnist-classifier/``. Its 128 penultimate features give a Fréchet distance that
is labelled "FD-classifier" everywhere: it is not comparable with published FIDs.

    python -m quality classifier                    # trains into a new runs/classifier-DATE-TIME/
    python -m quality classifier --replace-shipped  # retrains the shipped one (replaced atomically)

A classifier folder is written whole or not at all (:func:`write_classifier_folder`): a hidden staging
folder ``.NAME.partial-PID`` beside it is renamed into place once both files are complete; a replaced
folder moves to ``.NAME.old-PID`` first and is deleted once the new one is in place.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from safetensors.torch import save_file
from torch import nn
from torch.nn import functional as F

from quality.errors import QualityError
from runtime.common.progress import progress_bar
from runtime.common.files import PathLock, atomic_path, atomic_write_text, fsync_dir, read_capped, replace_dir
from runtime.common.shipped import SHIPPED_CLASSIFIER
from trainer.errors import CheckpointError
from trainer.rundir import load_weights, weights_bound

SHIPPED = SHIPPED_CLASSIFIER
WEIGHTS, INFO = "classifier.safetensors", "classifier.json"
FORMAT = "ddim-deploy.fashion-classifier/1"
_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<pid>\d+)$")
# Pixel statistics of the zero-padded 32x32 Fashion-MNIST training split.
MEAN, STD = 0.2190, 0.3318


class FashionClassifier(nn.Module):
    """32x32x1 -> 10 classes; ``features`` is the 128-d input of the last layer."""

    def __init__(self, width: int = 32, features: int = 128, classes: int = 10) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        w = width
        self.body = nn.Sequential(
            *block(1, w), nn.MaxPool2d(2),                         # 16x16
            *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2),  # 8x8
            *block(2 * w, 4 * w), nn.MaxPool2d(2),                 # 4x4
            nn.Flatten(), nn.Linear(16 * 4 * w, features), nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(features, classes)
        self.num_features = features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.body(x)))


@dataclass(frozen=True)
class ClassifierInfo:
    format: str
    width: int
    features: int
    image_size: int
    test_accuracy: float
    epochs: int
    seed: int
    train_seconds: float


def to_input(images: NDArray[np.uint8]) -> torch.Tensor:
    """uint8 ``(N, 32, 32)``, ``(N, 1, 32, 32)`` or ``(N, 32, 32, 1)`` -> normalised float tensor ``(N, 1, 32, 32)``."""
    a = np.asarray(images)
    if a.ndim == 4 and a.shape[-1] == 1:
        a = a[..., 0]
    elif a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 3 or a.shape[1:] != (32, 32) or a.dtype != np.uint8:
        raise ValueError(f"the Fashion-MNIST classifier takes uint8 32x32 grey images, got {a.dtype} {a.shape}")
    return ((torch.from_numpy(np.ascontiguousarray(a)).float() / 255.0 - MEAN) / STD)[:, None]


def _shift(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random translations by up to ``pad`` pixels (zero fill): the only augmentation."""
    padded = F.pad(x, (pad, pad, pad, pad), value=float(-MEAN / STD))
    dx, dy = (torch.randint(0, 2 * pad + 1, (2,), generator=gen)).tolist()
    return padded[:, :, dy : dy + x.shape[2], dx : dx + x.shape[3]]


@torch.no_grad()
def predict(model: FashionClassifier, images: NDArray[np.uint8], batch: int = 500) -> NDArray[np.int64]:
    model.eval()
    out = [model(to_input(images[i : i + batch])).argmax(1) for i in range(0, len(images), batch)]
    return torch.cat(out).numpy()


@torch.no_grad()
def extract_features(model: FashionClassifier, images: NDArray[np.uint8], batch: int = 500) -> NDArray[np.float64]:
    """Penultimate features ``(N, 128)`` in float64."""
    model.eval()
    out = [model.features(to_input(images[i : i + batch])) for i in range(0, len(images), batch)]
    return torch.cat(out).double().numpy()


def train_classifier(train: tuple[NDArray[np.uint8], NDArray[np.integer]],
                     test: tuple[NDArray[np.uint8], NDArray[np.integer]], epochs: int = 4, batch_size: int = 128,
                     lr: float = 2e-3, seed: int = 0, width: int = 32,
                     progress: bool = True) -> tuple[FashionClassifier, ClassifierInfo]:
    """Adam with a cosine learning rate, random shifts; returns the model and its test accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = FashionClassifier(width)
    x_all, y_all = to_input(train[0]), torch.from_numpy(np.asarray(train[1], dtype=np.int64))
    steps = epochs * ((len(x_all) + batch_size - 1) // batch_size)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    start = time.perf_counter()
    bar = progress_bar(total=steps, desc="classifier", disable=not progress, dynamic_ncols=True)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x_all), generator=gen)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            loss = F.cross_entropy(model(_shift(x_all[idx], gen)), y_all[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update()
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    seconds = time.perf_counter() - start
    acc = float((predict(model, test[0]) == np.asarray(test[1])).mean())
    return model.eval(), ClassifierInfo(FORMAT, width, model.num_features, 32, acc, epochs, seed, round(seconds, 1))


def save_classifier(model: FashionClassifier, info: ClassifierInfo, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp, metadata={"format": FORMAT})
    atomic_write_text(folder / INFO, json.dumps(asdict(info), indent=2) + "\n")


def load_classifier(folder: Path = SHIPPED) -> tuple[FashionClassifier, ClassifierInfo]:
    """The classifier of ``folder`` (default: the shipped one), checked against its description."""
    try:
        raw = json.loads(read_capped(folder / INFO, what="classifier description"))
        info = ClassifierInfo(**raw)
    except FileNotFoundError:
        raise CheckpointError(f"no Fashion-MNIST classifier in {folder} (train one: python -m quality classifier)") \
            from None
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{folder / INFO} is not a classifier description: {exc}") from None
    if info.format != FORMAT:
        raise CheckpointError(f"{folder / INFO} has format {info.format!r}; this version reads {FORMAT!r}")
    model = FashionClassifier(info.width, info.features)
    try:
        model.load_state_dict(load_weights(folder / WEIGHTS, weights_bound(model)))
    except (CheckpointError, RuntimeError) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"cannot load classifier weights {folder / WEIGHTS}: {msg}") from None
    return model.eval(), info


def write_classifier_folder(model: FashionClassifier, info: ClassifierInfo, out: Path, replace: bool = False) -> None:
    """Write the classifier into ``out`` whole or not at all (see the module docstring).

    A new ``out`` must be absent or an empty folder (QualityError otherwise). With ``replace`` an
    existing classifier folder is replaced; its other files (a README) are carried over. One writer
    at a time per folder (an OS lock); what a killed writer left is cleaned up first.
    """
    if out.name in ("", ".", ".."):  # staging and the lock live beside out: it needs a name
        out = out.resolve()
    with PathLock(out, "classifier folder"):
        _recover(out)
        check_out(out, replace)
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            if out.is_dir():
                for p in out.iterdir():
                    if p.name not in (WEIGHTS, INFO) and p.is_file() and not p.is_symlink():
                        shutil.copy2(p, staging / p.name)
            save_classifier(model, info, staging)
            replace_dir(staging, out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


def check_out(out: Path, replace: bool = False) -> None:
    """Refuse an ``out`` the classifier may not be written into (QualityError); see
    :func:`write_classifier_folder`."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise QualityError(f"{out} is not a folder; pick another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not replace:
        raise QualityError(f"--out {out} is not empty; pick a new folder (nothing is written over)")
    if not (out / INFO).is_file():
        raise QualityError(f"{out} holds no classifier ({INFO}); it is never replaced")


def _recover(out: Path) -> None:
    """Remove staging folders a killed writer left beside ``out`` (we hold its lock: every one is
    stale) and put back a classifier folder that a kill between the two renames left aside."""
    if not out.parent.is_dir():
        return
    found = [(m["kind"], p) for p in out.parent.iterdir()
             if (m := _STAGING.match(p.name)) and m["name"] == out.name and p.is_dir() and not p.is_symlink()]
    for kind, p in sorted(found, key=lambda kp: (kp[0] != "old", -kp[1].stat().st_mtime)):  # newest old first
        if kind == "old" and not out.exists() and (p / INFO).is_file():
            os.replace(p, out)
            fsync_dir(out.parent)
        else:
            shutil.rmtree(p, ignore_errors=True)


