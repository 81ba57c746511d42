"""Every public weighting, built and trained the same way, for the suites that must cover all.

One entry per configuration in :data:`CASES`: every configuration of the package's catalog
(:mod:`balanced_losses.catalog`: each exported method's defaults and the named configurations),
then a few that only the tests exercise. A :class:`Case` says how to build the weighting from a
:class:`Setup` (task names, ``allow_missing``, the model's shared parameters, output sizes) and
how a training loop drives it:

- ``level``: :data:`LOSS` weightings take the losses; :data:`FEATURES` ones (``GradientBalancer``,
  ``DBMTL``, the aggregators) also need the shared features routed through ``weighting.branch``
  before the heads.
- ``Setup.shared``: the trunk's parameters, for methods that differentiate through them
  (``GradNorm``).
- ``positive`` and ``stateless`` follow from the class (its loss domain, an empty state).

:class:`Driver` builds a small trunk + heads model and the weighting wired as its Case says, and
runs real training steps (forward through ``branch`` when needed, ``backward``, optimizer step,
then the same ``after_step`` and ``epoch_end`` calls for every method). A newly exported method
is in :data:`CASES`, and so in every suite, without an edit here.

The scalar-loss helpers at the end (:func:`leaf_losses`, :func:`losses_at`, ...) serve the
per-method unit tests, which feed hand-picked loss values straight to a loss-level weighting.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import balanced_losses as bl

LOSS = "loss"
FEATURES = "features"


@dataclass(frozen=True)
class Setup:
    """What a weighting may need at construction."""

    tasks: tuple[str, ...]
    allow_missing: bool = False
    #: The model's shared parameters (the trunk), for methods that differentiate through them.
    shared: list[Tensor] = field(default_factory=list)
    #: The user's fixed factors (``weights=``), passed to every method.
    weights: Mapping[str, float] | None = None

    @property
    def sizes(self) -> dict[str, int]:
        """Output size of each task's head, as the Driver builds them."""
        return {t: head_size(i) for i, t in enumerate(self.tasks)}


@dataclass(frozen=True)
class Case:
    """How to build one weighting and drive it like a training loop does."""

    name: str
    build: Callable[[Setup], bl.Weighting]
    #: LOSS: ``weighting(losses)``; FEATURES: the shared features also go through ``branch``.
    level: str = LOSS
    #: Losses must be > 0 (logs, products or ratios): ``check_inputs`` rejects 0.
    positive: bool = False
    #: Keeps no state at all (empty ``state_dict``): "the state moved" cannot be asserted.
    stateless: bool = False
    #: Steps per epoch: the Driver calls ``epoch_end`` every so many steps.
    epoch_length: int = 3

    def __post_init__(self) -> None:
        if self.level not in (LOSS, FEATURES):
            raise ValueError(f"`level` must be {LOSS!r} or {FEATURES!r}, got {self.level!r}")

    def __str__(self) -> str:
        return self.name

    def make(
        self,
        tasks: Sequence[str],
        *,
        allow_missing: bool = False,
        shared=(),
        weights: Mapping[str, float] | None = None,
    ) -> Any:
        """Build the weighting (``shared``: parameters a method may differentiate through)."""
        return self.build(Setup(tuple(tasks), allow_missing, list(shared), weights))


def mean_norms(gramian: Tensor) -> Tensor:
    """A user's rule of the Gramian: every gradient scaled to the tasks' mean norm.

    c_k = mean_j ||g_j|| / ||g_k|| (0 for a zero gradient): invariant to the losses' scale.
    """
    norms = torch.diagonal(gramian).clamp_min(0).sqrt()
    inverse = torch.where(norms > 0, 1.0 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)
    return norms.mean() * inverse


def head_size(index: int) -> int:
    """Output size of the head of the ``index``-th task: 1, 14, 27, ..."""
    return 1 + 13 * index


def _catalog_case(method: bl.catalog.Method) -> Case:
    """The Case of one configuration of the package's catalog, with what the class declares."""
    suffix = method.key[len(bl.catalog.key_of(method.cls)) :]

    def build(s: Setup) -> bl.Weighting:
        return method.build(
            s.tasks,
            output_sizes=s.sizes,
            shared_parameters=s.shared,
            seed=0,
            weights=s.weights,
            allow_missing=s.allow_missing,
        )

    probe = build(Setup(("a", "b"), shared=[torch.zeros(1, requires_grad=True)]))
    return Case(
        method.name + suffix,
        build,
        level=FEATURES if method.level == "features" else LOSS,
        positive=probe._loss_domain == "positive",
        stateless=set(probe.state_dict()) == {"_extra_state"},
    )


