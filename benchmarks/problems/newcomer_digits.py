"""Real images, the model a newcomer writes first: an MLP on scikit-learn's 8x8 digits.

Held-out problem: its code, data and budget were committed before any method ran on it; the git
history shows the order.

The digits are the UCI optical-recognition digits that scikit-learn ships in its wheel
(``sklearn.datasets.load_digits``: 1797 images of 8x8 pixels, values 0..16), so nothing is
downloaded. The input is the flattened image scaled to [0, 1] (64 values, no noise). Three tasks
share a two-layer MLP trunk (64 -> 128 -> 64, ReLU), each with one linear head on its 64
features:

- ``digit``: the digit, 10 logits, cross-entropy; metric: error rate (%);
- ``parity``: whether the digit is odd, 1 logit, binary cross-entropy with logits; metric: error
  rate (%);
- ``reconstruction``: the clean image itself (64 pixels in [0, 1]), mean squared error; metric:
  RMSE. An autoencoder task whose loss has a different size and scale than the classifiers'.

The 1797 images are split once by a fixed permutation (data seed 30): 1200 training images and
597 validation images; ``load_digits`` holds no two identical images, so no validation image is
a training image. Nothing is dropped. ``smoke=True`` keeps the first 48 training and the first
24 validation images of the same split.

The budget (Adam at 1e-3, batch 64, 30 epochs: 570 steps) was fixed before any run.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import Budget, Split, TaskModel, predict

__all__ = ["PROBLEM", "NewcomerDigits"]

#: The fixed seed of the train/validation permutation: it does not depend on the run's seed.
_DATA_SEED = 30
_TRAIN_IMAGES = 1200  # of 1797; the other 597 are the validation images
_SMOKE = (48, 24)
_PIXELS = 64
_CLASSES = 10


def _load_images() -> tuple[Tensor, Tensor]:
    """The 1797 flattened digit images scaled to [0, 1], shape (1797, 64), and their labels."""
    try:
        from sklearn.datasets import load_digits  # type: ignore[import-untyped, unused-ignore]
    except ImportError as error:
        raise ModuleNotFoundError(
            "newcomer_digits reads the digits scikit-learn ships in its wheel "
            "(sklearn/datasets/data/digits.csv.gz): install scikit-learn"
        ) from error
    try:
        digits = load_digits()
    except FileNotFoundError as error:
        raise FileNotFoundError(
            "newcomer_digits: scikit-learn's bundled digits file "
            f"(sklearn/datasets/data/digits.csv.gz) is missing: {error}"
        ) from error
    images = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    if images.shape != (1797, _PIXELS):
        raise ValueError(f"newcomer_digits: expected 1797 images of 64 pixels, got {images.shape}")
    return images, labels


class _Model(TaskModel):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(_PIXELS, 128),
            nn.ReLU(),
            nn.Linear(128, 64),
            nn.ReLU(),
        )
        self.digit = nn.Linear(64, _CLASSES)
        self.parity = nn.Linear(64, 1)
        self.reconstruction = nn.Linear(64, _PIXELS)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.trunk(x)
        return {
            "digit": self.digit(features),
            "parity": self.parity(features),
            "reconstruction": self.reconstruction(features),
        }


class NewcomerDigits:
    """8x8 digits through an MLP: classify the digit, its parity, and reconstruct the image."""

    name = "newcomer_digits"
    title = "8x8 digits (sklearn), MLP: digit, odd/even, reconstruct the image (held out)"
    tasks = ("digit", "parity", "reconstruction")
    # Cross-entropy is one number per sample (not a mean over the 10 logits), so its size is 1.
    output_sizes: Mapping[str, int] = {"digit": 1, "parity": 1, "reconstruction": _PIXELS}
    metrics: Mapping[str, str] = {
        "digit": "error rate (%)",
        "parity": "error rate (%)",
        "reconstruction": "RMSE (pixels in [0, 1])",
    }
    #: The smallest non-zero value of each error-rate metric (one validation sample, in %), for
    #: Δm when a task trained alone scores 0. Added after the held-out runs began, when
    #: blood_pressure's phase trained alone scored 0 % on a seed; it changes nothing else.
    metric_floor: Mapping[str, float] = {"digit": 100 / 597, "parity": 100 / 597}
    #: Fixed before any method ran on this problem (held out): not tuned.
    budget = Budget(epochs=30, batch_size=64, lr=1e-3)
    #: What ``data()`` dropped: nothing.
    dropped: Mapping[str, int] = {"images": 0}

    def data(self, *, smoke: bool = False) -> tuple[Split, Split]:
        images, labels = _load_images()
        generator = torch.Generator().manual_seed(_DATA_SEED)
        order = torch.randperm(len(images), generator=generator)
        train_ids, val_ids = order[:_TRAIN_IMAGES], order[_TRAIN_IMAGES:]
        if smoke:
            train_ids, val_ids = train_ids[: _SMOKE[0]], val_ids[: _SMOKE[1]]
        return self._split(images[train_ids], labels[train_ids]), self._split(
            images[val_ids], labels[val_ids]
        )

    @staticmethod
    def _split(images: Tensor, labels: Tensor) -> Split:
        targets = {
            "digit": labels,
            "parity": (labels % 2).float().unsqueeze(1),  # (n, 1): 1 for an odd digit
            "reconstruction": images,
        }
        return Split(images, targets)

    def model(self) -> TaskModel:
        return _Model()

    def losses(self, outputs: Mapping[str, Tensor], batch: Split) -> dict[str, Tensor]:
        targets = batch.targets
        return {
            "digit": F.cross_entropy(outputs["digit"], targets["digit"]),
            "parity": F.binary_cross_entropy_with_logits(outputs["parity"], targets["parity"]),
            "reconstruction": F.mse_loss(outputs["reconstruction"], targets["reconstruction"]),
        }

    def evaluate(self, model: TaskModel, split: Split) -> dict[str, float]:
        outputs = predict(model, split.x)
        targets = split.targets
        digit_wrong = outputs["digit"].argmax(1) != targets["digit"]
        parity_wrong = (outputs["parity"] > 0).float() != targets["parity"]
        residual = outputs["reconstruction"] - targets["reconstruction"]
        return {
            "digit": 100.0 * digit_wrong.float().mean().item(),
            "parity": 100.0 * parity_wrong.float().mean().item(),
            "reconstruction": residual.pow(2).mean().sqrt().item(),
        }

    def constant_outputs(self, train: Split) -> dict[str, Tensor]:
        """Per task, the one output row (no batch axis) that a model ignoring its input predicts.

        The training targets' mean for a regression output, log class frequencies as logits for
        a class, the logit of the positive rate for a binary target.
        """
        targets = train.targets
        counts = torch.bincount(targets["digit"], minlength=_CLASSES).float()
        # An absent class gets a frequency of 1e-6 (a finite logit) instead of log(0).
        frequencies = (counts / counts.sum()).clamp(min=1e-6)
        odd = targets["parity"].mean(0).clamp(1e-6, 1 - 1e-6)
        return {
            "digit": frequencies.log(),
            "parity": torch.logit(odd),
            "reconstruction": targets["reconstruction"].mean(0),
        }


PROBLEM = NewcomerDigits()
