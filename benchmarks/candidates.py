"""Candidate changes on existing methods, measured in the study of the default (docs/choosing.md).

Each candidate is a small change on a method that exists, written here as a subclass so that a
candidate that loses adds nothing to the package's API; the one that wins moves into the
package. The suite runs them by name (``suite.VARIANTS``) on the development problems.

- ``partial``: partial equalization at the features, :math:`s_k = (T / \\hat n_k)^\\alpha` with
  :math:`0 < \\alpha < 1` (GradNorm's asymmetry exponent, Chen et al. 2018, in one pass).
- ``lift``: lift only the starved: a task whose norm is below a share :math:`\\rho` of the mean is
  raised to :math:`\\rho T`; no task is lowered, :math:`s_k = \\max(1, \\rho T / \\hat n_k)`.
- ``frozen``: calibrate, then freeze: the norms are averaged over the first ``steps`` steps and
  then kept, so the multipliers become fixed weights.
- ``clamped``: full equalization with each multiplier clamped to ``[1 / c, c]``.
- ``params``: calibrate, then freeze, with each task's gradient norm measured at the trunk's
  *parameters* (one ``autograd.grad`` per task on the calibration steps) instead of at the
  features: where heads read the features differently (a mean over time next to one step), the
  norm at the features is not what reaches the shared weights (round 2 of the study).
  ``params-100-sqrt`` raises each multiplier to 1/2 (partial equalization at the parameters)
  and ``params-20`` calibrates over 20 steps (round 3).
- ``every``: the default, ``CalibratedWeighting``, measuring on every 4th or 10th of its 100
  calibration steps (25 or 10 measurements), for a tenth to a quarter of its extra backward
  passes (after round 3).
- ``dbmtl-smoothed``: DB-MTL with its log transform's division by the batch loss replaced by a
  division by the loss's running mean (the gradient of :math:`\\log L` is :math:`\\nabla L / L`;
  here :math:`\\nabla L / \\hat m`), then the gradient half as in ``DBMTL``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import balanced_losses as bl


class Partial(bl.GradientBalancer):
    """Partial equalization: each multiplier raised to ``alpha``."""

    def __init__(self, tasks: Sequence[str], *, alpha: float) -> None:
        super().__init__(tasks)
        self.alpha = alpha

    def _scales(self) -> Tensor:
        return super()._scales().pow(self.alpha)


class Lift(bl.GradientBalancer):
    """Lift a task below ``rho`` of the mean norm up to it; never lower one."""

    def __init__(self, tasks: Sequence[str], *, rho: float) -> None:
        super().__init__(tasks)
        self.rho = rho

    def _scales(self) -> Tensor:
        return (self.rho * super()._scales()).clamp_min(1.0)


class Frozen(bl.GradientBalancer):
    """The multipliers of the norms averaged over the first ``steps`` steps, then fixed."""

    def __init__(self, tasks: Sequence[str], *, steps: int) -> None:
        # An EMA with momentum 1 - 1/steps weighs the calibration steps nearly alike.
        super().__init__(tasks, momentum=1.0 - 1.0 / steps)
        self.steps = steps

    def _stats_input(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        mean, valid = super()._stats_input(values, present)
        return mean, valid & (self.count < self.steps)


class Clamped(bl.GradientBalancer):
    """Full equalization with every multiplier in ``[1 / limit, limit]``."""

    def __init__(self, tasks: Sequence[str], *, limit: float) -> None:
        super().__init__(tasks)
        self.limit = limit

    def _scales(self) -> Tensor:
        return super()._scales().clamp(1.0 / self.limit, self.limit)


class SmoothedDBMTL(bl.GradientBalancer):
    """DB-MTL with each loss divided by its running mean instead of its batch value."""

    def __init__(self, tasks: Sequence[str]) -> None:
        super().__init__(tasks, target="max")
        self.normalizer = bl.LossNormalizer(list(tasks), correction="none")

    def forward(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        self.normalizer(losses)  # updates the running means; its weights are 1 / m_k
        scale = self.normalizer.last_weights
        terms = {
            t: scale[i].to(loss.dtype) * loss
            for i, t in enumerate(self.tasks)
            if (loss := losses.get(t)) is not None
        }
        return super().forward(terms)


class ParamsFrozen(bl.Weighting):
    r"""Loss weights :math:`s_k = \operatorname{mean}_j \hat n_j / \hat n_k` from each task's
    gradient norm at the trunk's parameters, averaged over the first ``steps`` steps, then fixed.

    A loss-level weighting: on a calibration step it differentiates each loss alone with
    respect to the trunk's parameters (``attach`` names the trunk), K extra backward passes;
    afterwards it is a fixed weighted sum.
    """

    def __init__(self, tasks: Sequence[str], *, steps: int, alpha: float = 1.0) -> None:
        super().__init__(tasks)
        self.steps = steps
        self.alpha = alpha
        k = len(self.tasks)
        self._add_state("ema", torch.zeros(k, dtype=torch.float64))
        self._add_state("count", torch.zeros(k, dtype=torch.long))
        self._add_state("steps_done", torch.zeros((), dtype=torch.long), task_axis=None)
        self._params: list[Tensor] = []

    def attach(self, model: nn.Module, trunk: str, heads: Any = None) -> ParamsFrozen:
        self._params = [p for p in model.get_submodule(trunk).parameters() if p.requires_grad]
        return self

    def _scales(self) -> Tensor:
        seen = self.count > 0
        norms = torch.where(seen, self.ema, torch.ones_like(self.ema))
        target = norms[seen].mean() if bool(seen.any()) else torch.ones((), dtype=norms.dtype)
        ratio = (target / norms.clamp_min(1e-30)).pow(self.alpha)
        return torch.where(seen & (norms > 0), ratio, 1.0)

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        if self._updating and int(self.steps_done) < self.steps and self._params:
            with torch.no_grad():
                norms = []
                for k in range(len(self.tasks)):
                    if not bool(present[k]):
                        norms.append(torch.zeros((), dtype=torch.float64))
                        continue
                    with torch.enable_grad():
                        grads = torch.autograd.grad(
                            values[k], self._params, retain_graph=True, allow_unused=True
                        )
                    sq = sum(
                        (g.double().square().sum() for g in grads if g is not None),
                        torch.zeros((), dtype=torch.float64),
                    )
                    norms.append(sq.sqrt())
                measured = torch.stack(norms)
                valid = measured > 0
                # A plain running mean over the calibration steps.
                n = self.count.to(torch.float64)
                self.ema.copy_(torch.where(valid, (self.ema * n + measured) / (n + 1), self.ema))
                self.count.add_(valid.to(torch.long))
        if self._updating:
            self.steps_done.add_(1)
        scale = torch.where(present, self._scales().to(values.dtype), 0.0)
        return (scale.detach() * values).sum(), scale.detach()


class Every(bl.CalibratedWeighting):
    """``CalibratedWeighting`` measuring on every ``every``-th calibration step, at the trunk.

    ``attach`` names the trunk's parameters, in the order the suite gives the package's
    ``calibrated-weighting`` runs, so that only ``every`` differs from them.
    """

    def __init__(self, tasks: Sequence[str], *, every: int) -> None:
        super().__init__(tasks, every=every)

    def attach(self, model: nn.Module, trunk: str, heads: Any = None) -> Every:
        self._given = [p for p in model.get_submodule(trunk).parameters() if p.requires_grad]
        return self


#: Candidate name -> factory of the task names.
CANDIDATES = {
    "partial-0.5": lambda tasks: Partial(tasks, alpha=0.5),
    "lift-0.5": lambda tasks: Lift(tasks, rho=0.5),
    "frozen-100": lambda tasks: Frozen(tasks, steps=100),
    "clamped-4": lambda tasks: Clamped(tasks, limit=4.0),
    "dbmtl-smoothed": SmoothedDBMTL,
    "params-100": lambda tasks: ParamsFrozen(tasks, steps=100),
    "params-100-sqrt": lambda tasks: ParamsFrozen(tasks, steps=100, alpha=0.5),
    "params-20": lambda tasks: ParamsFrozen(tasks, steps=20),
    "every-4": lambda tasks: Every(tasks, every=4),
    "every-10": lambda tasks: Every(tasks, every=10),
}

__all__ = [
    "CANDIDATES",
    "Clamped",
    "Every",
    "Frozen",
    "Lift",
    "ParamsFrozen",
    "Partial",
    "SmoothedDBMTL",
]
