"""Leaf outlines: six tasks of mixed kinds on OSULeaf, shipped inside aeon; a dilated-conv trunk.

Held-out problem (round 4 of the default study): its code, data and budget were committed
before any method ran on it; the git history shows the order.

OSULeaf (Gandhi, "Content-Based Image Retrieval: Plant Species Identification", MSc thesis,
Oregon State University, 2002; in the UCR archive) holds 442 leaf outlines of 6 species, each
a series of 427 values (the outline's distance from its centre, walked around it). aeon ships
the files in its wheel (``aeon/datasets/data/OSULeaf/OSULeaf_{TRAIN,TEST}.ts``: 200 + 242
outlines); they are read from the installed package, so nothing is downloaded.

The official split is pooled and shuffled once by a fixed permutation (data seed 2002): 332
training and 110 validation outlines. Values are standardized with one global mean and
standard deviation of the training outlines. The input is the standardized outline plus
Gaussian noise of standard deviation 0.3 (drawn once, from the data seed), one channel. The
trunk is ``blood_pressure``'s: dilated 1-D convolutions giving 32 features per position. Six
tasks, each with a head that takes the trunk's output as it is (a pooling, if any, is the
head's first layer):

- ``species``: which of the 6 species (cross-entropy); head: the mean over positions, then a
  linear layer; metric: error rate (%);
- ``denoise``: the clean outline (427 outputs, mean squared error); head: a linear layer per
  position; metric: RMSE;
- ``peak``: the position of the clean outline's maximum, divided by 427 (1 output, Huber loss
  with delta 1: small residuals, its quadratic regime); head: the mean over positions, then a
  linear layer; metric: MAE in positions;
- ``roughness``: the standard deviation of the clean outline's first difference, standardized
  on the training outlines (1 output, mean squared error); head: the mean over positions, then
  a linear layer; metric: MAE (standardized);
- ``first_half``: whether that maximum lies in the first half of the walk (1 logit, binary
  cross-entropy with logits); head: the maximum over positions, then a linear layer; metric:
  error rate (%);
- ``tail``: the mean of the clean outline's last 32 values (1 output, L1 loss); head: the last
  position's features, then a linear layer; metric: MAE (standardized).

Nothing is dropped (every outline has 427 values and a label). ``smoke=True`` keeps the first
32 training and the first 24 validation outlines of the same split.

The budget (Adam at 1e-3, batch 32, 40 epochs: 440 steps) was fixed before any run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import Budget, Split, TaskModel, aeon_data, constant_row, predict
from .blood_pressure import _Encoder, _LastStep, _MeanOverTime

__all__ = ["PROBLEM", "Leaves"]

#: The fixed seed of the permutation and the input noise: it does not depend on the run's seed.
_DATA_SEED = 2002
_OUTLINES = 442  # 200 + 242
_TRAIN = 332  # the other 110 are the validation outlines
_SMOKE = (32, 24)
_LENGTH = 427
_SPECIES = 6
_NOISE = 0.3  # in standardized units
_TAIL = 32
_REGRESSION = ("denoise", "peak", "roughness", "tail")


def _data_dir() -> Path:
    return aeon_data("leaves", "OSULeaf files", "OSULeaf")


def _read(path: Path) -> tuple[list[list[float]], list[int]]:
    """The outlines and species of a univariate .ts file (``v1,...,v427:label`` rows)."""
    if not path.is_file():
        raise FileNotFoundError(f"leaves: the data file {path} is missing")
    outlines, labels = [], []
    in_data = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        values, label = line.rsplit(":", 1)
        outline = [float(v) for v in values.split(",")]
        if len(outline) != _LENGTH:
            raise ValueError(
                f"leaves: {path.name} line {number}: expected {_LENGTH} values, got {len(outline)}"
            )
        outlines.append(outline)
        labels.append(int(label))
    return outlines, labels


def _load() -> tuple[Tensor, Tensor]:
    """All 442 outlines (442, 427), TRAIN then TEST, and their species 0-5."""
    folder = _data_dir()
    outlines, labels = [], []
    for part in ("TRAIN", "TEST"):
        o, y = _read(folder / f"OSULeaf_{part}.ts")
        outlines += o
        labels += y
    series = torch.tensor(outlines, dtype=torch.float64)
    if series.shape != (_OUTLINES, _LENGTH) or not torch.isfinite(series).all():
        raise ValueError(
            f"leaves: expected {_OUTLINES} finite outlines of {_LENGTH} values in {folder}, "
            f"got {tuple(series.shape)}"
        )
    species = torch.tensor(labels, dtype=torch.long) - 1
    if set(species.tolist()) != set(range(_SPECIES)):
        raise ValueError(f"leaves: expected species 1 to {_SPECIES} in {folder}")
    return series, species


class _MaxOverPositions(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.amax(1)


class _Model(TaskModel):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Encoder(1)
        self.species = nn.Sequential(_MeanOverTime(), nn.Linear(32, _SPECIES))
        self.denoise = nn.Sequential(nn.Linear(32, 1), nn.Flatten(1))  # (batch, 427)
        self.peak = nn.Sequential(_MeanOverTime(), nn.Linear(32, 1))
        self.roughness = nn.Sequential(_MeanOverTime(), nn.Linear(32, 1))
        self.first_half = nn.Sequential(_MaxOverPositions(), nn.Linear(32, 1))
        self.tail = nn.Sequential(_LastStep(), nn.Linear(32, 1))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.trunk(x)
        return {
            "species": self.species(features),
            "denoise": self.denoise(features),
            "peak": self.peak(features),
            "roughness": self.roughness(features),
            "first_half": self.first_half(features),
            "tail": self.tail(features),
        }


class Leaves:
    """Noisy leaf outlines: the species, the clean outline, its peak and summaries."""

    name = "leaves"
    title = "OSULeaf outlines (aeon), dilated CNN on noisy outlines: six mixed tasks (held out)"
    tasks = ("species", "denoise", "peak", "roughness", "first_half", "tail")
    # Elements per sample each loss is a mean over: a class or a logit is 1.
    output_sizes: Mapping[str, int] = {
        "species": 1,
        "denoise": _LENGTH,
        "peak": 1,
        "roughness": 1,
        "first_half": 1,
        "tail": 1,
    }
    metrics: Mapping[str, str] = {
        "species": "error rate (%)",
        "denoise": "RMSE (standardized)",
        "peak": "MAE (positions)",
        "roughness": "MAE (standardized)",
        "first_half": "error rate (%)",
        "tail": "MAE (standardized)",
    }
    #: The smallest non-zero value of each error-rate metric (one validation outline, in %),
    #: for Δm when a task trained alone scores 0.
    metric_floor: Mapping[str, float] = {"species": 100 / 110, "first_half": 100 / 110}
    #: Fixed before any method ran on this problem (held out): not tuned.
    budget = Budget(epochs=40, batch_size=32, lr=1e-3)
    #: What ``data()`` dropped: nothing.
    dropped: Mapping[str, int] = {"outlines": 0}

    def data(self, *, smoke: bool = False) -> tuple[Split, Split]:
        series, species = _load()
        generator = torch.Generator().manual_seed(_DATA_SEED)
        order = torch.randperm(_OUTLINES, generator=generator)
        noise = _NOISE * torch.randn(_OUTLINES, _LENGTH, generator=generator, dtype=torch.float64)
        train_ids, val_ids = order[:_TRAIN], order[_TRAIN:]
        series = (series - series[train_ids].mean()) / series[train_ids].std()
        rough = series.diff(dim=1).std(1)
        rough = (rough - rough[train_ids].mean()) / rough[train_ids].std()
        if smoke:
            train_ids, val_ids = train_ids[: _SMOKE[0]], val_ids[: _SMOKE[1]]
        return (
            self._split(series[train_ids], species[train_ids], rough[train_ids], noise[train_ids]),
            self._split(series[val_ids], species[val_ids], rough[val_ids], noise[val_ids]),
        )

    @staticmethod
    def _split(series: Tensor, species: Tensor, rough: Tensor, noise: Tensor) -> Split:
        """Inputs and targets of some outlines (float64 standardized values; float32 out)."""
        peak = series.argmax(1)
        targets = {
            "species": species,
            "denoise": series.float(),
            "peak": (peak.to(torch.float64) / _LENGTH).float().unsqueeze(1),  # (n, 1)
            "roughness": rough.float().unsqueeze(1),
            "first_half": (peak < _LENGTH // 2).float().unsqueeze(1),
            "tail": series[:, -_TAIL:].mean(1, keepdim=True).float(),
        }
        return Split((series + noise).float().unsqueeze(-1), targets)  # (n, 427, 1)

    def model(self) -> TaskModel:
        return _Model()

    def losses(self, outputs: Mapping[str, Tensor], batch: Split) -> dict[str, Tensor]:
        y = batch.targets
        return {
            "species": F.cross_entropy(outputs["species"], y["species"]),
            "denoise": F.mse_loss(outputs["denoise"], y["denoise"]),
            "peak": F.huber_loss(outputs["peak"], y["peak"]),
            "roughness": F.mse_loss(outputs["roughness"], y["roughness"]),
            "first_half": F.binary_cross_entropy_with_logits(
                outputs["first_half"], y["first_half"]
            ),
            "tail": F.l1_loss(outputs["tail"], y["tail"]),
        }

    def evaluate(self, model: TaskModel, split: Split) -> dict[str, float]:
        out = predict(model, split.x)
        y = split.targets

        def error(wrong: Tensor) -> float:
            return 100.0 * wrong.float().mean().item()

        def mae(task: str) -> float:
            return (out[task] - y[task]).abs().mean().item()

        return {
            "species": error(out["species"].argmax(1) != y["species"]),
            "denoise": (out["denoise"] - y["denoise"]).pow(2).mean().sqrt().item(),
            "peak": _LENGTH * mae("peak"),
            "roughness": mae("roughness"),
            "first_half": error((out["first_half"] > 0).float() != y["first_half"]),
            "tail": mae("tail"),
        }

    def constant_outputs(self, train: Split) -> dict[str, Tensor]:
        """Per task, the one output row (no batch axis) that a model ignoring its input predicts.

        The training targets' mean for a regression output (the mean outline for ``denoise``),
        log class frequencies as logits for ``species``, the logit of the positive rate for
        ``first_half``.
        """
        y = train.targets
        rows = {task: constant_row(y[task], "regression") for task in _REGRESSION}
        rows["species"] = constant_row(y["species"], "class", _SPECIES)
        rows["first_half"] = constant_row(y["first_half"], "binary")
        return {task: rows[task] for task in self.tasks}


PROBLEM = Leaves()
