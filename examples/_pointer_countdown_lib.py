"""Shared code of the pointer/countdown demo and the benchmarks: data, model, methods, training.

The problem is a two-head sequence model on synthetic data (see
``examples/pointer_countdown.py``): one shared bidirectional GRU encoder over 105 time steps,
a *pointer* head that predicts the start and end of an event (2 outputs per sample, small
residuals, Huber in its quadratic regime) and a *countdown* head that predicts, at every time
step, the number of bars until the event starts (105 outputs per sample, clipped to [-20, 20],
large residuals, Huber in its linear regime).

Every method is a key: ``sum``, ``alone:<task>`` (that task alone), a method of
:mod:`balanced_losses.catalog` (``gradient-balancer``, ``famo``, ...) or one of the demo's own
configurations (:data:`CONFIGURATIONS`); :func:`make_strategy` builds its :class:`Strategy`, and
:func:`train` trains the demo model under it. A method added to the package reaches the demo
through the catalog.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import balanced_losses as bl

__all__ = [
    "BASELINES",
    "CONFIGURATIONS",
    "FIXED_WEIGHTS",
    "OUTPUT_SIZES",
    "TASKS",
    "Batch",
    "PointerCountdownNet",
    "RunResult",
    "Strategy",
    "describe",
    "machine_info",
    "make_data",
    "make_strategy",
    "method_keys",
    "methods",
    "resolve_methods",
    "train",
]

T = 105
CHANNELS = 4
CLIP = 20.0
TASKS: tuple[str, ...] = ("pointer", "countdown")
OUTPUT_SIZES: dict[str, int] = {"pointer": 2, "countdown": T}
#: Fixed per-task weights of the value-only normalizer the demo starts from.
FIXED_WEIGHTS: dict[str, float] = {"pointer": 0.7, "countdown": 0.1}


# ---------------------------------------------------------------------------------------- data


@dataclass
class Batch:
    """Inputs and targets of a set of samples.

    ``x``: (B, T, 4) features; ``pointer``: (B, 2) start/T and end/T; ``countdown``: (B, T)
    bars until the event starts (start - t, unclipped: the loss clips to [-20, 20]);
    ``start``/``end``: (B,) integer bar indices.
    """

    x: Tensor
    pointer: Tensor
    countdown: Tensor
    start: Tensor
    end: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def index(self, idx: Tensor | slice) -> Batch:
        return Batch(
            self.x[idx], self.pointer[idx], self.countdown[idx], self.start[idx], self.end[idx]
        )


def make_data(
    n: int, *, seed: int, start: tuple[int, int] = (10, 70), length: tuple[int, int] = (10, 30)
) -> Batch:
    """Draw ``n`` synthetic series with one "expansion" event each.

    A price-like random walk has unit volatility and no drift outside the event. Between
    ``start`` (uniform in [10, 70]) and ``end = start + length`` (length uniform in [10, 30];
    both ranges are arguments, inclusive: the benchmark's calibrated problem moves them)
    its volatility doubles and it drifts by 0.5 per bar in a random direction, and a
    volume-like channel rises. The four channels are the return, its absolute value, the
    noisy volume and the standardized cumulative price. The boundaries are detectable from
    the channels, but only to within a few bars, since single bars are noisy.
    """
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(start[0], start[1] + 1, (n,), generator=g)
    end = first + torch.randint(length[0], length[1] + 1, (n,), generator=g)
    t = torch.arange(T)
    inside = (t >= first[:, None]) & (t < end[:, None])
    direction = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)[:, None]
    sigma = torch.where(inside, 2.0, 1.0)
    drift = torch.where(inside, 0.5 * direction, torch.zeros(()))
    ret = drift + sigma * torch.randn(n, T, generator=g)
    volume = torch.exp(0.4 * torch.randn(n, T, generator=g)) * torch.where(inside, 1.8, 1.0)
    price = ret.cumsum(dim=1)
    price = (price - price.mean(dim=1, keepdim=True)) / price.std(dim=1, keepdim=True)
    x = torch.stack([ret / 1.5, ret.abs() - 1.0, volume - 1.3, price], dim=-1)
    pointer = torch.stack([first, end], dim=1).float() / T
    countdown = (first[:, None] - t[None, :]).float()
    return Batch(x.float(), pointer, countdown, first, end)


# --------------------------------------------------------------------------------------- model


class PointerCountdownNet(nn.Module):
    """Shared bidirectional GRU encoder, mean-pooled pointer head, per-timestep countdown head."""

    def __init__(self, *, hidden: int = 32, layers: int = 1) -> None:
        super().__init__()
        self.encoder = nn.GRU(
            CHANNELS, hidden, num_layers=layers, batch_first=True, bidirectional=True
        )
        self.pointer_head = nn.Linear(2 * hidden, 2)
        self.countdown_head = nn.Linear(2 * hidden, 1)

    def encode(self, x: Tensor) -> Tensor:
        """Shared features, (B, T, 2 * hidden)."""
        return self.encoder(x)[0]

    def heads(self, views: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Each head reads its own view of the shared features (the same tensor by default)."""
        return {
            "pointer": self.pointer_head(views["pointer"].mean(dim=1)),
            "countdown": self.countdown_head(views["countdown"]).squeeze(-1),
        }

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.encode(x)
        return self.heads(dict.fromkeys(TASKS, feats))

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    def last_shared_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoder's last layer (both directions): GradNorm's choice of W."""
        last = self.encoder.num_layers - 1
        return [p for n, p in self.encoder.named_parameters() if n.split("_l")[-1][0] == str(last)]


POINTER_LOSS = bl.HuberLoss(delta=1.0)
COUNTDOWN_LOSS = bl.HuberLoss(delta=1.0, target_clip=(-CLIP, CLIP))


def task_losses(preds: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
    return {
        "pointer": POINTER_LOSS(preds["pointer"], batch.pointer),
        "countdown": COUNTDOWN_LOSS(preds["countdown"], batch.countdown),
    }


@torch.no_grad()
def evaluate(model: PointerCountdownNet, data: Batch, *, chunk: int = 512) -> dict[str, float]:
    """Validation MAE in bars: pointer averaged over start and end, countdown over all steps."""
    was_training = model.training
    model.eval()
    pointer_err = countdown_err = 0.0
    for i in range(0, len(data), chunk):
        part = data.index(slice(i, i + chunk))
        preds = model(part.x)
        bars = torch.stack([part.start, part.end], dim=1).float()
        pointer_err += (preds["pointer"] * T - bars).abs().sum().item()
        countdown_err += (preds["countdown"] - part.countdown.clamp(-CLIP, CLIP)).abs().sum().item()
    model.train(was_training)
    return {"pointer": pointer_err / (2 * len(data)), "countdown": countdown_err / (T * len(data))}


# ------------------------------------------------------------------------------------ methods


#: The baselines beside the package's methods: a plain sum and each task trained alone.
BASELINES: tuple[str, ...] = ("sum", *(f"alone:{t}" for t in TASKS))

#: The demo's own configurations beside the catalog's: the normalizer a training script starts
#: from (each loss divided by its running mean, fixed weights 0.7/0.1, momentum 0.95) and the
#: same with the square-root correction of the reduction.
CONFIGURATIONS: tuple[bl.catalog.Method, ...] = (
    bl.catalog.Method(
        "demo-normalizer-none",
        bl.LossNormalizer,
        {"correction": "none", "weights": FIXED_WEIGHTS, "momentum": 0.95},
    ),
    bl.catalog.Method(
        "demo-normalizer-sqrt",
        bl.LossNormalizer,
        {"correction": "sqrt", "weights": FIXED_WEIGHTS, "momentum": 0.95},
    ),
)


def methods() -> dict[str, bl.catalog.Method]:
    """The methods the demo builds, by key: its own configurations, then the package's catalog."""
    return {m.key: m for m in (*CONFIGURATIONS, *bl.catalog.methods())}


def method_keys(*, baselines: bool = False) -> list[str]:
    """Every key the demo trains, in table order: the plain sum, then :func:`methods`.

    With ``baselines``, each task alone comes first.
    """
    alone = [b for b in BASELINES if b != "sum"] if baselines else []
    return [*alone, "sum", *methods()]


def describe(key: str) -> str:
    """What a method key trains, in words (a baseline) or as the constructor call."""
    if key == "sum":
        return "plain sum(losses)"
    if key.startswith("alone:"):
        return f"{key.split(':', 1)[1]} loss alone"
    return methods()[key].label.strip("`")


def resolve_methods(names: Iterable[str] | None, *, baselines: bool = False) -> list[str]:
    """The requested method keys, checked; ``None`` is every key of :func:`method_keys`.

    Raises:
        SystemExit: For a key that is neither a baseline nor a method; the message lists them.
    """
    known = method_keys(baselines=True)
    chosen = method_keys(baselines=baselines) if names is None else list(names)
    unknown = [name for name in chosen if name not in known]
    if unknown:
        raise SystemExit(f"unknown method {unknown}; expected one of {known}")
    return chosen


class Strategy:
    """How one training method turns per-task losses into the step's total.

    Args:
        tasks: Task names.
        weighting: A :mod:`balanced_losses` weighting called as ``weighting(losses)``; ``None``
            is a plain ``sum(losses)``.
        only: Train on this task alone (single-task baseline); the other heads are untrained.

    A feature-level weighting (one with ``branch``: ``GradientBalancer``, ``CalibratedBalancer``,
    ``DBMTL``, the aggregators) branches the shared features, ``views =
    weighting.branch(feats)``, and every head reads its own view. Learned weights (the
    weighting's parameters that require gradients: ``UncertaintyWeighting``'s log-variances,
    ``IMTLL``'s scales) train with the model's optimizer. After each optimizer step the
    weighting's ``after_step`` gets the losses recomputed on the same batch (computed only if it
    asks, as ``FAMO`` does), and at each epoch's end its ``epoch_end`` runs (``DWA``'s).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        weighting: bl.Weighting | None = None,
        *,
        only: str | None = None,
    ) -> None:
        self.tasks = tuple(tasks)
        self.weighting = weighting
        self.only = only
        self.branches = weighting is not None and callable(getattr(weighting, "branch", None))

    def extra_parameters(self) -> list[nn.Parameter]:
        """The weighting's learned parameters, for the model's optimizer."""
        if self.weighting is None:
            return []
        return [p for p in self.weighting.parameters() if p.requires_grad]

    def branch(self, feats: Tensor) -> dict[str, Tensor]:
        if self.branches:
            assert self.weighting is not None
            return dict(self.weighting.branch(feats))  # type: ignore[operator]
        return dict.fromkeys(self.tasks, feats)

    def combine(self, losses: Mapping[str, Tensor]) -> Tensor:
        if self.only is not None:
            return losses[self.only]
        if self.weighting is None:
            return torch.stack([losses[t] for t in self.tasks]).sum()
        return self.weighting(dict(losses))

    def end_epoch(self) -> None:
        """The weighting's ``epoch_end``: a no-op for every method but those that need it."""
        if self.weighting is not None:
            self.weighting.epoch_end()

    def step(
        self, model: PointerCountdownNet, optimizer: torch.optim.Optimizer, batch: Batch
    ) -> dict[str, Tensor]:
        """One training step: forward, combine, backward, optimizer step, ``after_step``."""
        feats = model.encode(batch.x)
        losses = task_losses(model.heads(self.branch(feats)), batch)
        total = self.combine(losses)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if self.weighting is not None:
            # The losses after the step, computed only for a method that asks (FAMO).
            self.weighting.after_step(lambda: task_losses(model(batch.x), batch))
        # Logging only: the returned values must not keep the step's graph alive.
        return {k: v.detach() for k, v in losses.items()}

    def effective_weights(
        self,
        model: PointerCountdownNet,
        batch: Batch,
        losses: Mapping[str, Tensor] | None = None,
    ) -> dict[str, float]:
        """d total / d L_k on ``batch`` under the current state, without changing that state.

        The weighting is deep-copied (sharing the model's parameters) and run once in training
        mode; branching methods also run the backward pass so that their hooks act. The weights
        are read from the copy's ``last_weights``. ``losses`` (computed on ``batch`` without
        branching) saves a forward pass for methods that do not branch.
        """
        if self.only is not None:
            return {t: float(t == self.only) for t in self.tasks}
        if self.weighting is None:
            return dict.fromkeys(self.tasks, 1.0)
        memo = {id(p): p for p in model.parameters()}
        probe = copy.deepcopy(self.weighting, memo)
        probe.train()
        if self.branches or losses is None:
            feats = model.encode(batch.x)
            views = (
                dict(probe.branch(feats))  # type: ignore[operator]
                if self.branches
                else dict.fromkeys(self.tasks, feats)
            )
            losses = task_losses(model.heads(views), batch)
        total = probe(dict(losses))
        if self.branches:
            torch.autograd.grad(total, model.shared_parameters(), allow_unused=True)
        weights = last_weights_of(probe)
        inner = getattr(probe, "balancer", None)  # DBMTL: its gradient half scales on top
        if self.branches and isinstance(inner, bl.Weighting):
            scales = last_weights_of(inner)
            weights = {t: w * scales[t] for t, w in weights.items()}
        return weights


def last_weights_of(weighting: bl.Weighting) -> dict[str, float]:
    """Last step's weight per task (reported numbers only: any graph they carry is cut)."""
    return dict(zip(weighting.tasks, weighting.last_weights.detach().tolist(), strict=True))


def make_strategy(key: str, model: PointerCountdownNet, seed: int) -> Strategy:
    """The strategy of a method key, built for ``model``.

    The catalog's methods (and the demo's configurations) are built by
    :meth:`balanced_losses.catalog.Method.build` with the demo's output sizes, the encoder's
    last layer as ``GradNorm``'s shared parameters W (``CalibratedWeighting`` finds its own,
    the whole encoder) and the run's seed (the methods with a random stream: ``RLW``,
    ``PCGrad``).
    """
    if key == "sum":
        return Strategy(TASKS)
    if key.startswith("alone:"):
        return Strategy(TASKS, only=key.split(":", 1)[1])
    method = methods()[key]
    # GradNorm needs its W; CalibratedWeighting finds the shared parameters itself, as in a
    # user's script (the whole encoder: every task's loss reaches it).
    needs_w = method.cls is bl.GradNorm
    weighting = method.build(
        list(TASKS),
        output_sizes=OUTPUT_SIZES,
        shared_parameters=model.last_shared_parameters() if needs_w else None,
        seed=seed,
    )
    return Strategy(TASKS, weighting)


# ------------------------------------------------------------------------------------ training


def weighted_gradient_ratio(
    model: PointerCountdownNet, strategy: Strategy, batch: Batch
) -> dict[str, float]:
    """Countdown/pointer ratio of the weighted tasks' gradient norms on the shared encoder.

    Task k's weighted gradient is w_k * d L_k / d theta_enc with w_k = d total / d L_k under
    the method's current state: what that task's term of the total sends into the encoder.
    """
    params = model.shared_parameters()
    losses = task_losses(model(batch.x), batch)
    norms = {}
    for task in TASKS:
        grads = torch.autograd.grad(losses[task], params, retain_graph=True)
        norms[task] = math.sqrt(sum(float(g.pow(2).sum()) for g in grads))
    weights = strategy.effective_weights(model, batch, losses)
    weighted = {t: abs(weights[t]) * norms[t] for t in TASKS}
    ratio = weighted["countdown"] / weighted["pointer"] if weighted["pointer"] > 0 else math.inf
    return {"ratio": ratio, **{f"w_{t}": weights[t] for t in TASKS}, **norms}


@dataclass
class RunResult:
    method: str
    seed: int
    val_mae: dict[str, float]
    ratio_init: float
    ratio_end: float
    seconds: float
    history: dict[str, list[float]] = field(default_factory=dict)


def train(
    method: str,
    *,
    seed: int = 0,
    epochs: int = 20,
    n_train: int = 2048,
    n_val: int = 512,
    batch_size: int = 32,
    lr: float = 1e-3,
    max_steps: int | None = None,
    hidden: int = 32,
    probe_size: int = 128,
    data: tuple[Batch, Batch] | None = None,
    verbose: bool = False,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> RunResult:
    """Train the demo model under one method key and return its validation figures.

    The model's initialization and the order of the batches depend on ``seed`` only, so every
    method of a seed starts from the same weights and sees the same batches. ``max_steps``
    stops each epoch early (smoke runs). ``on_epoch(epoch, figures)``, if given, is called
    after each epoch with the validation MAE of each task (keys ``val_<task>``) and the
    gradient ratio (``ratio``): the demo prints its progress line from it.
    """
    started = time.perf_counter()
    train_data, val_data = (
        data
        if data is not None
        else (
            make_data(n_train, seed=10_000 + seed),
            make_data(n_val, seed=20_000 + seed),
        )
    )
    torch.manual_seed(seed)
    model = PointerCountdownNet(hidden=hidden)
    strategy = make_strategy(method, model, seed)
    optimizer = torch.optim.Adam([*model.parameters(), *strategy.extra_parameters()], lr=lr)
    probe = train_data.index(slice(0, probe_size))
    init = weighted_gradient_ratio(model, strategy, probe)
    history: dict[str, list[float]] = {
        "epoch": [0.0],
        "ratio": [init["ratio"]],
        **{f"val_{t}": [v] for t, v in evaluate(model, val_data).items()},
        **{f"train_{t}": [math.nan] for t in TASKS},
    }
    shuffle = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(train_data), generator=shuffle)
        sums = dict.fromkeys(TASKS, 0.0)
        steps = 0
        for i in range(0, len(train_data), batch_size):
            if max_steps is not None and steps >= max_steps:
                break
            losses = strategy.step(model, optimizer, train_data.index(order[i : i + batch_size]))
            for t in TASKS:
                sums[t] += float(losses[t])
            steps += 1
        strategy.end_epoch()
        val = evaluate(model, val_data)
        history["epoch"].append(float(epoch))
        history["ratio"].append(weighted_gradient_ratio(model, strategy, probe)["ratio"])
        for t in TASKS:
            history[f"val_{t}"].append(val[t])
            history[f"train_{t}"].append(sums[t] / max(steps, 1))
        if on_epoch is not None:
            on_epoch(epoch, {key: values[-1] for key, values in history.items() if key != "epoch"})
        if verbose:
            print(
                f"  {method:>18} epoch {epoch:2d}: val MAE pointer {val['pointer']:6.2f}, "
                f"countdown {val['countdown']:6.2f}, ratio {history['ratio'][-1]:.3g}",
                flush=True,
            )
    return RunResult(
        method=method,
        seed=seed,
        val_mae={t: history[f"val_{t}"][-1] for t in TASKS},
        ratio_init=init["ratio"],
        ratio_end=history["ratio"][-1],
        seconds=time.perf_counter() - started,
        history=history,
    )


def result_to_dict(result: RunResult) -> dict[str, Any]:
    return {
        "method": result.method,
        "seed": result.seed,
        "val_mae": result.val_mae,
        "ratio_init": result.ratio_init,
        "ratio_end": result.ratio_end,
        "seconds": result.seconds,
        "history": result.history,
    }


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what :mod:`platform` knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """Where a result was measured: CPU model and cores, torch threads, load, versions.

    The load average says how busy the machine was (other processes share the cores), which
    matters for wall times and, less, for the interleaved speed ratios.
    """
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
    }
