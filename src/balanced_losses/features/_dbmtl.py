"""DBMTL: Dual-Balancing Multi-Task Learning (Lin et al. 2023), both halves."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from balanced_losses._base import Weighting
from balanced_losses._checks import check_number
from balanced_losses._numerics import grad_shares
from balanced_losses.features._attach import Attachment, ModuleRef
from balanced_losses.features._gradient_balancer import GradientBalancer

__all__ = ["DBMTL"]


class _GradientHalf(GradientBalancer):
    """DB-MTL's gradient-magnitude half: a :class:`GradientBalancer` whose warnings name DBMTL.

    Composition: :class:`DBMTL` holds one as ``balancer`` and routes :meth:`DBMTL.branch` and
    :meth:`DBMTL.attach` to it; the user meets DBMTL only, so the half speaks as DBMTL.
    """

    _display_name = "DBMTL"


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

    **The other half: gradient magnitudes.** DB-MTL also rescales each task's gradient on the
    shared representation to the largest task's gradient norm, smoothed by a moving average.
    This module holds that half as a :class:`balanced_losses.GradientBalancer` with
    ``target="max"`` and ``momentum`` (attribute ``balancer``; its statistics are in this
    module's ``state_dict``). Route the shared features through :meth:`branch` to use it::

        dbmtl = DBMTL(["pointer", "countdown"])
        views = dbmtl.branch(model.encoder(x))      # as with GradientBalancer
        loss = dbmtl({"pointer": head_p(views["pointer"]), ...})
        loss.backward()  # log-losses, each task's feature gradient scaled to the largest

    A training step without :meth:`branch` warns (the gradient half would silently do
    nothing). For a model without shared features to branch, pass ``balance_features=False``:
    then only the log transform applies, :meth:`branch` returns the features unchanged and
    nothing warns.

    **Where this differs from the authors' code** (LibMTL's ``DB_MTL``): there, each task's
    gradient *vector* on the shared parameters is averaged over steps (momentum
    :math:`\beta / t^{\beta_\sigma}`) and the averaged vectors are scaled to the largest norm.
    Here the current gradient at the shared *features* is scaled by the ratio of EMAs of the
    norms, in the one backward pass, with no per-task backward and no stored gradient vectors.
    The balance of magnitudes is the same; the smoothing of directions is not.

    **Input domain.** Losses must be positive: :math:`\log(L_k + \epsilon)` is NaN below
    :math:`-\epsilon`, and its gradient :math:`1/\epsilon` explodes at 0. ``check_inputs=True``
    raises ``ValueError`` naming the task and the value on a loss :math:`\le 0`. Without it, a
    loss :math:`\le -\epsilon` makes the step's total and that task's gradient NaN (visible,
    as a plain sum of a NaN loss would be), and that task's gradient statistics stay untouched.

    Args:
        tasks: Task names, in order.
        eps: :math:`\epsilon \ge 0` added inside the logarithm.
        momentum: EMA momentum of the gradient-norm statistics of the gradient half.
        balance_features: Keep the gradient half (default). False: the log transform only.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks; an absent task adds nothing.
        check_inputs: Raise ``ValueError`` on non-finite or non-positive losses (syncs).
        sync_dist: Average the gradient half's norm statistics across ranks under
            ``torch.distributed``.

    Example:
        >>> import torch
        >>> dbmtl = DBMTL(["depth", "segmentation"], eps=0.0, balance_features=False)
        >>> total = dbmtl({"depth": torch.tensor(4.0), "segmentation": torch.tensor(0.25)})
        >>> total  # log 4 + log 0.25
        tensor(0.)
        >>> dbmtl.last_weights  # 1 / L_k
        tensor([0.2500, 4.0000])

    References:
        Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Kwok. Dual-Balancing for Multi-Task Learning.
        arXiv:2308.12029, 2023.
    """

    _loss_domain: str | None = "positive"
    _cancels_factors = True

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        eps: float = 1e-8,
        momentum: float = 0.9,
        balance_features: bool = True,
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
        self.eps = check_number("eps", eps, low=0.0, strict=False)
        self.balancer = _GradientHalf(
            self.tasks,
            target="max",
            momentum=momentum,
            # The user's factors act in the balancer: after it has measured the gradients.
            weights=weights,
            # This module's own _stack already enforces `allow_missing`.
            allow_missing=True,
            sync_dist=sync_dist,
        )
        self.balance_features = bool(balance_features)

    @property
    def _attachments(self) -> list[Attachment]:
        # The gradient half does the balancing: it owns the attachments.
        return self.balancer._attachments

    def _logged_per_task(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        if not self.balance_features:
            return {}
        half = self.balancer
        return {"grad_share": grad_shares(half.last_weights, half.grad_norms, device, dtype)}

    def attach(
        self,
        model: nn.Module,
        trunk: ModuleRef,
        heads: Mapping[str, ModuleRef | Sequence[ModuleRef]] | None = None,
    ) -> Attachment:
        """Balance at ``model``'s shared features through hooks, its ``forward`` unchanged.

        See :meth:`~balanced_losses.GradientBalancer.attach`.
        """
        if not self.balance_features:
            raise ValueError(
                "DBMTL(balance_features=False) is the log transform alone: it has no gradient "
                "half to attach"
            )
        # The gradient half does the balancing: it owns the attachment.
        return Attachment(self.balancer, model, trunk, heads)

    def branch(self, feats: Any) -> dict[str, Any]:
        """One view of the shared ``feats`` per task; see :meth:`GradientBalancer.branch`."""
        if not self.balance_features:
            return dict.fromkeys(self.tasks, feats)
        return self.balancer.branch(feats)

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        # Version 2 added the gradient-magnitude half (the `balancer` submodule's statistics).
        if version < 2:
            # Version 1 had no gradient half: start its statistics empty.
            k = len(self.tasks)
            state_dict.setdefault(prefix + "balancer.ema", torch.zeros(k))
            state_dict.setdefault(prefix + "balancer.count", torch.zeros(k, dtype=torch.long))

    def transform(self, losses: Mapping[str, Tensor | None]) -> dict[str, Tensor]:
        r"""Return :math:`\log(L_k + \epsilon)` per present task, differentiable.

        The same checks as :meth:`forward` apply; absent tasks are left out of the result.
        """
        values, _ = self._stack(losses)
        logs = torch.log(values + self.eps)
        return {name: logs[i] for i, name in enumerate(self.tasks) if losses.get(name) is not None}

    def forward(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        r"""Return :math:`\sum_k \log(L_k + \epsilon)` over ``losses``."""
        # With the gradient half, the balancer applies the user's factors (to the log terms).
        values, present = self._stack(losses, scale_gradients=not self.balance_features)
        shifted = values + self.eps
        ones = torch.ones_like(shifted)
        # Lin et al. 2023's log transform; its gradient is grad L_k / (L_k + eps).
        logs = torch.log(torch.where(present & (shifted > 0), shifted, ones))
        # No logarithm at L_k <= -eps: that task's term *and its gradient* are NaN, visible as a
        # NaN loss in a plain sum would be (the gradient statistics reject the NaN norm). The
        # square root of a negative number is NaN with a NaN derivative; elsewhere it is
        # sqrt(1) with a zero upstream gradient, so the other tasks' gradients stay finite.
        bad = present & (shifted <= 0)
        logs = torch.where(bad, torch.sqrt(torch.where(bad, shifted - 1.0, ones)), logs)
        # d total / d L_k = 1 / (L_k + eps). Logged, not differentiated: cut the graph.
        self._record(1.0 / torch.where(present, shifted.detach(), ones), present)
        if not self.balance_features:
            return self._returned(logs.sum())
        # The balancer's forward is the plain sum; it also learns which tasks are present, so
        # that only those are expected to send a gradient through `branch`.
        total: Tensor = self.balancer(
            {n: logs[i] for i, n in enumerate(self.tasks) if losses.get(n) is not None}
        )
        return self._returned(total)

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        shown = f"tasks={list(self.tasks)}, eps={self.eps}, momentum={self.balancer.momentum}"
        return shown if self.balance_features else shown + ", balance_features=False"
