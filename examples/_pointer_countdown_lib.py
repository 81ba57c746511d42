"""Shared code of the pointer/countdown demo and the benchmarks: data, model, methods, training.

The problem is a two-head sequence model on synthetic data (see
``examples/pointer_countdown.py``): one shared bidirectional GRU encoder over 105 time steps,
a *pointer* head that predicts the start and end of an event (2 outputs per sample, small
residuals, Huber in its quadratic regime) and a *countdown* head that predicts, at every time
step, the number of bars until the event starts (105 outputs per sample, clipped to [-20, 20],
large residuals, Huber in its linear regime).

Everything a training method needs is behind :class:`Strategy`, built by a factory in
:data:`REGISTRY`. A method is added with one decorated factory::

    @register("dwa", requires=("DWA",), description="Dynamic Weight Average, T=2")
    def _dwa(ctx: MethodContext) -> Strategy:
        return Strategy(ctx.tasks, bl.DWA(ctx.tasks, temperature=2.0), epoch_hook="step")

A weighting that acts at the shared features (``GradientBalancer``, the aggregators) is one
line: ``register_feature_level("upgrad", "UPGrad", description=...)``.

``requires`` names classes of :mod:`balanced_losses`; a method whose class is missing is skipped
with a printed note (see :func:`resolve_methods`).
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
    "OUTPUT_SIZES",
    "REGISTRY",
    "TASKS",
    "WRITEUP_WEIGHTS",
    "Batch",
    "Method",
    "MethodContext",
    "PointerCountdownNet",
    "RunResult",
    "Strategy",
    "machine_info",
    "make_data",
    "register",
    "register_feature_level",
    "resolve_methods",
    "train",
]

T = 105
CHANNELS = 4
CLIP = 20.0
TASKS: tuple[str, ...] = ("pointer", "countdown")
OUTPUT_SIZES: dict[str, int] = {"pointer": 2, "countdown": T}
#: Fixed per-task weights of the value-only normalizer the demo starts from.
WRITEUP_WEIGHTS: dict[str, float] = {"pointer": 0.7, "countdown": 0.1}


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


class Strategy:
    """How one training method turns per-task losses into the step's total.

    Args:
        tasks: Task names.
        weighting: A :mod:`balanced_losses` module called as ``weighting(losses)``; ``None`` is a
            plain ``sum(losses)``.
        only: Train on this task alone (single-task baseline); the other heads are untrained.
        optimize_weighting: Add ``weighting.parameters()`` to the model's optimizer (learned
            weights such as uncertainty weighting's log-variances). Leave it off for modules
            that train their parameters with an internal optimizer (GradNorm, FAMO).
        epoch_hook: Name of a method of ``weighting`` called without arguments at each epoch's
            end (DWA's ``step``).
        step_hook: Name of a method of ``weighting`` called after each optimizer step with the
            losses on the same batch recomputed under ``no_grad`` (FAMO's ``update``).

    A weighting with a callable ``branch`` attribute (GradientBalancer, DBMTL, the
    aggregators) branches the shared features: ``views = weighting.branch(feats)``; every head
    reads its own view.
    """

    def __init__(
        self,
        tasks: Sequence[str],
        weighting: nn.Module | None = None,
        *,
        only: str | None = None,
        optimize_weighting: bool = False,
        epoch_hook: str | None = None,
        step_hook: str | None = None,
    ) -> None:
        self.tasks = tuple(tasks)
        self.weighting = weighting
        self.only = only
        self.optimize_weighting = optimize_weighting
        self.epoch_hook = epoch_hook
        self.step_hook = step_hook
        self.branches = weighting is not None and callable(getattr(weighting, "branch", None))

    def extra_parameters(self) -> list[nn.Parameter]:
        if self.weighting is None or not self.optimize_weighting:
            return []
        return list(self.weighting.parameters())

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

    def after_step(self, recompute: Callable[[], dict[str, Tensor]]) -> None:
        if self.step_hook is not None:
            getattr(self.weighting, self.step_hook)(recompute())

    def end_epoch(self) -> None:
        if self.epoch_hook is not None:
            getattr(self.weighting, self.epoch_hook)()

    def step(
        self, model: PointerCountdownNet, optimizer: torch.optim.Optimizer, batch: Batch
    ) -> dict[str, Tensor]:
        """One training step: forward, combine, backward, optimizer step, hooks."""
        feats = model.encode(batch.x)
        losses = task_losses(model.heads(self.branch(feats)), batch)
        total = self.combine(losses)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        if self.step_hook is not None:

            def recompute() -> dict[str, Tensor]:
                with torch.no_grad():
                    return task_losses(model(batch.x), batch)

            self.after_step(recompute)
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
        are read from the copy's ``weights`` (the :class:`balanced_losses.Weighting` contract).
        ``losses`` (computed on ``batch`` without branching) saves a forward pass for methods
        that do not branch.
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
            views = dict(probe.branch(feats)) if self.branches else dict.fromkeys(self.tasks, feats)
            losses = task_losses(model.heads(views), batch)
        total = probe(dict(losses))
        if self.branches:
            torch.autograd.grad(total, model.shared_parameters(), allow_unused=True)
        weights = last_weights_of(probe)
        inner = getattr(probe, "balancer", None)  # DBMTL: its gradient half scales on top
        if self.branches and inner is not None:
            scales = last_weights_of(inner)
            weights = {t: w * scales[t] for t, w in weights.items()}
        return weights

    def describe_weights(self) -> dict[str, float]:
        if self.weighting is None:
            return {}
        if not isinstance(self.weighting, bl.Weighting) and not hasattr(self.weighting, "weights"):
            return {}
        return last_weights_of(self.weighting)


def last_weights_of(weighting: Any) -> dict[str, float]:
    """Last step's weight per task: a Weighting's ``last_weights``, or a stand-in's ``weights``.

    A stand-in for a method (any module with ``tasks``, ``forward`` and a ``weights`` dict of
    tensors) reports through ``weights``. Reported numbers only: cut any graph they carry.
    """
    if isinstance(weighting, bl.Weighting):
        return dict(zip(weighting.tasks, weighting.last_weights.detach().tolist(), strict=True))
    return {t: float(w.detach()) for t, w in weighting.weights.items()}


@dataclass(frozen=True)
class MethodContext:
    """What a method factory may use to build its strategy."""

    tasks: tuple[str, ...]
    output_sizes: dict[str, int]
    model: PointerCountdownNet
    seed: int


@dataclass(frozen=True)
class Method:
    name: str
    factory: Callable[[MethodContext], Strategy]
    description: str
    requires: tuple[str, ...] = ()
    baseline: bool = False

    def missing(self) -> list[str]:
        """Names in ``requires`` that :mod:`balanced_losses` does not (yet) provide."""
        return [n for n in self.requires if getattr(bl, n, None) is None]


REGISTRY: dict[str, Method] = {}


def register(
    name: str, *, description: str, requires: Iterable[str] = (), baseline: bool = False
) -> Callable[[Callable[[MethodContext], Strategy]], Callable[[MethodContext], Strategy]]:
    def decorate(
        factory: Callable[[MethodContext], Strategy],
    ) -> Callable[[MethodContext], Strategy]:
        REGISTRY[name] = Method(name, factory, description, tuple(requires), baseline)
        return factory

    return decorate


def resolve_methods(names: Iterable[str] | None, *, baselines: bool = False) -> list[str]:
    """The requested method names (all non-baseline ones for ``None``) whose classes exist.

    Unknown names raise; a method whose class is missing from :mod:`balanced_losses` is
    skipped with a printed note.
    """
    if names is None:
        names = [n for n, m in REGISTRY.items() if baselines or not m.baseline]
    chosen, skipped = [], []
    for name in names:
        if name not in REGISTRY:
            raise SystemExit(f"unknown method `{name}`; expected one of {list(REGISTRY)}")
        missing = REGISTRY[name].missing()
        if missing:
            skipped.append(f"{name} ({', '.join(missing)})")
        else:
            chosen.append(name)
    if skipped:
        print(f"note: skipping methods that balanced_losses does not provide yet: {skipped}")
    return chosen


# The registry. Order is the order of tables and plots.


@register("pointer-alone", description="pointer loss alone", baseline=True)
def _pointer_alone(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks, only="pointer")


@register("countdown-alone", description="countdown loss alone", baseline=True)
def _countdown_alone(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks, only="countdown")


@register("sum", description="plain sum(losses)")
def _sum(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks)


@register(
    "normalizer",
    requires=("LossNormalizer",),
    description="running-mean normalizer, correction none, weights 0.7/0.1, momentum 0.95",
)
def _normalizer(ctx: MethodContext) -> Strategy:
    weighting = bl.LossNormalizer(
        ctx.output_sizes, correction="none", weights=WRITEUP_WEIGHTS, momentum=0.95
    )
    return Strategy(ctx.tasks, weighting)


@register(
    "normalizer-sqrt",
    requires=("LossNormalizer",),
    description="the same with correction sqrt (times sqrt(output size))",
)
def _normalizer_sqrt(ctx: MethodContext) -> Strategy:
    weighting = bl.LossNormalizer(
        ctx.output_sizes, correction="sqrt", weights=WRITEUP_WEIGHTS, momentum=0.95
    )
    return Strategy(ctx.tasks, weighting)


@register(
    "uncertainty",
    requires=("UncertaintyWeighting",),
    description="uncertainty weighting (Kendall), s = 0 at start, trained by the model's Adam",
)
def _uncertainty(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks, bl.UncertaintyWeighting(ctx.tasks), optimize_weighting=True)


def register_feature_level(
    name: str, cls: str, *, description: str, seeded: bool = False, **options: Any
) -> None:
    """Register a method whose weighting acts at the shared features: ``bl.<cls>(tasks, ...)``.

    The strategy routes the encoder's output through ``weighting.branch`` (see
    :class:`Strategy`) and the combination happens in the backward pass. ``options`` are passed
    to the constructor as given (nothing tuned per method); ``seeded`` adds ``seed=<run seed>``
    for weightings with a random stream (PCGrad's order of projections).
    """

    def factory(ctx: MethodContext) -> Strategy:
        kwargs = {**options, **({"seed": ctx.seed} if seeded else {})}
        return Strategy(ctx.tasks, getattr(bl, cls)(ctx.tasks, **kwargs))

    register(name, requires=(cls,), description=description)(factory)


register_feature_level(
    "gradient-balancer",
    "GradientBalancer",
    description="per-task gradients rescaled at the shared features in one backward pass",
)
register_feature_level(
    "calibrated",
    "CalibratedBalancer",
    description="GradientBalancer for the first 100 steps, then the weights it reached, fixed",
)


@register(
    "gradnorm",
    requires=("GradNorm",),
    description="GradNorm (Chen et al. 2018), alpha 1.5, on the encoder's last layer",
)
def _gradnorm(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks, bl.GradNorm(ctx.tasks, ctx.model.last_shared_parameters()))


@register("dwa", requires=("DWA",), description="Dynamic Weight Average (Liu et al. 2019), T = 2")
def _dwa(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks, bl.DWA(ctx.tasks, temperature=2.0), epoch_hook="step")


@register("rlw", requires=("RLW",), description="random loss weighting (Lin et al. 2022)")
def _rlw(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks, bl.RLW(ctx.tasks, seed=ctx.seed))


@register(
    "imtll",
    requires=("IMTLL",),
    description="IMTL-L (Liu et al. 2021), scales trained by the model's Adam",
)
def _imtll(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks, bl.IMTLL(ctx.tasks), optimize_weighting=True)


@register("famo", requires=("FAMO",), description="FAMO (Liu et al. 2023), lr 0.025, wd 1e-3")
def _famo(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks, bl.FAMO(ctx.tasks), step_hook="update")


@register("geometric-mean", requires=("GeometricMean",), description="geometric mean of losses")
def _geometric_mean(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks, bl.GeometricMean(ctx.tasks))


@register("dbmtl", requires=("DBMTL",), description="Dual-Balancing MTL (Lin et al. 2023)")
def _dbmtl(ctx: MethodContext) -> Strategy:
    return Strategy(ctx.tasks, bl.DBMTL(ctx.tasks))


# Conflict-aware aggregators at the shared features, defaults as shipped.
register_feature_level("upgrad", "UPGrad", description="UPGrad (Quinton & Rey 2024)")
register_feature_level(
    "upgrad-balanced",
    "UPGrad",
    balance_norms=True,
    description="UPGrad on gradients first scaled to the mean EMA norm (balance_norms=True)",
)
register_feature_level("mgda", "MGDA", description="MGDA-UB, min-norm point (Sener & Koltun 2018)")
register_feature_level("cagrad", "CAGrad", description="CAGrad (Liu et al. 2021), c = 0.4")
register_feature_level("imtlg", "IMTLG", description="IMTL-G (Liu et al. 2021)")
register_feature_level(
    "aligned-mtl", "AlignedMTL", description="Aligned-MTL (Senushkin et al. 2023)"
)
register_feature_level(
    "nash-mtl", "NashMTL", description="Nash-MTL (Navon et al. 2022), max_norm = 1"
)
register_feature_level("fairgrad", "FairGrad", description="FairGrad (Ban & Ji 2024), alpha = 1")
register_feature_level(
    "pcgrad", "PCGrad", seeded=True, description="PCGrad (Yu et al. 2020), seeded by the run"
)


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
    """Train the demo model under one registered method and return its validation figures.

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
    ctx = MethodContext(TASKS, dict(OUTPUT_SIZES), model, seed)
    strategy = REGISTRY[method].factory(ctx)
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
