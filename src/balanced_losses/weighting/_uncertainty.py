"""UncertaintyWeighting: learned homoscedastic task uncertainty (Kendall et al. 2018)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balanced_losses._base import Weighting
from balanced_losses.functional import Correction, reduction_factors

__all__ = ["UncertaintyWeighting"]

Kind = Literal["regression", "classification"]
Regularizer = Literal["kendall", "positive"]


class UncertaintyWeighting(Weighting):
    r"""Learned per-task log-variances :math:`s_k = \log \sigma_k^2` weigh the losses.

    .. math::
        \text{total} = \sum_k c_k \bigl(a_k\, e^{-s_k} L_k + r(s_k)\bigr),\qquad
        a_k = \begin{cases} \tfrac12 & \text{regression} \\ 1 & \text{classification}
        \end{cases}

    with :math:`r(s) = \tfrac12 s` (``regularizer="kendall"``: :math:`\log\sigma`, Kendall,
    Gal & Cipolla 2018, Eq. 7 for regression and Eq. 10 for classification) or
    :math:`r(s) = \log(1 + e^{s})` (``regularizer="positive"``: :math:`\log(1+\sigma^2)`,
    Liebel & Koerner 2018). The parameter is :math:`s = \log\sigma^2`, not :math:`\sigma`: it is
    unconstrained and :math:`e^{-s}` never divides by zero. :math:`c_k` is the optional
    reduction-factor correction of :class:`~balanced_losses.LossNormalizer` (1 by default). It
    multiplies the whole task term, not just the loss: inside, :math:`s_k` would absorb it
    (the optimum would move to :math:`\log(c_k L_k)` and the weight back to :math:`1/(2L_k)`);
    outside, the learned weight converges to :math:`c_k/(2L_k)` and the correction persists.

    **The Kendall total can be negative, and that is expected.** :math:`\tfrac12 s_k` is
    negative whenever :math:`\sigma_k < 1`, which is where a task with a loss below 1 drives it:
    the optimum is :math:`s_k = \log L_k` for regression and :math:`\log(2 L_k)` for
    classification, so the total goes below zero once the losses are small. Only the gradients
    matter. ``regularizer="positive"`` keeps every term, and so the total, above zero.

    **What it converges to.** At that optimum the regression weight
    :math:`c_k a_k e^{-s_k} = c_k/(2 L_k)`: the same division of each loss by its own value that
    :class:`~balanced_losses.LossNormalizer` does, reached by gradient descent instead of an
    average. It therefore has the same blind spot for gradients of different scale (a Huber loss
    in its linear regime is punished for being large), and does not "handle the reduction bias
    implicitly". What often makes it work in practice is that :math:`s` starts at ``init`` and
    moves slowly, so early training stays close to a fixed weighting. To balance the gradients
    that tasks send into shared layers, see :class:`balanced_losses.GradientBalancer`.

    Register the module's parameters with the optimizer (``model.parameters()`` plus
    ``weighting.parameters()``).

    Args:
        tasks: Task names, in order.
        kinds: Optional task name to ``"regression"`` (default) or ``"classification"``.
        init: Initial value of every :math:`s_k`; 0 means :math:`\sigma_k = 1`.
        regularizer: ``"kendall"`` or ``"positive"``.
        output_sizes: Task name to its output size; required when ``correction`` is not
            ``"none"``.
        correction: Reduction-factor correction, as in :class:`~balanced_losses.LossNormalizer`.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks; an absent task adds neither its loss
            nor its regularizer, so its :math:`s_k` receives no gradient that step.
        check_inputs: Raise ``ValueError`` on non-finite or negative losses (syncs).

    Example:
        >>> import torch
        >>> uw = UncertaintyWeighting(["depth", "segmentation"], kinds={"segmentation":
        ...     "classification"})
        >>> total = uw({"depth": torch.tensor(2.0), "segmentation": torch.tensor(0.5)})
        >>> total  # 0.5 * 2.0 + 1.0 * 0.5 with s = 0
        tensor(1.5000, grad_fn=<SumBackward0>)

    References:
        Kendall, Gal, Cipolla. Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
        Geometry and Semantics. CVPR 2018. Liebel, Koerner. Auxiliary Tasks in Multi-task
        Learning. arXiv:1805.06334, 2018.
    """

    # The method is invariant to a constant factor of a loss (see Weighting._check_factors).
    _cancels_factors = True

    coefficients: Tensor
    factors: Tensor

    log_vars: nn.Parameter

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        kinds: Mapping[str, Kind] | None = None,
        init: float = 0.0,
        regularizer: Regularizer = "kendall",
        output_sizes: Mapping[str, int] | None = None,
        correction: Correction = "none",
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        check_inputs: bool = False,
    ) -> None:
        super().__init__(
            tasks, weights=weights, allow_missing=allow_missing, check_inputs=check_inputs
        )
        if regularizer not in ("kendall", "positive"):
            raise ValueError(f"`regularizer` must be 'kendall' or 'positive', got {regularizer!r}")
        if not (isinstance(init, (int, float)) and math.isfinite(init)):
            raise ValueError(f"`init` must be a finite number, got {init!r}")
        kinds = dict(kinds or {})
        if set(kinds) - set(self.tasks):
            raise self._unknown(kinds)
        for task, kind in kinds.items():
            if kind not in ("regression", "classification"):
                raise ValueError(
                    f"kind of task `{task}` must be 'regression' or 'classification', got {kind!r}"
                )
        self.kinds: dict[str, Kind] = {t: kinds.get(t, "regression") for t in self.tasks}
        factors = [1.0] * len(self.tasks)
        if correction != "none" or output_sizes is not None:
            if output_sizes is None:
                raise ValueError(f"`correction={correction!r}` needs `output_sizes`")
            if set(output_sizes) != set(self.tasks):
                raise KeyError(
                    f"`output_sizes` must name exactly the tasks {list(self.tasks)}, "
                    f"got {list(output_sizes)}"
                )
            relative = reduction_factors({t: output_sizes[t] for t in self.tasks}, correction)
            factors = [relative[t] for t in self.tasks]
        self.regularizer = regularizer
        self.init = float(init)
        self.correction = correction
        self._add_parameter(
            "log_vars", torch.full((len(self.tasks),), self.init, dtype=torch.float64)
        )
        # Eq. 7 (regression) has 1/(2 sigma^2), Eq. 10 (classification) 1/sigma^2.
        coefficients = [0.5 if self.kinds[t] == "regression" else 1.0 for t in self.tasks]
        self._add_state("coefficients", torch.tensor(coefficients), kind="constant")
        self._add_state("factors", torch.tensor(factors), kind="constant")

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        r"""The uncertainty-weighted total and the weights :math:`c_k e^{-s_k}`."""
        s = self.log_vars.to(values.dtype)
        weights = self.coefficients * self.factors * torch.exp(-s)
        # Eq. 7 of Kendall et al. 2018: the log sigma = s/2 term keeps sigma from growing
        # without bound. Liebel & Koerner 2018 use log(1 + sigma^2) = softplus(s) > 0 instead,
        # so that the total stays positive.
        penalty = 0.5 * s if self.regularizer == "kendall" else F.softplus(s)
        terms = weights * values + self.factors * penalty
        return torch.where(present, terms, torch.zeros_like(terms)).sum(), weights

    @property
    def sigma(self) -> dict[str, Tensor]:
        r"""The learned :math:`\sigma_k = e^{s_k / 2}` per task (detached)."""
        # Reporting only: no gradient should flow through a logged value.
        return {t: torch.exp(0.5 * self.log_vars[i].detach()) for i, t in enumerate(self.tasks)}

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        kinds = {t: k for t, k in self.kinds.items() if k != "regression"}
        parts = [f"tasks={list(self.tasks)}", f"regularizer={self.regularizer!r}"]
        if kinds:
            parts.append(f"kinds={kinds}")
        if self.correction != "none":
            parts.append(f"correction={self.correction!r}")
        return ", ".join(parts)
