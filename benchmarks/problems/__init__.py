"""The benchmark problems: each a module with one :class:`Problem`, run by ``benchmarks/suite.py``.

A problem fixes everything but the method: the data (a train/validation split that does not
depend on the seed), the model (a shared ``trunk`` module and one head per task, initialized
from torch's global RNG, which the suite seeds), the per-task losses, the validation metric of
each task (lower is better) and one training budget, chosen before any method was run.

Within a seed, the suite gives every method the same initial weights and the same batches, so
methods differ only in how they combine the tasks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor, nn

__all__ = [
    "Budget",
    "ConstantModel",
    "Problem",
    "Split",
    "TaskModel",
    "aeon_data",
    "constant_row",
    "predict",
]


@dataclass(frozen=True)
class Split:
    """Inputs and one target tensor per task, indexed by sample along the first axis."""

    x: Tensor
    targets: Mapping[str, Tensor]

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def take(self, index: Tensor) -> Split:
        return Split(self.x[index], {task: y[index] for task, y in self.targets.items()})


@dataclass(frozen=True)
class Budget:
    """The fixed training budget: Adam with this learning rate, this batch size, these epochs."""

    epochs: int
    batch_size: int
    lr: float


class TaskModel(nn.Module):
    """A shared ``trunk`` and one head per task; ``forward(x)`` returns task -> prediction.

    Every method reaches the shared features as ``model.trunk``'s output (feature-level methods
    attach there; TorchJD's peers aggregate on ``model.trunk``'s parameters).
    """

    trunk: nn.Module

    def forward(self, x: Tensor) -> dict[str, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


def aeon_data(problem: str, what: str, folder: str) -> Path:
    """The folder of one data set that aeon ships in its wheel, for ``problem`` to read.

    ``what`` names the files in the error raised when aeon is not installed. Nothing is
    downloaded: aeon's wheel holds the files.
    """
    try:
        import aeon  # type: ignore[import-untyped, unused-ignore]
    except ImportError as error:
        raise ModuleNotFoundError(
            f"{problem} reads the {what} aeon ships in its wheel (aeon/datasets/data/{folder}/): "
            "install aeon"
        ) from error
    return Path(aeon.__file__).resolve().parent / "datasets" / "data" / folder


def predict(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """``model(x)`` in eval mode without autograd, for validation; the model's mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            outputs: dict[str, Tensor] = model(x)
    finally:
        model.train(was_training)
    return outputs


def constant_row(targets: Tensor, kind: str, classes: int = 0) -> Tensor:
    """The one output row that a model ignoring its input predicts for ``targets`` (samples first).

    ``kind``: ``"regression"`` gives the targets' mean per output; ``"class"`` the log of the
    ``classes`` class frequencies as logits (so the majority class is predicted);
    ``"binary"`` the logit of the positive rate.
    """
    if kind == "regression":
        return targets.float().mean(0)
    if kind == "class":
        counts = torch.bincount(targets.flatten(), minlength=classes).float()
        return (counts / counts.sum()).clamp_min(1e-12).log()
    if kind == "binary":
        rate = targets.float().mean(0).clamp(1e-6, 1.0 - 1e-6)
        return torch.log(rate) - torch.log1p(-rate)
    raise ValueError(f"`kind` must be 'regression', 'class' or 'binary', got {kind!r}")


class ConstantModel(TaskModel):
    """Predicts the same output row for every sample: a task's constant-prediction baseline.

    A run in which a task ends worse than this is counted as diverged.
    """

    def __init__(self, rows: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.rows = dict(rows)
        self.trunk = nn.Identity()

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        n = x.shape[0]
        return {task: row.expand(n, *row.shape) for task, row in self.rows.items()}


class Problem(Protocol):
    """One benchmark problem (see the module docstring)."""

    #: Short name, used in file names (``benchmarks/results/<name>.json``) and on the CLI.
    name: str
    #: One line for tables: what the problem is.
    title: str
    tasks: tuple[str, ...]
    #: Elements per sample each task's loss is a mean over (for methods that correct for it).
    output_sizes: Mapping[str, int]
    #: Task -> what its validation metric is (lower is better), e.g. "error rate (%)".
    metrics: Mapping[str, str]
    budget: Budget

    def data(self, *, smoke: bool = False) -> tuple[Split, Split]:
        """The fixed (train, validation) split; ``smoke``: a few dozen samples."""
        ...

    def model(self) -> TaskModel:
        """A fresh model, initialized from torch's global RNG."""
        ...

    def losses(self, outputs: Mapping[str, Tensor], batch: Split) -> dict[str, Tensor]:
        """Each task's scalar training loss on ``batch``."""
        ...

    def evaluate(self, model: TaskModel, split: Split) -> dict[str, float]:
        """Each task's validation metric on ``split`` (lower is better), under no_grad."""
        ...

    def constant_outputs(self, train: Split) -> dict[str, Tensor]:
        """Per task, the output row a model ignoring its input predicts (see ``constant_row``)."""
        ...