#: Every configuration of the catalog: each public method's defaults, and the named ones.
CATALOG: list[Case] = [_catalog_case(method) for method in bl.catalog.methods()]
#: The catalog's configurations, then configurations that only the tests exercise.
CASES: list[Case] = [
    *CATALOG,
    Case(
        "LossNormalizer-none",
        lambda s: bl.LossNormalizer(
            s.tasks,
            correction="none",
            momentum=0.0,
            weights=s.weights,
            allow_missing=s.allow_missing,
        ),
    ),
    Case(
        "LossNormalizer-accumulate",  # resumed mid-window by the checkpoint test
        lambda s: bl.LossNormalizer(
            s.tasks,
            output_sizes=s.sizes,
            accumulation_steps=3,
            weights=s.weights,
            allow_missing=s.allow_missing,
        ),
    ),
    Case(
        "UncertaintyWeighting-positive",
        lambda s: bl.UncertaintyWeighting(
            s.tasks,
            regularizer="positive",
            output_sizes=s.sizes,
            correction="sqrt",
            weights=s.weights,
            allow_missing=s.allow_missing,
        ),
    ),
    Case(
        "GradNorm-sgd",
        lambda s: bl.GradNorm(
            s.tasks,
            s.shared,
            optimizer="sgd",
            lr=0.01,
            weights=s.weights,
            allow_missing=s.allow_missing,
        ),
        positive=True,
    ),
    Case(
        "GradientBalancer-max",
        lambda s: bl.GradientBalancer(
            s.tasks,
            target="max",
            weights={s.tasks[0]: 0.5} if s.weights is None else s.weights,
            allow_missing=s.allow_missing,
        ),
        level=FEATURES,
    ),
    Case(
        "CalibratedBalancer-frozen",  # frozen after two steps: fixed weights from then on
        lambda s: bl.CalibratedBalancer(
            s.tasks, steps=2, weights=s.weights, allow_missing=s.allow_missing
        ),
        level=FEATURES,
    ),
    Case(
        "STCH-nowarmup",  # the nadir epoch first: the smooth maximum from the Driver's 4th step
        lambda s: bl.STCH(
            s.tasks, warmup_epochs=0, weights=s.weights, allow_missing=s.allow_missing
        ),
        positive=True,
    ),
    # A user's rule through the public machinery.
    Case(
        "GramianWeighting",
        lambda s: bl.GramianWeighting(
            s.tasks, mean_norms, weights=s.weights, allow_missing=s.allow_missing
        ),
        level=FEATURES,
        stateless=True,
    ),
]
BY_NAME: dict[str, Case] = {case.name: case for case in CASES}


def params(cases: Sequence[Case] = CASES, **marks: Any) -> list[Any]:
    """``pytest.param`` per case, id = its name; ``marks[name]`` adds marks to that case.

    A test states why a case cannot run where it parametrizes::

        @pytest.mark.parametrize("case", params(GradNorm=pytest.mark.xfail(strict=True, ...)))

    Keyword names are case names with ``-`` written ``_``.
    """
    known = {case.name.replace("-", "_") for case in cases}
    unknown = sorted(set(marks) - known)
    if unknown:
        raise KeyError(f"no case named {unknown}; expected some of {sorted(known)}")
    return [
        pytest.param(case, id=case.name, marks=marks.get(case.name.replace("-", "_"), ()))
        for case in cases
    ]


def public_weightings() -> list[str]:
    """Names of the concrete public classes that subclass ``bl.Weighting``."""
    return sorted(
        name
        for name in bl.__all__
        if isinstance(obj := getattr(bl, name), type)
        and issubclass(obj, bl.Weighting)
        and obj is not bl.Weighting
    )


def unregistered() -> list[str]:
    """Public weighting classes that no case builds."""
    built = {
        type(case.make(("a", "b"), shared=[torch.zeros(1, requires_grad=True)])) for case in CASES
    }
    return [name for name in public_weightings() if getattr(bl, name) not in built]


