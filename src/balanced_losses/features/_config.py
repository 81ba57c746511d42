"""ConFIG (Liu et al. 2025): the conflict-free direction, equally aligned with every task."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from balanced_losses.features._eigh import at_least_float32, check_gramian, pinv_psd
from balanced_losses.features._gramian import GramianWeighting

__all__ = ["ConFIG", "config_weights"]


def config_weights(gramian: Tensor, *, sweeps: int | None = None) -> Tensor:
    r"""ConFIG weights: one cosine with every task's gradient, the projections' sum as length.

    With unit gradients :math:`u_k = g_k / \lVert g_k \rVert` (rows of :math:`U`), ConFIG (Liu
    et al. 2025, Eq. 2) takes the least-norm :math:`d` with :math:`U d = \mathbf 1`,
    :math:`d = U^+ \mathbf 1`, and returns :math:`(\sum_k g_k^\top \hat d)\, \hat d` with
    :math:`\hat d = d / \lVert d \rVert`. In Gramian form, with :math:`D = \operatorname{diag}
    (\lVert g_k \rVert)` and :math:`N = D^{-1} G D^{-1}` the unit vectors' Gramian,
    :math:`d = J^\top a` for

    .. math::
        a = D^{-1} N^+ \mathbf 1,\qquad
        w = a\, \frac{\mathbf 1^\top G a}{a^\top G a},

    since :math:`U^+ = U^\top (U U^\top)^+`, :math:`\lVert d \rVert^2 = a^\top G a` and
    :math:`\sum_k g_k^\top d = \mathbf 1^\top G a`. A zero gradient has no direction: its row
    of :math:`U` is 0 (as in the authors' code and TorchJD's ``ConFIG``) and it gets weight 0.
    The pseudo-inverse is the sync-free Jacobi one (``torch.linalg.pinv``'s cutoff), so
    duplicate and linearly dependent gradients are handled; where :math:`d = 0` the weights
    are 0. The weights are invariant to scaling :math:`G` by :math:`s > 0` (the aggregate
    scales as the gradients do).

    Args:
        gramian: :math:`G = J J^\top`, ``(K, K)``, symmetric PSD.
        sweeps: Jacobi sweeps; ``None`` takes ``3 + ceil(2 log2 K)``.

    Returns:
        ``(K,)`` weights in the Gramian's dtype (computed in at least float32).

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [-0.5, 2.0]], dtype=torch.float64)
        >>> d = config_weights(jac @ jac.T) @ jac
        >>> units = jac / jac.norm(dim=1, keepdim=True)
        >>> units @ d / d.norm()  # the same cosine with every task's gradient
        tensor([0.6154, 0.6154], dtype=torch.float64)

    References:
        Liu, Chu, Thuerey. ConFIG: Towards Conflict-free Training of Physics Informed Neural
        Networks. ICLR 2025.
    """
    check_gramian(gramian)
    g = gramian.to(at_least_float32(gramian))
    norms = g.diagonal().clamp(min=0).sqrt()
    positive = norms > 0
    inverse = torch.where(positive, 1 / torch.where(positive, norms, 1.0), 0.0)
    unit_gramian = g * inverse[:, None] * inverse[None, :]
    a = inverse * (pinv_psd(unit_gramian, sweeps) @ torch.ones_like(norms))
    ga = g @ a
    squared = (a * ga).sum()
    length = ga.sum()
    # d = 0 (no gradient, or unit vectors whose pseudo-inverse sends 1 to 0): weights 0.
    tiny = torch.finfo(g.dtype).tiny
    usable = squared > tiny
    weights = torch.where(usable, a * (length / torch.where(usable, squared, 1.0)), 0.0)
    return weights.to(gramian.dtype)


class ConFIG(GramianWeighting):
    r"""ConFIG: the update direction equally aligned with every task's gradient.

    .. math::
        \hat d:\ \cos(\hat d, g_k) \text{ equal for all } k,\qquad
        \text{update} = \Big(\sum_k g_k^\top \hat d\Big)\, \hat d

    (Liu et al. 2025, Eq. 2): the direction is conflict-free whenever a direction with a
    positive cosine to every gradient exists, and its length is what the gradients project on
    it, so the update shrinks where the tasks disagree. Use it when tasks conflict and every
    task should move at the same angle, whatever the sizes of the gradients: a constant factor
    of a loss changes the update's length, not its direction.

    It is :class:`~balanced_losses.GramianWeighting` with the rule
    :func:`~balanced_losses.aggregation.config_weights`, acting on each task's gradient at the
    shared features inside the one backward pass (route the features through :meth:`branch` or
    :meth:`attach`); the forward total is the plain sum of the losses.

    Args:
        tasks: Task names, in order.
        balance_norms: First scale each task's gradient to the mean of the tasks' EMA
            gradient norms, as :class:`~balanced_losses.GradientBalancer` does.
        momentum: EMA momentum of the norm statistics, with ``balance_norms``.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept loss mappings without some tasks; those are dropped from the
            problem for that step.
        sync_dist: Sum the Gramian over ranks under ``torch.distributed``.

    Example:
        >>> import torch
        >>> trunk = torch.nn.Linear(3, 4)
        >>> head_a, head_b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 105)
        >>> config = ConFIG(["a", "b"])
        >>> views = config.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().mean()
        >>> config({"a": loss_a, "b": loss_b}).backward()  # the plain sum; combined in backward
        >>> config.last_weights.shape
        torch.Size([2])

    References:
        Liu, Chu, Thuerey. ConFIG: Towards Conflict-free Training of Physics Informed Neural
        Networks. ICLR 2025.
    """

    _shows_rule = False

    # The direction uses unit gradients only: a constant factor of a loss changes the length.
    _cancels_factors = True

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        balance_norms: bool = False,
        momentum: float = 0.9,
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(
            tasks,
            config_weights,
            balance_norms=balance_norms,
            momentum=momentum,
            weights=weights,
            allow_missing=allow_missing,
            sync_dist=sync_dist,
        )
