"""LDC-MTL: learned weights that keep the tasks' normalized log-losses level (arXiv:2502.08585)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from balanced_losses._base import Weighting
from balanced_losses._checks import check_number, check_seed
from balanced_losses._numerics import wide_dtype

__all__ = ["LDCMTL"]


class LDCMTL(Weighting):
    r"""LDC-MTL: learned task weights with a penalty on the discrepancy between weighted losses.

    Each loss is first normalized by its value at the start of the epoch,
    :math:`\ell_k = \log(L_k / L_k^{0})`, and the total is

    .. math::
        \text{total} = \frac{\sum_k w_k \ell_k}{\operatorname{sg}(\sum_k w_k)}
            + \lambda \sum_{k=1}^{K-1} \bigl| w_k \ell_k - w_{k+1} \ell_{k+1} \bigr|,
        \qquad w_k = \sigma(\max(\theta_k, 0)),

    with :math:`\theta` learned by the model's optimizer in the same step (the single-level,
    penalized form of the paper's bilevel problem, which costs one backward pass whatever the
    number of tasks; :math:`\operatorname{sg}` stops the gradient). The penalty pulls the
    weighted normalized losses of neighbouring tasks together, so that no task's progress runs
    away from the others'. This follows the authors' QM9 code: :math:`\theta_k` starts uniform
    in :math:`[0.2, 1)`, :math:`L^{0}` is each loss at the first step of every epoch, the
    penalty runs over tasks adjacent in the given order, and :math:`\lambda = 0.05`.

    **When to use it.** A loss-level method of one backward pass that adapts its weights as
    training goes; the normalization by :math:`L^{0}` makes it blind to a constant factor of a
    loss (it cancels in the ratio).

    Register the module's parameters with the optimizer (``model.parameters()`` plus
    ``weighting.parameters()``), and call :meth:`epoch_end` at the end of every epoch (a loop
    that calls it for every method already does): it starts a new :math:`L^{0}`.

    **Input domain.** Losses must be positive (logarithms); ``check_inputs=True`` raises
    ``ValueError`` naming the task otherwise.

    Args:
        tasks: Task names, in order (the penalty pairs neighbours in this order).
        penalty: :math:`\lambda \ge 0`, the weight of the discrepancy penalty.
        seed: Seed of the initial :math:`\theta`.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks; an absent task is left out of the
            sums and of the pairs it belongs to, and takes its :math:`L^{0}` at its first loss
            of the epoch.
        check_inputs: Raise ``ValueError`` on non-finite or non-positive losses (syncs).
        sync_dist: Average the losses that become :math:`L^{0}` across ranks.

    Example:
        >>> import torch
        >>> ldc = LDCMTL(["depth", "segmentation"])
        >>> ldc({"depth": torch.tensor(2.0), "segmentation": torch.tensor(0.5)})  # sets L0
        tensor(0., grad_fn=<AddBackward0>)
        >>> total = ldc({"depth": torch.tensor(1.0), "segmentation": torch.tensor(0.5)})
        >>> bool(total < 0)  # depth halved: log(1/2) weighted, the penalty on the gap
        True

    References:
        LDC-MTL: Balancing Multi-Task Learning through Scalable Loss Discrepancy Control.
        arXiv:2502.08585, 2025; the authors' code: github.com/OptMN-Lab/LDC-MTL.
    """

    _cancels_factors = True
    _loss_domain: str | None = "positive"

    reference: Tensor
    has_reference: Tensor
    scores: nn.Parameter

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        penalty: float = 0.05,
        seed: int = 0,
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        check_inputs: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(
            tasks,
            weights=weights,
            allow_missing=allow_missing,
            check_inputs=check_inputs,
            sync_dist=sync_dist,
        )
        self.penalty = check_number("penalty", penalty, low=0.0, strict=False)
        self.seed = check_seed(seed)
        k = len(self.tasks)
        generator = torch.Generator().manual_seed(self.seed)
        initial = 0.2 + 0.8 * torch.rand(k, generator=generator, dtype=torch.float64)
        self._add_parameter("scores", initial)
        self._add_state("reference", torch.ones(k, dtype=torch.float64))
        self._add_state("has_reference", torch.zeros(k, dtype=torch.bool))

    @property
    def task_weights(self) -> Tensor:
        r"""The learned :math:`w = \sigma(\max(\theta, 0))`, ``(K,)``, detached."""
        return torch.sigmoid(F.relu(self.scores.detach()))

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """The normalized weighted log-losses plus the penalty on neighbours' discrepancy."""
        if self._updating:
            with torch.no_grad():
                mean, valid = self._stats_input(values, present)
                take = valid & ~self.has_reference
                new = torch.where(take, mean.to(self.reference.dtype), self.reference)
                self.reference.copy_(new)
                self.has_reference.copy_(self.has_reference | take)
        wide = wide_dtype(values.device)
        safe = torch.where(present, values, torch.ones_like(values))
        # A task with no reference yet (evaluation before any training step): its own loss.
        reference = torch.where(
            self.has_reference, self.reference.to(values.device, wide), safe.detach().to(wide)
        )
        log_ratio = torch.log(safe.to(wide)) - torch.log(reference)
        ell = torch.where(present, log_ratio, 0.0).to(values.dtype)
        w = torch.where(present, torch.sigmoid(F.relu(self.scores)).to(values.dtype), 0.0)
        norm = w.sum().detach().clamp_min(torch.finfo(values.dtype).tiny)
        weighted = w * ell
        pair = present[:-1] & present[1:]
        gap = weighted[:-1] - weighted[1:]
        total = weighted.sum() / norm + self.penalty * torch.where(pair, gap.abs(), 0.0).sum()
        # d total / d L_k: (w_k / norm + lambda w_k (s_{k,k+1} - s_{k-1,k})) / L_k, with s the
        # sign of each neighbours' gap (0 outside a pair and where the gap is 0, as abs's
        # gradient).
        sign = torch.where(pair, torch.sign(gap), 0.0).detach()
        zero = sign.new_zeros(1)
        slope = torch.cat([sign, zero]) - torch.cat([zero, sign])
        coefficient = w.detach() / norm + self.penalty * w.detach() * slope
        weights = torch.where(present, coefficient / safe.detach(), 0.0)
        return total, weights

    def epoch_end(self) -> None:
        """Take every task's next loss as its new :math:`L^{0}` (training mode only)."""
        if self.training:
            with torch.no_grad():
                self.has_reference.zero_()

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self.tasks)}, penalty={self.penalty}, seed={self.seed}"