# ----------------------------------------------------------------------------- the driver


class TrunkHeads(nn.Module):
    """A shared trunk and one head per task, each head with its own output size."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(16, head_size(i)) for i, t in enumerate(tasks)})


def batch(tasks: Sequence[str], step: int) -> tuple[Tensor, dict[str, Tensor]]:
    """Deterministic inputs and per-task targets of training step ``step``."""
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=gen)
    targets = {t: 3 * torch.randn(8, head_size(i), generator=gen) for i, t in enumerate(tasks)}
    return x, targets


Values = Mapping[str, "float | None"]


class Driver:
    """A model, a weighting wired to it as its Case says, and an optimizer over both.

    ``losses(step)`` runs the model on the batch of ``step`` and returns each task's Huber loss;
    with ``values`` it returns losses with exactly those values that still depend on the model
    (``v * q / q.detach()``, ``q`` the task's Huber loss): any value, NaN and inf included,
    reaches the weighting and, in backward, the features and the shared parameters. A task whose
    value is None is left out of the mapping.
    """

    def __init__(
        self,
        case: Case,
        tasks: Sequence[str],
        *,
        allow_missing: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 1,
        lr: float = 1e-2,
        model: TrunkHeads | None = None,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        torch.manual_seed(seed)
        self.case = case
        self.tasks = tuple(tasks)
        self.device = torch.device(device)
        self.model = (TrunkHeads(self.tasks) if model is None else model).to(self.device)
        self.weighting = case.make(
            self.tasks,
            allow_missing=allow_missing,
            shared=self.model.trunk.parameters(),
            weights=weights,
        ).to(self.device)
        self.optimizer = torch.optim.SGD(
            [*self.model.parameters(), *learnable(self.weighting)], lr=lr
        )
        self.steps = 0

    def features(self, x: Tensor) -> dict[str, Tensor]:
        """Each task's view of the shared features: through ``branch`` for FEATURES cases."""
        feats = self.model.trunk(x)
        if self.case.level == FEATURES:
            return self.weighting.branch(feats)
        return dict.fromkeys(self.tasks, feats)

    def data(
        self, step: int, values: Values | None = None, *, dtype: torch.dtype = torch.float32
    ) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor] | None]:
        """Inputs, targets and loss values (tensors) of step ``step``, on the device."""
        x, targets = batch(self.tasks, step)
        x, targets = x.to(self.device), {t: y.to(self.device) for t, y in targets.items()}
        if values is None:
            return x, targets, None
        wanted = {
            t: torch.tensor(v, dtype=dtype, device=self.device)
            for t, v in values.items()
            if v is not None
        }
        return x, targets, wanted

    def compute(
        self, x: Tensor, targets: Mapping[str, Tensor], values: Mapping[str, Tensor] | None
    ) -> dict[str, Tensor]:
        """The losses of the model on ``x`` (see the class docstring for ``values``)."""
        views = self.features(x)
        real = {
            t: bl.functional.huber_loss(self.model.heads[t](views[t]), targets[t])
            for t in self.tasks
        }
        if values is None:
            return real
        # q / q.detach() is exactly 1: the loss has the value v and q's dependence on the model.
        # detach() cuts the denominator, so the gradient is v * grad(q) / q.
        return {t: v * (real[t] / real[t].detach()) for t, v in values.items()}

    def losses(
        self, step: int, values: Values | None = None, *, dtype: torch.dtype = torch.float32
    ) -> dict[str, Tensor]:
        """The losses of training step ``step`` (see the class docstring for ``values``)."""
        return self.compute(*self.data(step, values, dtype=dtype))

    def step(
        self, step: int, values: Values | None = None, *, dtype: torch.dtype = torch.float32
    ) -> Tensor:
        """One training step: forward, backward, optimizer step, the case's hooks; the total."""
        self.optimizer.zero_grad()
        losses = self.losses(step, values, dtype=dtype)
        total = self.weighting(losses)
        total.backward()
        self.optimizer.step()
        self.hooks(step, values)
        return total.detach()

    def hooks(self, step: int, values: Values | None = None) -> None:
        """The calls a loop makes after the optimizer step, the same for every method.

        ``after_step`` gets a function that recomputes the step's losses: only a method that
        needs them (FAMO) calls it. ``epoch_end`` closes an epoch every ``epoch_length`` steps.
        """
        self.weighting.after_step(lambda: self.losses(step, values))
        if (step + 1) % self.case.epoch_length == 0:
            self.weighting.epoch_end()

    def fresh_state(self) -> dict[str, Any]:
        """The state_dict of a freshly built weighting of this case (to tell that state moved)."""
        return Driver(self.case, self.tasks).weighting.state_dict()


