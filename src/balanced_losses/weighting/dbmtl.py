"""DBMTL: the loss-scale half of Dual-Balancing Multi-Task Learning (Lin et al. 2023)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from balanced_losses.weighting._checks import check_number, check_tasks
from balanced_losses.weighting.base import Weighting

__all__ = ["DBMTL"]


class DBMTL(Weighting):
    r"""DB-MTL's loss-scale balancing: sum the logarithms of the losses.

    .. math::
        \text{total} = \sum_k \log(L_k + \epsilon),\qquad
        w_k = \frac{\partial\,\text{total}}{\partial L_k} = \frac{1}{L_k + \epsilon}

    (Lin et al. 2023, loss-scale balancing by a logarithm transform of each task loss;
    :math:`\epsilon = 10^{-8}` as in the authors' code in LibMTL). Each task's gradient is divided
    by its own loss value, with no state and no lag: the same balance a
    :class:`~balanced_losses.LossNormalizer` with ``momentum=0`` gives, and the optimum
    IMTL-L (:class:`IMTLL`) converges to. The total is negative when the losses are below 1,
    which is expected: only its gradient matters.

    **The other half.** DB-MTL also rescales each task's gradient on the shared parameters to
    the largest task's gradient norm, smoothed by a moving average. That half is
    :class:`balanced_losses.GradientBalancer` with ``target="max"`` and ``momentum=beta``;
    use both by feeding it the log-transformed losses from :meth:`transform`::

        dbmtl = DBMTL(tasks)
        balancer = GradientBalancer(tasks, target="max", momentum=beta)
        log_losses = dbmtl.transform(losses)  # task name -> log(L_k + eps)
        # ... and give `log_losses` to `balancer` as its per-task losses.

    The authors' code smooths with a momentum that decays with the step, :math:`\beta /
    t^{\beta_\sigma}`; a constant ``momentum`` is the :math:`\beta_\sigma = 0` case.

    **Input domain.** Losses must be positive; ``check_inputs=True`` raises ``ValueError``
    naming the task on a loss :math:`\le 0`.

    Args:
        tasks: Task names, in order.
        eps: :math:`\epsilon \ge 0` added inside the logarithm.
        allow_missing: Accept mappings without some tasks; an absent task adds nothing.
        check_inputs: Raise ``ValueError`` on non-finite or non-positive losses (syncs).
        sync_dist: Accepted for a uniform interface; this module keeps no statistics.

    Example:
        >>> import torch
        >>> dbmtl = DBMTL(["depth", "segmentation"], eps=0.0)
        >>> total = dbmtl({"depth": torch.tensor(4.0), "segmentation": torch.tensor(0.25)})
        >>> total  # log 4 + log 0.25
        tensor(0.)
        >>> {task: w.item() for task, w in dbmtl.weights.items()}  # 1 / L_k
        {'depth': 0.25, 'segmentation': 4.0}

    References:
        Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok. Dual-Balancing for Multi-Task Learning.
        arXiv:2308.12029, 2023.
    """

    _version = 1
    _loss_domain: str | None = "positive"

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        eps: float = 1e-8,
        allow_missing: bool = False,
        check_inputs: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(
            check_tasks(tasks),
            allow_missing=allow_missing,
            check_inputs=check_inputs,
            sync_dist=sync_dist,
        )
        self.eps = check_number("eps", eps, low=0.0, strict=False)

    def transform(self, losses: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
        r"""Return :math:`\log(L_k + \epsilon)` per present task, differentiable.

        The same checks as :meth:`forward` apply; absent tasks are left out of the result.
        """
        values, _ = self._stack(losses)
        logs = torch.log(values + self.eps)
        return {name: logs[i] for i, name in enumerate(self.tasks) if losses.get(name) is not None}

    def forward(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        r"""Return :math:`\sum_k \log(L_k + \epsilon)` over ``losses``."""
        values, present = self._stack(losses)
        shifted = values + self.eps
        ones = torch.ones_like(shifted)
        # Lin et al. 2023's log transform; its gradient is grad L_k / (L_k + eps).
        logs = torch.log(torch.where(present, shifted, ones))
        # d total / d L_k = 1 / (L_k + eps). Logged, not differentiated: cut the graph.
        self._record(1.0 / torch.where(present, shifted.detach(), ones), present)
        return logs.sum()

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self.tasks)}, eps={self.eps}"
