"""GeometricMean: the geometric loss strategy, GLS (Chennupati et al. 2019)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from balanced_losses._base import Weighting

__all__ = ["GeometricMean"]


class GeometricMean(Weighting):
    r"""Geometric loss strategy (GLS): the total is the geometric mean of the losses.

    .. math::
        \text{total} = \Big(\prod_{k=1}^{K} L_k\Big)^{1/K}
        = \exp\Big(\frac1K \sum_k \log L_k\Big),\qquad
        w_k = \frac{\partial\,\text{total}}{\partial L_k} = \frac{\text{total}}{K\, L_k}

    (the geometric loss strategy of Chennupati et al. 2019). The effective weight of a task is
    inversely proportional to its loss, so rescaling one loss by a constant rescales the total
    by a constant and leaves the balance unchanged: no task dominates by the size of its units.
    It has no state and no hyperparameter.

    **Input domain.** Every loss must be positive: the method takes :math:`\log L_k`, and a
    zero loss would make every weight 0 or NaN. ``check_inputs=True`` raises ``ValueError``
    naming the task on a loss :math:`\le 0`.

    Args:
        tasks: Task names, in order.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks; the geometric mean is then taken
            over the present tasks (:math:`K` is their number), and is 0 if none is present.
        check_inputs: Raise ``ValueError`` on non-finite or non-positive losses (syncs).

    Example:
        >>> import torch
        >>> gls = GeometricMean(["depth", "segmentation"])
        >>> gls({"depth": torch.tensor(8.0), "segmentation": torch.tensor(0.5)})
        tensor(2.)
        >>> gls.last_weights  # total / (K L_k)
        tensor([0.1250, 2.0000])

    References:
        Chennupati, Sistu, Yogamani, Rawashdeh. MultiNet++: Multi-Stream Feature Aggregation
        and Geometric Loss Strategy for Multi-Task Learning. CVPR Workshops 2019.
    """

    # The method is invariant to a constant factor of a loss (see Weighting._check_factors).
    _cancels_factors = True

    _loss_domain: str | None = "positive"

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        check_inputs: bool = False,
    ) -> None:
        super().__init__(
            tasks, weights=weights, allow_missing=allow_missing, check_inputs=check_inputs
        )

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        r"""The geometric mean of the present losses and the weights :math:`\text{total} / (K L_k)`.

        Not a weighted sum: the total is :math:`(\prod_k L_k)^{1/K}` over the present tasks.
        """
        count = present.sum().to(values.dtype)
        # In log space: exp(mean log L) neither overflows nor underflows where the product of
        # K losses would.
        ones = torch.ones_like(values)
        # A zero loss would give log 0 = -inf and a NaN gradient (0 * inf): floor at the
        # smallest normal number of the dtype, so the total is 0 and the gradient finite.
        tiny = torch.finfo(values.dtype).tiny
        logs = torch.log(torch.where(present, values.clamp_min(tiny), ones))
        mean_log = logs.sum() / count.clamp_min(1.0)
        total = torch.where(count > 0, torch.exp(mean_log), torch.zeros_like(mean_log))
        # d total / d L_k = total / (K L_k). Logged, not differentiated: cut the graph.
        detached = torch.where(present, values.detach().clamp_min(tiny), ones)
        return total, total.detach() / (count.clamp_min(1.0) * detached)
