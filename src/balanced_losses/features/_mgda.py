"""MGDA-UB weights (Sener & Koltun 2018): the min-norm point of the task gradients' hull."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from balanced_losses._numerics import wide_dtype
from balanced_losses.features._eigh import check_gramian
from balanced_losses.features._gramian import GramianWeighting
from balanced_losses.features._qp import (
    normalize_gramian,
    simplex_qp,
    sweeps,
)

__all__ = ["MGDA", "mgda_weights"]

# Ridge on the trace-normalized Gramian: makes the program strictly convex (unique weights
# for duplicate rows, nonsingular face systems) while moving the min-norm point by about
# sqrt(1e-12) = 1e-6 of ||J||_F at most, and far less where the optimum is nondegenerate.
_RIDGE = 1e-12


def mgda_weights(gramian: Tensor) -> Tensor:
    r"""Weights of MGDA-UB: the minimum-norm point of the convex hull of the task gradients.

    .. math::
        w = \operatorname*{arg\,min}_{w \in \Delta}\ w^\top G w,\qquad
        \Delta = \Bigl\{w \in \mathbb R^K : w \ge 0,\ \textstyle\sum_i w_i = 1\Bigr\}

    (Sener & Koltun 2018, Eq. 3 applied to the gradients at the shared representation, their
    upper bound "MGDA-UB", Sec. 3.3; Désidéri 2012). The aggregated gradient :math:`w^\top J` is
    the shortest vector in the convex hull of the task gradients: it decreases every loss
    (:math:`J J^\top w \ge w^\top G w \cdot 1`) unless it is zero, which happens exactly when
    the tasks are at a Pareto-stationary point. Invariant to the scale of :math:`G`. Solved
    exactly (not by Frank-Wolfe) with the simplex active-set method of
    :mod:`balanced_losses.features._qp`, in float64 (float32 on MPS), with no host-device
    synchronization.

    The program is solved on :math:`G / \operatorname{tr} G + 10^{-12} I`: the ridge makes the
    weights unique when :math:`G` is singular (duplicate rows split evenly) and moves
    :math:`w^\top J` by at most :math:`10^{-6} \lVert J \rVert_F` (typically far less). With
    :math:`K = 1`, :math:`w = 1`; with an all-zero Gramian, :math:`w = 1/K` (any weights give
    the zero vector). TorchJD's ``MGDA`` runs Frank-Wolfe (Sener & Koltun, Algorithm 2) and
    stops at ``epsilon=1e-3``: its default result is an approximation of this one.

    Args:
        gramian: :math:`G = JJ^\top`, ``(K, K)``, symmetric positive semi-definite, finite.
            A NaN or inf entry gives NaN or meaningless weights (nothing is checked, to avoid a
            sync): guard upstream.

    Returns:
        The weights :math:`w \in \Delta`, ``(K,)``, in ``gramian``'s dtype and device.

    Shape:
        ``gramian``: ``(K, K)``; the result: ``(K,)``.

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [0.0, 3.0]], dtype=torch.float64)
        >>> mgda_weights(jac @ jac.T)
        tensor([0.9000, 0.1000], dtype=torch.float64)

    References:
        Sener, Koltun. Multi-Task Learning as Multi-Objective Optimization. NeurIPS 2018.

        Désidéri. Multiple-gradient descent algorithm (MGDA) for multiobjective optimization.
        C. R. Math. 350(5-6), 2012.
    """
    k = check_gramian(gramian)
    dtype = wide_dtype(gramian.device)
    g = normalize_gramian(gramian.to(dtype))
    g = torch.add(g, torch.eye(k, dtype=dtype, device=g.device), alpha=_RIDGE)
    return simplex_qp(g, sweeps(k)).to(gramian.dtype)


class MGDA(GramianWeighting):
    r"""MGDA-UB: the minimum-norm point of the convex hull of the task gradients.

    .. math::
        d = J^\top w,\qquad w = \arg\min_{w \in \Delta_K} \lVert J^\top w \rVert^2

    (Sener & Koltun 2018, applied to the gradients at the shared representation as their
    MGDA-UB): a common descent direction for every task, or 0 at a Pareto-stationary point.
    Its norm is at most the smallest task's, so it can starve tasks with large gradients;
    prefer :class:`~balanced_losses.UPGrad` unless you need Pareto stationarity.

    It is :class:`~balanced_losses.GramianWeighting` with the rule
    :func:`~balanced_losses.aggregation.mgda_weights`, and acts on each task's gradient at the
    shared features inside the one backward pass (route the features through :meth:`branch`); the
    forward total is the plain sum of the losses. The docs page "When task gradients conflict" says
    what it costs and when the representation-level version differs from the parameter-level one.

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
        >>> mgda = MGDA(["a", "b"])
        >>> views = mgda.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().mean()
        >>> mgda({"a": loss_a, "b": loss_b}).backward()  # the plain sum; combined in backward
        >>> mgda.last_weights.shape
        torch.Size([2])

    References:
        Sener, Koltun. Multi-Task Learning as Multi-Objective Optimization. NeurIPS 2018.
    """

    _shows_rule = False

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
            mgda_weights,
            balance_norms=balance_norms,
            momentum=momentum,
            weights=weights,
            allow_missing=allow_missing,
            sync_dist=sync_dist,
        )
