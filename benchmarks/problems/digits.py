"""Real images: pairs of scikit-learn's 8x8 handwritten digits, MultiMNIST-style.

Each sample is two digits placed side by side (an 8x16 image) with Gaussian noise added. Three
tasks share one small CNN: ``left`` and ``right`` classify the two digits (10 classes each,
cross-entropy), ``pixels`` denoises the image (the clean 8x16 image, 128 outputs, mean squared
error). The two-digit construction follows MultiMNIST as used by Sener & Koltun, "Multi-Task
Learning as Multi-Objective Optimization" (NeurIPS 2018); the denoising head adds a dense task
whose loss has a different size and scale than the classifiers'.

The digits are the UCI optical-recognition digits that scikit-learn ships in its wheel
(``sklearn.datasets.load_digits``: 1797 images, pixel values 0..16), so nothing is downloaded.
The 1797 images are split first (a fixed permutation): training pairs are drawn from one part,
validation pairs from the other, so no validation image was seen in training.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import Budget, Split, TaskModel, constant_row, predict

__all__ = ["PROBLEM", "Digits"]

#: The fixed seed of everything ``data()`` draws: it does not depend on the run's seed.
_DATA_SEED = 20180418
_TRAIN_IMAGES = 1200  # of 1797; the other 597 are the validation images
_TRAIN_PAIRS = 3000
_VAL_PAIRS = 1000
_SMOKE_PAIRS = 32
#: Standard deviation of the input noise, in units of the [0, 1]-scaled pixels.
_NOISE = 0.3


def _load_images() -> tuple[Tensor, Tensor]:
    """The 1797 digit images scaled to [0, 1], shape (1797, 8, 8), and their labels."""
    from sklearn.datasets import load_digits  # type: ignore[import-untyped, unused-ignore]

    digits = load_digits()
    images = torch.as_tensor(digits.images, dtype=torch.float32) / 16.0
    labels = torch.as_tensor(digits.target, dtype=torch.long)
    return images, labels


def _pairs(
    images: Tensor, labels: Tensor, pool: Tensor, count: int, generator: torch.Generator
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``count`` side-by-side pairs of images from ``pool``: (noisy, clean, left, right)."""
    left = pool[torch.randint(len(pool), (count,), generator=generator)]
    right = pool[torch.randint(len(pool), (count,), generator=generator)]
    clean = torch.cat([images[left], images[right]], dim=2)  # (count, 8, 16)
    noisy = clean + _NOISE * torch.randn(clean.shape, generator=generator)
    return noisy, clean, labels[left], labels[right]


class _Model(TaskModel):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),  # (32, 4, 8)
            nn.Flatten(),
            nn.Linear(32 * 4 * 8, 128),
            nn.ReLU(),
        )
        self.left = nn.Linear(128, 10)
        self.right = nn.Linear(128, 10)
        self.pixels = nn.Linear(128, 8 * 16)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.trunk(x)
        return {
            "left": self.left(features),
            "right": self.right(features),
            "pixels": self.pixels(features),
        }


class Digits:
    """Two noisy 8x8 digits side by side: classify each, and denoise the image."""

    name = "digits"
    title = "two 8x8 digits side by side (sklearn): classify left, classify right, denoise"
    tasks = ("left", "right", "pixels")
    # Cross-entropy is one number per sample (not a mean over the 10 logits), so its size is 1.
    output_sizes: Mapping[str, int] = {"left": 1, "right": 1, "pixels": 8 * 16}
    metrics: Mapping[str, str] = {
        "left": "error rate (%)",
        "right": "error rate (%)",
        "pixels": "RMSE (pixels in [0, 1])",
    }
    budget = Budget(epochs=8, batch_size=64, lr=2e-3)

    def data(self, *, smoke: bool = False) -> tuple[Split, Split]:
        images, labels = _load_images()
        generator = torch.Generator().manual_seed(_DATA_SEED)
        order = torch.randperm(len(images), generator=generator)
        train_pool, val_pool = order[:_TRAIN_IMAGES], order[_TRAIN_IMAGES:]
        n_train, n_val = (_SMOKE_PAIRS, _SMOKE_PAIRS) if smoke else (_TRAIN_PAIRS, _VAL_PAIRS)
        train = _pairs(images, labels, train_pool, n_train, generator)
        val = _pairs(images, labels, val_pool, n_val, generator)
        # One scalar shift and scale for the inputs, from the training inputs.
        mean, std = train[0].mean(), train[0].std()
        return self._split(train, mean, std), self._split(val, mean, std)

    @staticmethod
    def _split(pairs: tuple[Tensor, Tensor, Tensor, Tensor], mean: Tensor, std: Tensor) -> Split:
        noisy, clean, left, right = pairs
        x = ((noisy - mean) / std).unsqueeze(1)  # (n, 1, 8, 16)
        return Split(x, {"left": left, "right": right, "pixels": clean.flatten(1)})

    def model(self) -> TaskModel:
        return _Model()

    def losses(self, outputs: Mapping[str, Tensor], batch: Split) -> dict[str, Tensor]:
        return {
            "left": F.cross_entropy(outputs["left"], batch.targets["left"]),
            "right": F.cross_entropy(outputs["right"], batch.targets["right"]),
            "pixels": F.mse_loss(outputs["pixels"], batch.targets["pixels"]),
        }

    def evaluate(self, model: TaskModel, split: Split) -> dict[str, float]:
        outputs = predict(model, split.x)
        metrics = {
            task: 100.0 * (outputs[task].argmax(1) != split.targets[task]).float().mean().item()
            for task in ("left", "right")
        }
        metrics["pixels"] = (
            (outputs["pixels"] - split.targets["pixels"]).pow(2).mean().sqrt().item()
        )
        return metrics

    def constant_outputs(self, train: Split) -> dict[str, Tensor]:
        return {
            "left": constant_row(train.targets["left"], "class", 10),
            "right": constant_row(train.targets["right"], "class", 10),
            "pixels": constant_row(train.targets["pixels"], "regression"),
        }


PROBLEM = Digits()
