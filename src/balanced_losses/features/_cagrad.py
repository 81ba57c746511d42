"""CAGrad weights (Liu et al. 2021) from the Gramian of the task gradients."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from balanced_losses._checks import check_number
from balanced_losses._numerics import wide_dtype
from balanced_losses.features._eigh import check_gramian
from balanced_losses.features._gramian import GramianWeighting
from balanced_losses.features._qp import (
    normalize_gramian,
    simplex_soc,
    sweeps,
)

__all__ = ["CAGrad", "cagrad_weights"]

# TorchJD 0.18's CAGrad `norm_eps`: below this norm of g_w (relative to ||J||_F) the weights
# are all zero ("approximately on the Pareto front").
_NORM_EPS = 1e-4
# Ridge on the trace-normalized Gramian, as in mgda_weights: unique weights, nonsingular faces.
_RIDGE = 1e-12


def cagrad_weights(gramian: Tensor, c: float = 0.4) -> Tensor:
    r"""Weights of CAGrad: the best worst-task improvement within a ball around the mean.

    CAGrad (Liu et al. 2021, Eq. 2) takes the update :math:`d` that maximizes the smallest
    first-order improvement :math:`\min_i g_i^\top d` among the directions within
    :math:`c\lVert g_0\rVert` of the average gradient :math:`g_0 = \tfrac1K\sum_i g_i`. Its
    dual (their Eq. 3 and Algorithm 1) is a program over the simplex :math:`\Delta`:

    .. math::
        w^\star = \operatorname*{arg\,min}_{w \in \Delta}\
            g_w^\top g_0 + r \lVert g_w \rVert,\qquad
        g_w = J^\top w,\quad r = c\,\lVert g_0 \rVert,

    and :math:`d = g_0 + \frac{r}{\lVert g_{w^\star} \rVert}\, g_{w^\star}`, so

    .. math::
        w = \frac{1}{K}\,1 + \frac{r}{\lVert g_{w^\star} \rVert}\, w^\star,

    with :math:`g_w^\top g_0 = w^\top G 1/K`, :math:`\lVert g_w\rVert^2 = w^\top G w` and
    :math:`\lVert g_0 \rVert^2 = 1^\top G 1 / K^2`. :math:`c = 0` is the mean gradient; as
    :math:`c` grows CAGrad moves towards MGDA. Weights are invariant to the scale of :math:`G`.
    The dual is solved exactly by the active-set method of
    :func:`balanced_losses.features._qp.simplex_soc` (a closed form on each face), in float64
    (float32 on MPS), with no host-device synchronization.

    **As in TorchJD 0.18** ``CAGrad(c, norm_eps=1e-4)``, which this matches to about
    :math:`10^{-8}`: no final rescaling (the official code's default ``rescale=1`` divides
    :math:`d` by :math:`1 + c^2`; multiply by that yourself to reproduce it), and all weights are
    0 when :math:`\lVert g_{w^\star} \rVert < 10^{-4} \lVert J \rVert_F`, i.e. when the tasks are
    nearly Pareto-stationary (the official code instead adds :math:`10^{-4}` to the
    denominator). **Differences from TorchJD:** it zeroes the whole Gramian when
    :math:`\operatorname{tr} G < 10^{-4}` in absolute terms (hence zero weights); we normalize
    every positive trace, which keeps scale invariance. For ``c=0`` we return the mean
    :math:`1/K` (the paper's reduction to gradient descent), where TorchJD's result depends on
    which vertex its solver returns. We solve on :math:`G/\operatorname{tr} G + 10^{-12} I`
    (unique :math:`w^\star` for duplicate rows); an all-zero Gramian gives zero weights in both.

    Args:
        gramian: :math:`G = JJ^\top`, ``(K, K)``, symmetric positive semi-definite, finite.
            A NaN or inf entry gives NaN or meaningless weights (nothing is checked, to avoid a
            sync): guard upstream.
        c: Radius of the ball relative to :math:`\lVert g_0\rVert`, a finite float >= 0
            (paper and TorchJD examples: 0.4 and 0.5).

    Returns:
        The weights :math:`w`, ``(K,)``, in ``gramian``'s dtype and device. :math:`K = 1`
        gives :math:`1 + c` (or 0 for a zero gradient).

    Shape:
        ``gramian``: ``(K, K)``; the result: ``(K,)``.

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64)
        >>> w = cagrad_weights(jac @ jac.T, c=0.4)
        >>> d = w @ jac
        >>> g0 = jac.mean(0)
        >>> bool((d - g0).norm() <= 0.4 * g0.norm() + 1e-12)  # inside the ball
        True

    References:
        Liu, Liu, Jin, Stone, Liu. Conflict-Averse Gradient Descent for Multi-task Learning.
        NeurIPS 2021.
    """
    k = check_gramian(gramian)
    if not (isinstance(c, (int, float)) and math.isfinite(c) and c >= 0):
        raise ValueError(f"`c` must be a finite number >= 0, got {c!r}")
    dtype = wide_dtype(gramian.device)
    g = normalize_gramian(gramian.to(dtype))
    if c == 0:
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device)
    b = g.mean(1)  # b_i = g_i^T g0, g0 the mean gradient
    r = c * b.mean().clamp(min=0.0).sqrt()
    ridged = torch.add(g, torch.eye(k, dtype=dtype, device=g.device), alpha=_RIDGE)
    w_star = simplex_soc(ridged, b, r, sweeps(k))
    gw_squared = torch.einsum("i,ij,j->", w_star, g, w_star)  # ||g_w||^2
    # Near a Pareto-stationary point the weights are 0. So they are with a zero mean gradient
    # (r = 0), where the enumerated faces all give NaN: 0 is in the hull, so d = 0 either way.
    moving = gw_squared >= _NORM_EPS**2  # False for NaN
    weights = (r * torch.where(moving, gw_squared, 1.0).rsqrt()) * w_star + 1.0 / k
    return torch.where(moving, weights, 0.0).to(gramian.dtype)


class CAGrad(GramianWeighting):
    r"""CAGrad: the best worst-task improvement within a ball around the mean gradient.

    .. math::
        d = \arg\max_{\lVert d - g_0 \rVert \le c \lVert g_0 \rVert}\ \min_k g_k^\top d,
        \qquad g_0 = \frac1K \sum_k g_k

    (Liu et al. 2021), solved through its dual over the simplex. :math:`c = 0` is the mean;
    larger :math:`c` trades average progress for the worst task's.

    It is :class:`~balanced_losses.GramianWeighting` with the rule
    :func:`~balanced_losses.aggregation.cagrad_weights`, and acts on each task's gradient at the
    shared features inside the one backward pass (route the features through :meth:`branch`); the
    forward total is the plain sum of the losses. The docs page "When task gradients conflict" says
    what it costs and when the representation-level version differs from the parameter-level one.

    Args:
        tasks: Task names, in order.
        c: Radius of the ball around the mean gradient, relative to its norm (0.4).
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
        >>> cagrad = CAGrad(["a", "b"])
        >>> views = cagrad.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().mean()
        >>> cagrad({"a": loss_a, "b": loss_b}).backward()  # the plain sum; combined in backward
        >>> cagrad.last_weights.shape
        torch.Size([2])

    References:
        Liu, Liu, Jin, Stone, Liu. Conflict-Averse Gradient Descent for Multi-task Learning.
        NeurIPS 2021.
    """

    _shows_rule = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        c: float = 0.4,
        balance_norms: bool = False,
        momentum: float = 0.9,
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(
            tasks,
            self._rule,
            balance_norms=balance_norms,
            momentum=momentum,
            weights=weights,
            allow_missing=allow_missing,
            sync_dist=sync_dist,
        )
        self.c = check_number("c", c, low=0.0, strict=False)

    def _rule(self, gramian: Tensor) -> Tensor:
        """CAGrad's weights for a ``(K, K)`` Gramian."""
        return cagrad_weights(gramian, self.c)

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return super().extra_repr() + f", c={self.c}"
