"""LossNormalizer: running-mean normalization of loss values with a reduction-factor correction."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from balanced_losses._base import Weighting
from balanced_losses._checks import check_momentum, check_number, check_task_names
from balanced_losses._numerics import debiased, ema_step
from balanced_losses.functional import Correction, reduction_factors

__all__ = ["LossNormalizer"]


class LossNormalizer(Weighting):
    r"""Divide each loss by its running mean and correct for its reduction size.

    .. math::
        \text{total} = \sum_k c_k\, \frac{L_k}{\hat m_k}

    where :math:`\hat m_k` is a bias-corrected exponential moving average of :math:`L_k`
    (detached) and :math:`c_k` the reduction-factor
    correction for the :math:`N_k` elements that task :math:`k`'s loss is a mean over
    (see :func:`~balanced_losses.functional.reduction_factors`):
    ``"none"`` (1), ``"sqrt"`` (:math:`\sqrt{N_k}`) or ``"linear"`` (:math:`N_k`). Your own
    factors :math:`w_k` (``weights``) multiply task :math:`k`'s gradient on top, as in every
    method (see :class:`~balanced_losses.Weighting`): the gradient of :math:`L_k` is
    :math:`w_k c_k / \hat m_k`. Without ``output_sizes`` the sizes count as equal: no
    correction.

    **The factors are relative.** :math:`c_k = c(N_k) / \operatorname{mean}_j c(N_j)`, so they
    average to 1. Balance depends only on the ratios :math:`c_k / c_j`; dividing by the mean
    keeps the size of the total, and so the effective learning rate, the same as without the
    correction, instead of multiplying every gradient by :math:`\sqrt{N}` of the largest head.

    **The running mean does not lag at the start.** With momentum :math:`\beta`,
    :math:`m_t = \beta m_{t-1} + (1-\beta) L_t` from :math:`m_0 = 0` and
    :math:`\hat m_t = m_t / (1-\beta^t)` (Adam's bias correction, Kingma & Ba 2015, Sec. 3).
    The first step is normalized by its own value exactly; an uncorrected EMA started at 0
    would take about :math:`1/(1-\beta)` steps to settle. The statistic includes the current
    step's loss. ``momentum`` is the weight on the *old* value (Adam's :math:`\beta`; 0.95 is
    common for per-batch losses), unlike :class:`torch.nn.BatchNorm1d`, whose momentum weighs
    the new one.

    **What this balances, and what it does not.** Dividing by the loss value divides the
    *gradient* by the loss value. Gradient norms w.r.t. each task's predictions become equal
    under ``"sqrt"`` only when the tasks' per-element gradient magnitudes are equal and their
    running means are equal. A Huber loss in its linear regime has per-element gradients capped
    at ``delta`` however large the loss is, so dividing it by a large running mean shrinks its
    gradient further: on the pointer/countdown problem this normalizer trains the large-loss
    head *less* than a plain sum does. To balance what each task actually sends into shared
    layers, measure it: see :class:`balanced_losses.GradientBalancer` and
    :mod:`balanced_losses.diagnostics`.

    **Gradient accumulation.** With ``accumulation_steps=n`` the statistics take one update
    per window of ``n`` training-mode calls, from the mean of the window's losses (the
    full-batch loss, for equal micro-batches), so the running mean moves exactly as it would
    with one step on the full batch. Each call is weighted with the committed statistics plus
    the window's mean so far; the last micro-batch of a window is weighted exactly as the full
    batch would be, the earlier ones with the part of the window seen so far (a weight that
    depends on the current loss cannot be known before the whole batch is seen). With the
    default ``n=1`` every call is one step: accumulating ``n`` micro-batches then gives the
    statistics ``n`` updates per optimizer step, of noisier losses.

    Statistics update only in training mode with gradients enabled (see
    :class:`~balanced_losses.Weighting`); otherwise the stored statistics are used;
    a task never seen in training is normalized by its current value.
    A non-finite loss never enters the statistics (see :class:`~balanced_losses.Weighting`).

    Args:
        tasks: Task names, in order. A mapping from task name to output size is accepted
            here too, as ``output_sizes`` with the tasks in its order (the form of earlier
            releases).
        output_sizes: Task name to the number of elements per sample its loss is averaged over,
            e.g. ``{"pointer": 2, "countdown": 105}``, for the ``correction``; None: equal
            sizes, no correction.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        momentum: EMA weight on the previous statistic, in ``[0, 1)``; 0 normalizes every step
            by its own value.
        correction: ``"none"``, ``"sqrt"`` or ``"linear"``.
        eps: Lower bound on :math:`|\hat m_k|` that keeps tiny losses from dividing by zero.
        accumulation_steps: Number of micro-batches (forward calls in training mode) that make
            one optimizer step under gradient accumulation. See "Gradient accumulation" above.
        allow_missing: Accept mappings without some tasks (see :class:`Weighting`).
        check_inputs: Raise ``ValueError`` on non-finite or negative losses (syncs).
        sync_dist: Average statistics across ranks under ``torch.distributed``.

    Example:
        >>> import torch
        >>> sizes = {"pointer": 2, "countdown": 98}
        >>> normalizer = LossNormalizer(["pointer", "countdown"], output_sizes=sizes)
        >>> losses = {"pointer": torch.tensor(0.2), "countdown": torch.tensor(15.7)}
        >>> normalizer(losses)
        tensor(2.0000)
        >>> normalizer.last_weights
        tensor([1.2500, 0.1115])
    """

    ema: Tensor
    count: Tensor
    pending_sum: Tensor
    pending_count: Tensor
    micro_step: Tensor
    factors: Tensor
    _cancels_factors = True

    def __init__(
        self,
        tasks: Sequence[str] | Mapping[str, int] | None = None,
        *,
        output_sizes: Mapping[str, int] | None = None,
        weights: Mapping[str, float] | None = None,
        momentum: float = 0.9,
        correction: Correction = "sqrt",
        eps: float = 1e-8,
        accumulation_steps: int = 1,
        allow_missing: bool = False,
        check_inputs: bool = False,
        sync_dist: bool = True,
    ) -> None:
        if isinstance(tasks, Mapping):
            # The mapping of sizes given first, as releases before 0.2 took it.
            if output_sizes is not None:
                raise TypeError(
                    "give the output sizes once: `tasks` is already a mapping of sizes, got "
                    f"`output_sizes={dict(output_sizes)}` too"
                )
            output_sizes = tasks
            tasks = list(output_sizes)
        if tasks is None:
            if output_sizes is None:
                raise TypeError("`LossNormalizer` needs `tasks` (a list of task names)")
            tasks = list(output_sizes)
        names = check_task_names(tasks)
        if output_sizes is not None:
            if list(output_sizes) != list(names):
                raise KeyError(
                    f"`output_sizes` must name exactly the tasks {list(names)}, in that order, "
                    f"got {list(output_sizes)}"
                )
            sizes: dict[str, int] | None = dict(output_sizes)
            factors = reduction_factors(output_sizes, correction)
        else:
            # No sizes: every loss counts as a mean over equally many elements, no correction.
            sizes = None
            factors = dict.fromkeys(names, 1.0)
        super().__init__(
            factors,
            weights=weights,
            allow_missing=allow_missing,
            check_inputs=check_inputs,
            sync_dist=sync_dist,
        )
        self.output_sizes = sizes
        self.momentum = check_momentum(momentum)
        self.correction = correction
        self.eps = check_number("eps", eps, low=0.0, strict=True)
        if isinstance(accumulation_steps, bool) or not (
            isinstance(accumulation_steps, int) and accumulation_steps >= 1
        ):
            raise ValueError(
                f"`accumulation_steps` must be an integer >= 1, got {accumulation_steps!r}"
            )
        self.accumulation_steps = accumulation_steps
        k = len(self.tasks)
        self._add_state("ema", torch.zeros(k))
        self._add_state("count", torch.zeros(k, dtype=torch.long))
        # The partly accumulated window of micro-batches, saved so a resume mid-window is exact.
        self._add_state("pending_sum", torch.zeros(k))
        self._add_state("pending_count", torch.zeros(k, dtype=torch.long))
        self._add_state("micro_step", torch.zeros((), dtype=torch.long), task_axis=None)
        # Constants derived from the constructor's arguments: rebuilt, never loaded.
        factor_list = [factors[t] for t in self.tasks]
        self._add_state("factors", torch.tensor(factor_list), kind="constant")

    @property
    def running_mean(self) -> Tensor:
        r"""Bias-corrected running mean :math:`\hat m_k` per task, NaN where none was seen."""
        return debiased(self.ema, self.count, self.momentum)

    @torch.no_grad()
    def _update(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Fold this call's losses into the window; commit the window once it is complete.

        Returns the statistics that this call's weights use: the committed ones with the
        window's mean so far folded in, so the last micro-batch of a window is weighted exactly
        as one step on the full batch would be.
        """
        mean, valid = self._stats_input(values, present)
        self.pending_sum.add_(mean.to(self.ema.dtype))
        self.pending_count.add_(valid.to(self.pending_count.dtype))
        self.micro_step.add_(1)
        seen = self.pending_count > 0
        window_mean = self.pending_sum / self.pending_count.clamp_min(1).to(self.ema.dtype)
        ema, count = ema_step(self.ema, self.count, window_mean, seen, self.momentum)
        # Tensor-valued condition, so no host sync: commit when the window is full.
        commit = self.micro_step >= self.accumulation_steps
        self.ema.copy_(torch.where(commit, ema, self.ema))
        self.count.copy_(torch.where(commit, count, self.count))
        keep = (~commit).to(self.ema.dtype)
        self.pending_sum.mul_(keep)
        self.pending_count.mul_(keep.to(self.pending_count.dtype))
        self.micro_step.mul_(keep.to(self.micro_step.dtype))
        return ema, count

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        r"""The normalized total :math:`\sum_k c_k L_k / \hat m_k` and its weights."""
        if self._updating:
            ema, count = self._update(values, present)
        else:
            ema, count = self.ema, self.count
        # The running mean is a measurement, not a function to differentiate: dividing by a
        # detached statistic rescales the gradient of L_k instead of cancelling it.
        current = values.detach().to(ema.dtype).abs()
        scale = torch.where(count > 0, debiased(ema, count, self.momentum).abs(), current)
        weights = self.factors / scale.clamp_min(self.eps)
        weights = torch.where(present, weights, torch.zeros_like(weights))
        return (weights.to(values.dtype) * values).sum(), weights

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        # Version 2 added the gradient-accumulation window (pending_sum, pending_count,
        # micro_step).
        if version < 2:
            # Version 1 checkpoints predate accumulation windows: start with an empty window.
            k = len(self.tasks)
            state_dict.setdefault(prefix + "pending_sum", torch.zeros(k))
            state_dict.setdefault(prefix + "pending_count", torch.zeros(k, dtype=torch.long))
            state_dict.setdefault(prefix + "micro_step", torch.zeros((), dtype=torch.long))

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return (
            f"tasks={list(self.tasks)}"
            + ("" if self.output_sizes is None else f", output_sizes={self.output_sizes}")
            + f", momentum={self.momentum}, "
            f"correction={self.correction!r}, eps={self.eps}"
            + (
                ""
                if self.accumulation_steps == 1
                else f", accumulation_steps={self.accumulation_steps}"
            )
        )
