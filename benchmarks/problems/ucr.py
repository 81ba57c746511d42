"""Real time series: windows of the UCR ArrowHead series, shipped inside the ``aeon`` wheel.

ArrowHead (Ye & Keogh, "Time Series Shapelets: A New Primitive for Data Mining", KDD 2009; in
the UCR archive, Dau et al., "The UCR Time Series Archive", IEEE/CAA J. Autom. Sinica 2019) holds
211 outlines of projectile points turned into series of length 251, in 3 classes. aeon ships
the files in its wheel and ``aeon.datasets.load_arrow_head`` reads them from the installed
package, so nothing is downloaded.

The official split trains on 36 series only, so the 211 series are pooled and split once by a
fixed, class-stratified shuffle (about two thirds for training). Each sample is a window of one
series: the model sees the first ``_CONTEXT`` steps and has three tasks on one 1-D CNN trunk:

- ``forecast``: the next ``_HORIZON`` values (one output per step, mean squared error);
- ``label``: the series' class (3 classes, cross-entropy);
- ``stat``: the mean and standard deviation of those next ``_HORIZON`` values (Huber loss).

Windows start at fixed offsets (every ``_STRIDE`` steps), so the data does not depend on any
seed; validation windows come from series no training window comes from.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import Budget, Split, TaskModel, constant_row, predict

__all__ = ["PROBLEM", "ArrowHead"]

#: The fixed seed of the train/validation shuffle: it does not depend on the run's seed.
_DATA_SEED = 20090628
_TRAIN_FRACTION = 2 / 3
_CONTEXT = 160
_HORIZON = 40
_STRIDE = 3
_SMOKE_SERIES = 4  # per split: 4 series x 18 windows
_CLASSES = 3


def _load_series() -> tuple[Tensor, Tensor]:
    """All 211 ArrowHead series, shape (211, 251), and their class indices."""
    from aeon.datasets import load_arrow_head  # type: ignore[import-untyped, unused-ignore]

    x, y = load_arrow_head(return_type="numpy2D")
    series = torch.as_tensor(x, dtype=torch.float32)
    names = sorted(set(y.tolist()))
    labels = torch.as_tensor([names.index(label) for label in y.tolist()], dtype=torch.long)
    return series, labels


def _stratified_split(labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Series indices for training and validation: each class split in the same proportion."""
    train, val = [], []
    for label in range(_CLASSES):
        members = (labels == label).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=generator)]
        cut = round(_TRAIN_FRACTION * len(members))
        train.append(members[:cut])
        val.append(members[cut:])
    return torch.cat(train).sort().values, torch.cat(val).sort().values


def _windows(series: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every window of every series: (context, next values, class), one row per window."""
    length = _CONTEXT + _HORIZON
    offsets = range(0, series.shape[1] - length + 1, _STRIDE)
    windows = torch.stack([series[:, start : start + length] for start in offsets], dim=1)
    classes = labels.unsqueeze(1).expand(-1, len(offsets))
    windows, classes = windows.flatten(0, 1), classes.flatten()
    return windows[:, :_CONTEXT], windows[:, _CONTEXT:], classes


class _Model(TaskModel):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv1d(1, 16, 7, padding=3),
            nn.ReLU(),
            nn.MaxPool1d(2),  # 80 steps
            nn.Conv1d(16, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),  # 40
            nn.Conv1d(32, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool1d(2),  # 20
            nn.Flatten(),
            nn.Linear(32 * (_CONTEXT // 8), 64),
            nn.ReLU(),
        )
        self.forecast = nn.Linear(64, _HORIZON)
        self.label = nn.Linear(64, _CLASSES)
        self.stat = nn.Linear(64, 2)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.trunk(x)
        return {
            "forecast": self.forecast(features),
            "label": self.label(features),
            "stat": self.stat(features),
        }


class ArrowHead:
    """Windows of ArrowHead series: forecast the next steps, classify, and summarize them."""

    name = "ucr"
    title = "UCR ArrowHead windows (aeon): forecast 40 steps, classify the series, their mean/std"
    tasks = ("forecast", "label", "stat")
    # Cross-entropy is one number per sample (not a mean over the 3 logits), so its size is 1.
    output_sizes: Mapping[str, int] = {"forecast": _HORIZON, "label": 1, "stat": 2}
    metrics: Mapping[str, str] = {
        "forecast": "RMSE",
        "label": "error rate (%)",
        "stat": "MAE (mean and std)",
    }
    budget = Budget(epochs=8, batch_size=64, lr=2e-3)

    def data(self, *, smoke: bool = False) -> tuple[Split, Split]:
        series, labels = _load_series()
        generator = torch.Generator().manual_seed(_DATA_SEED)
        train_ids, val_ids = _stratified_split(labels, generator)
        if smoke:
            train_ids, val_ids = train_ids[:_SMOKE_SERIES], val_ids[:_SMOKE_SERIES]
        train = _windows(series[train_ids], labels[train_ids])
        val = _windows(series[val_ids], labels[val_ids])
        # One scalar shift and scale for the inputs, from the training contexts; the targets
        # stay in the series' own (per-series z-normalized) units.
        mean, std = train[0].mean(), train[0].std()
        return self._split(train, mean, std), self._split(val, mean, std)

    @staticmethod
    def _split(windows: tuple[Tensor, Tensor, Tensor], mean: Tensor, std: Tensor) -> Split:
        context, future, classes = windows
        stat = torch.stack([future.mean(1), future.std(1)], dim=1)
        x = ((context - mean) / std).unsqueeze(1)  # (n, 1, _CONTEXT)
        return Split(x, {"forecast": future, "label": classes, "stat": stat})

    def model(self) -> TaskModel:
        return _Model()

    def losses(self, outputs: Mapping[str, Tensor], batch: Split) -> dict[str, Tensor]:
        return {
            "forecast": F.mse_loss(outputs["forecast"], batch.targets["forecast"]),
            "label": F.cross_entropy(outputs["label"], batch.targets["label"]),
            "stat": F.smooth_l1_loss(outputs["stat"], batch.targets["stat"]),
        }

    def evaluate(self, model: TaskModel, split: Split) -> dict[str, float]:
        outputs = predict(model, split.x)
        targets = split.targets
        return {
            "forecast": (outputs["forecast"] - targets["forecast"]).pow(2).mean().sqrt().item(),
            "label": 100.0 * (outputs["label"].argmax(1) != targets["label"]).float().mean().item(),
            "stat": (outputs["stat"] - targets["stat"]).abs().mean().item(),
        }

    def constant_outputs(self, train: Split) -> dict[str, Tensor]:
        return {
            "forecast": constant_row(train.targets["forecast"], "regression"),
            "label": constant_row(train.targets["label"], "class", 3),
            "stat": constant_row(train.targets["stat"], "regression"),
        }


PROBLEM = ArrowHead()
