"""UPGrad weights (Quinton & Rey 2024) from the Gramian of the task gradients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from balanced_losses._numerics import wide_dtype
from balanced_losses.features._eigh import check_gramian
from balanced_losses.features._gramian import GramianWeighting
from balanced_losses.features._qp import (
    bound_qp,
    normalize_gramian,
    sweeps,
)

__all__ = ["UPGrad", "upgrad_weights"]

# TorchJD 0.18's QuadprogProjector default `reg_eps`: added to the diagonal of the
# trace-normalized Gramian before the projections.
_REG_EPS = 1e-4


def upgrad_weights(gramian: Tensor, pref: Tensor | None = None) -> Tensor:
    r"""Weights of UPGrad: each task's gradient projected onto the dual cone, then combined.

    UPGrad (Quinton & Rey 2024, Eq. 5) aggregates the rows :math:`g_i` of the Jacobian
    :math:`J` as :math:`\sum_i p_i\, \pi_J(g_i)`, where :math:`\pi_J` projects onto the dual
    cone :math:`\{x : Jx \ge 0\}` (directions that increase no loss) and :math:`p` is the
    preference vector. By their Proposition 1 the projection of :math:`J^\top u` is
    :math:`J^\top v` with :math:`v` the solution of a program in the Gramian alone, so with
    :math:`u_i = p_i e_i`:

    .. math::
        w = \sum_{i=1}^K v_i,\qquad
        v_i = \operatorname*{arg\,min}_{v \ge p_i e_i}\ v^\top \tilde G v,\qquad
        \tilde G = \frac{G}{\operatorname{tr} G} + \varepsilon I,\quad \varepsilon = 10^{-4},

    and the aggregated gradient is :math:`w^\top J`. The result is a direction that conflicts
    with no task (for :math:`\varepsilon = 0`) and treats every task alike, whatever the norms.
    The :math:`K` programs are solved together, exactly, by the bound-constrained active-set
    method of :mod:`balanced_losses.features._qp`, in float64 (float32 on MPS), with no
    host-device synchronization.

    **Regularization.** :math:`\tilde G` is what TorchJD 0.18's default ``QuadprogProjector``
    (``norm_eps=1e-4, reg_eps=1e-4``) solves with, and the weights match its ``UPGrad()`` to
    about :math:`10^{-8}`. Dividing by the trace (:math:`\lVert J \rVert_F^2`) does not change
    the projections; it makes :math:`\varepsilon` relative, so the weights are invariant to the
    scale of :math:`G`. Adding :math:`\varepsilon I` makes the programs strictly convex, so the
    weights are unique and continuous in :math:`G` even when it is singular (rank-deficient
    :math:`J`, duplicate or zero rows), and bounds the condition number of every system by
    about :math:`10^4`; the price is that the projection is onto a cone slightly wider than the
    dual cone: :math:`w^\top G w` may be negative by :math:`O(\varepsilon \operatorname{tr} G)`.
    **One difference from TorchJD:** it replaces the normalized Gramian by 0 when
    :math:`\operatorname{tr} G < 10^{-4}` in absolute terms (weights :math:`= p`); we normalize
    every positive trace, which keeps scale invariance (for :math:`\operatorname{tr} G \ge
    10^{-4}` the two agree). An all-zero Gramian gives :math:`w = p` in both.

    Args:
        gramian: :math:`G = JJ^\top`, ``(K, K)``, symmetric positive semi-definite, finite.
            A NaN or inf entry gives NaN or meaningless weights (nothing is checked, to avoid a
            sync): guard upstream.
        pref: The preference vector :math:`p`, ``(K,)``, entries >= 0; ``None`` for the mean
            :math:`p_i = 1/K` (TorchJD's default).

    Returns:
        The weights :math:`w`, ``(K,)``, in ``gramian``'s dtype and device; :math:`w \ge p`.
        For :math:`K = 1`, :math:`w = p`.

    Shape:
        ``gramian``: ``(K, K)``; ``pref`` and the result: ``(K,)``.

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
        >>> w = upgrad_weights(jac @ jac.T)
        >>> bool((jac @ (w @ jac) >= 0).all())  # no task's loss increases
        True

    References:
        Quinton, Rey. Jacobian Descent for Multi-Objective Optimization. arXiv:2406.16232,
        2024.
    """
    k = check_gramian(gramian)
    if pref is not None and tuple(pref.shape) != (k,):
        raise ValueError(
            f"`pref` must have shape ({k},) to match `gramian`, got {tuple(pref.shape)}"
        )
    dtype = wide_dtype(gramian.device)
    g = normalize_gramian(gramian.to(dtype))
    g = torch.add(g, torch.eye(k, dtype=dtype, device=g.device), alpha=_REG_EPS)
    p = (
        torch.full((k,), 1.0 / k, dtype=dtype, device=g.device)
        if pref is None
        else pref.to(device=g.device, dtype=dtype)
    )
    # Program i, in x = v - p_i e_i >= 0: min 1/2 x^T G x + (G p_i e_i)^T x; row i of the
    # linear terms is p_i G[i, :] (G symmetric). All K programs share G and run as one batch.
    x = bound_qp(g, p[:, None] * g, sweeps(k))
    return (p + x.sum(0)).to(gramian.dtype)


class UPGrad(GramianWeighting):
    r"""UPGrad: project each task's gradient onto the dual cone of all of them, then average.

    .. math::
        d = \frac1K \sum_k \pi_{\mathcal C}(g_k),\qquad
        \mathcal C = \{x : g_j^\top x \ge 0\ \forall j\}

    (Quinton & Rey 2024): the result never conflicts with any task (:math:`g_j^\top d \ge 0`),
    and it is the mean when no two gradients conflict. Use it when tasks conflict and you want
    no task's loss to go up at first order; it keeps the scale of a plain mean.

    It is :class:`~balanced_losses.GramianWeighting` with the rule
    :func:`~balanced_losses.aggregation.upgrad_weights`, and acts on each task's gradient at the
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
        >>> upgrad = UPGrad(["a", "b"])
        >>> views = upgrad.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().mean()
        >>> upgrad({"a": loss_a, "b": loss_b}).backward()  # the plain sum; combined in backward
        >>> upgrad.last_weights.shape
        torch.Size([2])

    References:
        Quinton, Rey. Jacobian Descent for Multi-Objective Optimization. arXiv:2406.16232,
        2024.
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
            upgrad_weights,
            balance_norms=balance_norms,
            momentum=momentum,
            weights=weights,
            allow_missing=allow_missing,
            sync_dist=sync_dist,
        )
