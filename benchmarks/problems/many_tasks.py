"""Many tasks: a synthetic, QM9-like multi-target regression with K tasks (10 to 40).

Inputs are 32 standard-normal features. A fixed random teacher (32 -> 64 tanh -> 16, seeded by
a constant, never by the run's seed) maps them to a shared 16-dimensional latent ``z``; every
task is a different fixed function of ``z`` (a random projection, then one of a few
nonlinearities) plus noise. As with QM9's targets, the tasks differ in kind and, above all, in
scale: regression targets are in "units" from 0.01 to 100 and their MSE is taken on the raw
scale, so under a plain sum the losses differ by about eight orders of magnitude at
initialization. Some targets are vectors (3 or 8 outputs, so the reductions differ), one in ten
is a binary classification (BCE), one in ten a 4-class classification (cross-entropy) and one
in ten a Huber regression with heavy-tailed (Student-t) noise.

:data:`KINDS` lists the 40 tasks; ``make(k)`` keeps the first ``k``, so the tasks of a smaller
problem are exactly those of a larger one (same targets, same validation metric), and the suite
can show how quality and step time grow with K.

The model is a shared MLP trunk (32 -> 128 -> 128, ReLU) and one small head per task
(128 -> 32 -> outputs). A regression head ends in a fixed multiplication by its target's unit,
as a head predicting in physical units would: every head then trains at Adam's step size, while
the loss (and the gradient it sends into the trunk) stays on the raw scale.

The validation metric of every task is comparable across tasks (lower is better): for a
regression, the MAE divided by the MAE of the best constant predictor (the validation median),
averaged over the target's outputs (1.0: no better than a constant); for a classification, the
error rate (a fraction).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import Budget, Split, TaskModel, constant_row, predict

__all__ = ["KINDS", "MAX_TASKS", "MIN_TASKS", "PROBLEM", "ManyTasks", "TaskSpec", "make"]

#: Constant seeds of the teacher, the task functions and the data: never the run's seed.
TEACHER_SEED = 1234
DATA_SEED = 5678
N_TRAIN = 4000
N_VAL = 1000
N_SMOKE_TRAIN = 32
N_SMOKE_VAL = 16
IN_FEATURES = 32
TEACHER_HIDDEN = 64
LATENT = 16
TRUNK_WIDTH = 128
HEAD_WIDTH = 32
N_CLASSES = 4
#: Relative noise of the regression targets (std, as a fraction of the target's unit).
NOISE = 0.1
MIN_TASKS = 10
MAX_TASKS = 40
DEFAULT_TASKS = 20


@dataclass(frozen=True)
class TaskSpec:
    """One task: its loss kind, outputs per sample, unit (regression) and nonlinearity.

    ``kind`` is ``"mse"``, ``"huber"`` (regression), ``"bce"`` (binary, one logit) or ``"ce"``
    (``N_CLASSES`` classes, one logit each). ``size`` is the number of outputs per sample of a
    regression (its loss is a mean over them); a classification has one element per sample.
    ``scale`` is the regression target's unit (its standard deviation, before noise).
    """

    name: str
    kind: str
    size: int
    scale: float
    fn: str

    @property
    def regression(self) -> bool:
        return self.kind in ("mse", "huber")

    @property
    def head_outputs(self) -> int:
        """Columns of the head's prediction."""
        return {"bce": 1, "ce": N_CLASSES}.get(self.kind, self.size)


# Every block of ten tasks has the same kinds and sizes; the units of the regressions cycle
# through _SCALES and the nonlinearities through _FNS, so successive blocks differ.
_PATTERN = (
    ("mse", 1),
    ("mse", 1),
    ("mse", 3),
    ("bce", 1),
    ("mse", 8),
    ("huber", 1),
    ("mse", 1),
    ("ce", 1),
    ("mse", 3),
    ("mse", 8),
)
_SCALES = (100.0, 0.01, 1.0, 10.0, 0.1)
_FNS = ("linear", "tanh", "square", "sin", "product")


