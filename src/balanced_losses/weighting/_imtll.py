"""IMTL-L: the loss-balancing half of Impartial Multi-Task Learning (Liu et al. 2021)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor, nn

from balanced_losses._base import Weighting
from balanced_losses._checks import check_number

__all__ = ["IMTLL"]


class IMTLL(Weighting):
    r"""IMTL-L: learned scales :math:`e^{s_k}` that drive every scaled loss towards 1.

    .. math::
        \text{total} = \sum_k \left(e^{s_k} L_k - s_k\right)

    (the loss balance, IMTL-L, of Liu et al. 2021). The model descends on the total; the scales
    :math:`s_k` are learned jointly with it by the same optimizer. The :math:`-s_k` term keeps
    :math:`s_k` from going to :math:`-\infty`: for fixed :math:`L_k` the total is smallest at
    :math:`e^{s_k} L_k = 1`, so the effective weight :math:`e^{s_k}` tends to :math:`1/L_k`.
    That is the same division of each loss by its own value as
    :class:`~balanced_losses.LossNormalizer`, reached by gradient descent, and it is
    :class:`~balanced_losses.UncertaintyWeighting` (Kendall) up to a factor 2 and the sign of
    the parameter: :math:`\text{total}_{\text{IMTL-L}}(s) = 2\,\text{total}_{\text{UW}}(-s)`.

    Register the module's parameters with the optimizer (``model.parameters()`` plus
    ``weighting.parameters()``). :math:`s_k` starts at ``init`` (0: the plain sum).

    **Input domain.** The paper balances positive losses; with :math:`L_k = 0` the minimum in
    :math:`s_k` does not exist and :math:`s_k` grows without bound. ``check_inputs=True``
    rejects negative losses.

    Args:
        tasks: Task names, in order.
        init: Initial value of every :math:`s_k`.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks; an absent task adds neither its
            scaled loss nor :math:`-s_k`, so its scale gets no gradient that step.
        check_inputs: Raise ``ValueError`` on non-finite or negative losses (syncs).

    Example:
        >>> import torch
        >>> imtl = IMTLL(["depth", "segmentation"])
        >>> losses = {"depth": torch.tensor(2.0), "segmentation": torch.tensor(0.5)}
        >>> imtl(losses)  # s = 0: the plain sum
        tensor(2.5000, grad_fn=<SumBackward0>)
        >>> with torch.no_grad():
        ...     _ = imtl.log_scales.copy_(torch.tensor([-0.5, 0.5]))
        >>> total = imtl(losses)
        >>> imtl.last_weights  # e^s
        tensor([0.6065, 1.6487])

    References:
        Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang. Towards Impartial Multi-task Learning.
        ICLR 2021.
    """

    # The method is invariant to a constant factor of a loss (see Weighting._check_factors).
    _cancels_factors = True

    log_scales: nn.Parameter

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        init: float = 0.0,
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        check_inputs: bool = False,
    ) -> None:
        super().__init__(
            tasks, weights=weights, allow_missing=allow_missing, check_inputs=check_inputs
        )
        self.init = check_number("init", init, low=-float("inf"), strict=True)
        self._add_parameter(
            "log_scales", torch.full((len(self.tasks),), self.init, dtype=torch.float64)
        )

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        r"""The IMTL-L total :math:`\sum_k (e^{s_k} L_k - s_k)` and the weights :math:`e^{s_k}`."""
        s = self.log_scales.to(values.dtype)
        scales = torch.exp(s)
        # IMTL-L of Liu et al. 2021: e^s L - s; the -s term stops s from drifting to -inf.
        terms = scales * values - s
        return torch.where(present, terms, torch.zeros_like(terms)).sum(), scales

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self.tasks)}, init={self.init}"
