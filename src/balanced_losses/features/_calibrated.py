"""CalibratedBalancer: measure the gradients at the shared features, then fix the weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from balanced_losses._autograd import scale_gradient
from balanced_losses._calibration import FreezeAfterCalibration
from balanced_losses._checks import check_count
from balanced_losses.features._gradient_balancer import GradientBalancer

__all__ = ["CalibratedBalancer"]


class CalibratedBalancer(FreezeAfterCalibration, GradientBalancer):
    r"""Balance the tasks' gradients at the shared features for a while, then freeze the weights.

    For the first ``steps`` training steps this is a :class:`GradientBalancer`: each task's
    gradient where it enters the shared features is rescaled to the mean of the tasks' norms,
    inside the one backward pass, with norms averaged over the steps so far (an EMA of momentum
    :math:`1 - 1/\text{steps}`, bias-corrected). Then the multipliers it reached,

    .. math::
        s_k = \frac{\operatorname{mean}_j \hat n_j}{\hat n_k},

    are frozen, and every later step trains on the fixed weighted sum
    :math:`\sum_k w_k s_k L_k`: a plain loss weighting, with nothing measured and no
    autograd node at the features (:meth:`branch` and :meth:`attach` then route nothing). The
    returned total keeps the value of the plain sum :math:`\sum_k L_k` throughout (the weights
    act on its gradient, which is the weighted sum's), so a logged total does not jump at the
    freeze.

    **When to use it.** As the default: it corrects the imbalance that the losses' reductions,
    regimes and scales put into the gradients at the shared layers (a mean over 2 outputs next
    to one over 105, a Huber loss in its linear regime, a cross-entropy next to an MSE of
    0.01), measured on your model rather than assumed; and once frozen, nothing that happens
    later in training (a task's gradient shrinking because it is learned, a batch whose loss
    happens to be small) can move the weights. Where the tasks' gradients are within a factor
    of about two at the start, it stays close to a plain sum. ``docs/choosing.md`` has the
    measurements behind the default and its failure modes.

    **What it cannot do.** The weights are those of the first ``steps`` steps: if the balance
    between the tasks changes a lot later, a continuing balancer (:class:`GradientBalancer`)
    follows it. Like every loss weighting after the calibration, the weights scale the heads'
    gradients too (which Adam's per-parameter scaling absorbs).

    **Checkpoints.** The training steps counted, the norms and the frozen multipliers are in the
    ``state_dict``: a run resumed after the calibration keeps its weights; one resumed during
    it continues calibrating where it stopped. :meth:`reset_running_stats` starts a new
    calibration.

    Logging: :attr:`last_weights` holds the multipliers of the last step (the frozen ones after
    the calibration) and :attr:`grad_norms` the norms measured in the last calibration step.

    Args:
        tasks: Task names, in order.
        steps: Training steps to calibrate over (each backward pass through :meth:`branch` or an
            attachment counts one).
        weights: Your fixed factor per task (default 1), applied on top: task :math:`k`'s
            gradient is scaled to :math:`w_k` times the common norm.
        eps: Lower bound on :math:`\hat n_k` in the division.
        allow_missing: Accept loss mappings without some tasks (see :class:`Weighting`).
        sync_dist: Average the measured norms across ranks under ``torch.distributed``, so that
            every rank freezes the same weights.

    Example:
        >>> import torch
        >>> trunk = torch.nn.Linear(3, 4)
        >>> head_a, head_b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 105)
        >>> balancer = CalibratedBalancer(["a", "b"], steps=2)
        >>> for _ in range(3):
        ...     views = balancer.branch(trunk(torch.randn(8, 3)))
        ...     loss_a = head_a(views["a"]).square().mean()
        ...     loss_b = head_b(views["b"]).square().sum()  # a sum: a far larger gradient
        ...     balancer({"a": loss_a, "b": loss_b}).backward()
        >>> balancer.frozen  # two steps measured, the third trained with fixed weights
        True
        >>> s = balancer.frozen_weights
        >>> bool(s[0] > 1 > s[1])  # task a's small gradient lifted, task b's lowered
        True
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        steps: int = 100,
        weights: Mapping[str, float] | None = None,
        eps: float = 1e-12,
        allow_missing: bool = False,
        sync_dist: bool = True,
    ) -> None:
        # An EMA of momentum 1 - 1/steps, bias-corrected, weighs the calibration steps nearly
        # alike (with steps = 1, the one step's norms).
        super().__init__(
            tasks,
            momentum=1.0 - 1.0 / check_count("steps", steps),
            weights=weights,
            eps=eps,
            allow_missing=allow_missing,
            sync_dist=sync_dist,
        )
        self._declare_calibration(steps)

    def multipliers(self) -> Tensor:
        r"""The factors :math:`w_k s_k` applied now: the frozen ones after the calibration."""
        return self._fixed_weights * self.frozen_scale if self._frozen else super().multipliers()

    def branch(self, feats: Any) -> dict[str, Any]:
        """One view of ``feats`` per task while calibrating; ``feats`` itself once frozen."""
        self._freeze_if_calibrated()
        if self._frozen:
            return dict.fromkeys(self.tasks, feats)
        return super().branch(feats)

    def forward(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        r"""Return the total: the plain sum's value, with the balanced gradient.

        While calibrating the balancing acts in backward at the features; once frozen the
        gradient of the total is that of :math:`\sum_k w_k s_k L_k`.
        """
        self._freeze_if_calibrated()
        self._count_step()
        if not self._frozen:
            return super().forward(losses)
        values, present = self._stack(losses)
        scale = self.frozen_scale.to(values.device)
        self._record(scale, present)
        # The fixed weights act on the gradients only: the value stays the plain sum, as while
        # calibrating (a logged total does not jump at the freeze), and a large weight on a
        # large loss cannot overflow it.
        return self._returned(scale_gradient(values, scale.to(values.dtype)).sum())

    def _logged_per_task(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        # Once frozen nothing is measured at the features: no gradient shares to log.
        return {} if self._frozen else super()._logged_per_task(device, dtype)

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self.tasks)}, steps={self.steps}, eps={self.eps}"