@contextlib.contextmanager
def cuda_sync_errors() -> Iterator[None]:
    """Inside, any host-device synchronization on CUDA raises (torch's sync debug mode).

    Switching the mode on warns once that it is a prototype; that warning is not the test's.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def learnable(weighting: nn.Module) -> list[nn.Parameter]:
    """Parameters a training loop must give its optimizer."""
    return [p for p in weighting.parameters() if p.requires_grad]


def _bytes(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def same(a: object, b: object) -> bool:
    """Bitwise equality of tensors (dtype included), recursively through dicts/lists/tuples."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        # Bytes, not values: NaN equals NaN (a logged output that no step has filled yet).
        return torch.equal(_bytes(a), _bytes(b))
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def assert_state_moved(case: Case, state: Mapping[str, Any], fresh: Mapping[str, Any]) -> None:
    """Fail unless ``state`` differs from a fresh module's: a comparison would be vacuous."""
    if case.stateless:
        # Only the task names, which every weighting saves.
        tensors = [key for key, value in state.items() if isinstance(value, Tensor)]
        assert tensors == [], f"{case.name} is registered stateless"
        assert same(state, fresh), f"{case.name} is registered stateless"
        return
    assert state, f"{case.name} has an empty state_dict: register it with stateless=True"
    moved = [key for key in state if not same(state[key], fresh[key])]
    assert moved, f"{case.name}: no state moved from a fresh module's; the test would be vacuous"


# ------------------------------------------------------------- scalar losses for unit tests

TASKS = ("depth", "segmentation", "normals")


def leaf_losses(values: list[float], *, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Scalar leaf tensors named after ``TASKS``, so that autograd gives d total / d L_k."""
    return {
        name: torch.tensor(v, dtype=dtype, requires_grad=True)
        for name, v in zip(TASKS, values, strict=True)
    }


def losses_at(step: int) -> list[float]:
    """A deterministic, positive, non-monotone sequence of per-task losses."""
    return [
        (k + 1) * math.exp(-0.1 * step) * (1.0 + 0.3 * math.sin(1.7 * step + k))
        for k in range(len(TASKS))
    ]


def effective_weights(total: Tensor, losses: dict[str, Tensor]) -> Tensor:
    """d total / d L_k in task order, by autograd (graph kept)."""
    names = list(losses)
    grads = torch.autograd.grad(total, [losses[n] for n in names], retain_graph=True)
    return torch.stack(grads)


def scalar_step(case: Case, module: bl.Weighting, step: int, *, dtype=torch.float64) -> tuple:
    """One step of ``module`` on the scalar losses of ``step``; returns (total, weights).

    Learned parameters take a plain SGD step (stateless, so nothing else must be saved);
    ``epoch_end`` runs every ``epoch_length`` steps; ``after_step`` gets losses 5-15 % lower.
    """
    losses = leaf_losses(losses_at(step), dtype=dtype)
    total = module(losses)
    weights = effective_weights(total, losses)
    params = learnable(module)
    if params:
        grads = torch.autograd.grad(total, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(0.1 * g)
    if (step + 1) % case.epoch_length == 0:
        module.epoch_end()
    after = [v * (0.9 - 0.05 * k) for k, v in enumerate(losses_at(step))]
    module.after_step(lambda: leaf_losses(after, dtype=dtype))
    return total.detach(), weights


def reload(module: nn.Module, fresh: nn.Module) -> nn.Module:
    """Load ``module``'s state_dict into ``fresh`` through torch.save / torch.load."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh


def leave_spawned_worker() -> None:
    """End a spawned worker whose results are saved and whose process group is destroyed.

    Skips the interpreter's teardown: there, torch 2.13's gloo now and then aborts a worker
    that has finished ("terminate called without an active exception"), which fails a spawn
    whose work was done.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