def _kinds() -> tuple[TaskSpec, ...]:
    specs = []
    n_regression = 0
    for i in range(MAX_TASKS):
        kind, size = _PATTERN[i % len(_PATTERN)]
        scale = 1.0
        if kind in ("mse", "huber"):
            scale = _SCALES[n_regression % len(_SCALES)]
            n_regression += 1
        fn = _FNS[(3 * i + i // len(_PATTERN)) % len(_FNS)]
        specs.append(TaskSpec(f"t{i:02d}", kind, size, scale, fn))
    return tuple(specs)


#: The 40 tasks, in order; ``make(k)`` keeps the first ``k``.
KINDS: tuple[TaskSpec, ...] = _kinds()


def _standardize(v: Tensor) -> Tensor:
    return (v - v.mean(0)) / v.std(0).clamp_min(1e-8)


def _apply(fn: str, u: Tensor) -> Tensor:
    """Nonlinearity ``fn`` of the projections ``u`` (samples x columns), standardized."""
    if fn == "linear":
        out = u
    elif fn == "tanh":
        out = torch.tanh(1.5 * u)
    elif fn == "square":
        out = u.square()
    elif fn == "sin":
        out = torch.sin(1.5 * u)
    elif fn == "product":
        out = u * u.roll(1, dims=1) + u
    else:  # pragma: no cover - the table only holds the names above
        raise ValueError(fn)
    return _standardize(out)


@functools.lru_cache(maxsize=1)
def _generate() -> tuple[Split, Split, dict[str, Tensor]]:
    """Every task's targets on the full split, and each regression output's metric normalizer.

    Everything is drawn from generators seeded by constants, so the data never depend on the
    run's seed (nor on how many tasks a problem keeps). Cached: callers must not modify it.
    """
    teacher = torch.Generator().manual_seed(TEACHER_SEED)
    w1 = torch.randn(IN_FEATURES, TEACHER_HIDDEN, generator=teacher) / math.sqrt(IN_FEATURES)
    b1 = 0.5 * torch.randn(TEACHER_HIDDEN, generator=teacher)
    w2 = torch.randn(TEACHER_HIDDEN, LATENT, generator=teacher) / math.sqrt(TEACHER_HIDDEN)
    projections = [
        torch.randn(LATENT, max(spec.head_outputs, 2), generator=teacher) / math.sqrt(LATENT)
        for spec in KINDS
    ]

    gen = torch.Generator().manual_seed(DATA_SEED)
    n = N_TRAIN + N_VAL
    x = torch.randn(n, IN_FEATURES, generator=gen)
    z = _standardize(torch.tanh(x @ w1 + b1) @ w2)

    targets: dict[str, Tensor] = {}
    for spec, proj in zip(KINDS, projections, strict=True):
        signal = _apply(spec.fn, z @ proj)
        if spec.kind == "mse":
            noise = NOISE * torch.randn(n, spec.size, generator=gen)
            targets[spec.name] = spec.scale * (signal[:, : spec.size] + noise)
        elif spec.kind == "huber":
            # Student-t noise with 2 degrees of freedom: finite mean, infinite variance.
            normal = torch.randn(n, spec.size, generator=gen)
            chi2 = torch.randn(n, spec.size, 2, generator=gen).square().sum(-1)
            noise = 2.0 * NOISE * normal / (chi2 / 2.0).sqrt()
            targets[spec.name] = spec.scale * (signal[:, : spec.size] + noise)
        elif spec.kind == "bce":
            logit = 3.0 * signal[:, :1] + torch.randn(n, 1, generator=gen)
            targets[spec.name] = (logit > 0).float()
        else:  # ce: the most likely of N_CLASSES classes under Gumbel noise
            gumbel = -torch.log(-torch.log(torch.rand(n, N_CLASSES, generator=gen)))
            targets[spec.name] = (3.0 * signal + 0.5 * gumbel).argmax(1)

    train = Split(x[:N_TRAIN], {k: y[:N_TRAIN] for k, y in targets.items()})
    val = Split(x[N_TRAIN:], {k: y[N_TRAIN:] for k, y in targets.items()})
    normalizers = {
        spec.name: (y - y.median(0).values).abs().mean(0)
        for spec in KINDS
        if spec.regression
        for y in [val.targets[spec.name]]
    }
    return train, val, normalizers


class _Head(nn.Module):
    def __init__(self, spec: TaskSpec) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(TRUNK_WIDTH, HEAD_WIDTH), nn.ReLU(), nn.Linear(HEAD_WIDTH, spec.head_outputs)
        )
        self.unit = spec.scale if spec.regression else 1.0

    def forward(self, h: Tensor) -> Tensor:
        out = self.net(h)
        return out * self.unit if self.unit != 1.0 else out


class ManyTasksModel(TaskModel):
    """Shared trunk 32 -> 128 -> 128 (ReLU) and one head 128 -> 32 -> outputs per task."""

    def __init__(self, specs: tuple[TaskSpec, ...]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(IN_FEATURES, TRUNK_WIDTH),
            nn.ReLU(),
            nn.Linear(TRUNK_WIDTH, TRUNK_WIDTH),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict({spec.name: _Head(spec) for spec in specs})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {task: head(h) for task, head in self.heads.items()}


class ManyTasks:
    """The many-tasks problem with the first ``k`` tasks of :data:`KINDS`."""

    def __init__(self, k: int) -> None:
        if not MIN_TASKS <= k <= MAX_TASKS:
            raise ValueError(f"k must be in [{MIN_TASKS}, {MAX_TASKS}], got {k}")
        self.k = k
        self.specs = KINDS[:k]
        self.name = "many_tasks" if k == DEFAULT_TASKS else f"many_tasks_k{k}"
        self.title = (
            f"Many tasks: {k} QM9-like synthetic targets (MSE at units 0.01-100, vectors, "
            "BCE, 4-class CE, Huber) on one MLP trunk"
        )
        self.tasks = tuple(spec.name for spec in self.specs)
        self.output_sizes = {spec.name: spec.size for spec in self.specs}
        self.metrics = {
            spec.name: "normalized MAE" if spec.regression else "error rate" for spec in self.specs
        }
        self.budget = Budget(epochs=12, batch_size=128, lr=2e-3)

    def _keep(self, split: Split) -> Split:
        return Split(split.x, {task: split.targets[task] for task in self.tasks})

    def data(self, *, smoke: bool = False) -> tuple[Split, Split]:
        """The fixed (train, validation) split; ``smoke``: the first few dozen samples."""
        train, val, _ = _generate()
        train, val = self._keep(train), self._keep(val)
        if smoke:
            train = train.take(torch.arange(N_SMOKE_TRAIN))
            val = val.take(torch.arange(N_SMOKE_VAL))
        return train, val

    def model(self) -> ManyTasksModel:
        """A fresh model, initialized from torch's global RNG."""
        return ManyTasksModel(self.specs)

    def losses(self, outputs: Mapping[str, Tensor], batch: Split) -> dict[str, Tensor]:
        """Raw-scale MSE / Huber (delta: one unit), BCE with logits, cross-entropy."""
        out = {}
        for spec in self.specs:
            pred, y = outputs[spec.name], batch.targets[spec.name]
            if spec.kind == "mse":
                out[spec.name] = F.mse_loss(pred, y)
            elif spec.kind == "huber":
                out[spec.name] = F.huber_loss(pred, y, delta=spec.scale)
            elif spec.kind == "bce":
                out[spec.name] = F.binary_cross_entropy_with_logits(pred, y)
            else:
                out[spec.name] = F.cross_entropy(pred, y)
        return out

    def evaluate(self, model: TaskModel, split: Split) -> dict[str, float]:
        """Normalized MAE (regression) or error rate (classification) of each task."""
        outputs = predict(model, split.x)
        _, _, normalizers = _generate()
        metrics = {}
        for spec in self.specs:
            pred, y = outputs[spec.name], split.targets[spec.name]
            if spec.regression:
                mae = (pred - y).abs().mean(0)
                metrics[spec.name] = float((mae / normalizers[spec.name]).mean())
            elif spec.kind == "bce":
                metrics[spec.name] = float(((pred > 0).float() != y).float().mean())
            else:
                metrics[spec.name] = float((pred.argmax(1) != y).float().mean())
        return metrics

    def constant_outputs(self, train: Split) -> dict[str, Tensor]:
        """Per task: the mean target (regression), the class or positive rate's logits."""
        kinds = {"bce": "binary", "ce": "class"}
        return {
            spec.name: constant_row(
                train.targets[spec.name], kinds.get(spec.kind, "regression"), N_CLASSES
            )
            for spec in self.specs
        }


def make(k: int) -> ManyTasks:
    """The many-tasks problem with ``k`` tasks (10 to 40)."""
    return ManyTasks(k)


PROBLEM = make(DEFAULT_TASKS)
