"""IMTL-G (Liu et al. 2021), the closed-form gradient half of Impartial Multi-Task Learning."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from balanced_losses.features._eigh import at_least_float32, check_gramian, pinv_psd
from balanced_losses.features._gramian import GramianWeighting

__all__ = ["IMTLG", "imtlg_weights"]

# TorchJD 0.18 returns zero weights when |1^T G^+ d| < 1e-12 (an aggregate of unbounded length);
# we apply its threshold to the scale-free sum sqrt(max_i G_ii) * 1^T G^+ d, and at least 4096
# epsilons of the working dtype (so float32 rounding of an exact zero is caught too).
_SUM_TOL = 1e-12
_SUM_TOL_EPS = 4096


def imtlg_weights(gramian: Tensor, *, sweeps: int | None = None) -> Tensor:
    r"""IMTL-G weights: the aggregate whose projections on all unit task gradients are equal.

    With :math:`u_i = g_i / \lVert g_i \rVert`, IMTL-G (Liu et al. 2021, Sec. 3.2, the closed
    form of Eq. 10) looks for :math:`d = \sum_i w_i g_i` with :math:`\sum_i w_i = 1` and
    :math:`d \cdot u_i` the same for every task. In Gramian form (the generalization of Quinton
    & Rey 2024 that allows linearly dependent rows):

    .. math::
        v = G^+ \sqrt{\operatorname{diag}(G)},\qquad w = \frac{v}{\mathbf 1^\top v},

    since :math:`J d = G w \propto (\lVert g_i \rVert)_i` exactly when all the projections
    :math:`d \cdot u_i` are equal. The pseudo-inverse comes from the sync-free Jacobi
    eigensolver with ``torch.linalg.pinv``'s cutoff (eigenvalues below
    :math:`K \varepsilon \lambda_{\max}` are dropped), so rank-deficient Gramians, duplicate
    rows and zero rows give what TorchJD 0.18's ``IMTLG`` gives: a zero row gets weight 0. When
    :math:`\mathbf 1^\top v` vanishes (e.g. :math:`g_2 = -g_1`: no direction has equal
    positive projections) the weights are all 0, as in TorchJD, except that the test is
    :math:`\sqrt{\max_i G_{ii}}\,|\mathbf 1^\top v| < \max(10^{-12}, 4096\varepsilon)`, which
    is scale-free (TorchJD compares :math:`|\mathbf 1^\top v|` itself with :math:`10^{-12}`, so
    it agrees with this at the scale :math:`\max_i G_{ii} = 1`). The weights are invariant to
    scaling :math:`G` by :math:`s > 0` and may be negative. A finite PSD ``gramian`` gives finite
    weights; NaN in ``gramian`` may give NaN (the caller guards).

    Args:
        gramian: :math:`G = J J^\top`, ``(K, K)``, symmetric PSD.
        sweeps: Jacobi sweeps; ``None`` takes ``3 + ceil(2 log2 K)``.

    Returns:
        ``(K,)`` weights in the Gramian's dtype (computed in at least float32).

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [-0.5, 2.0]], dtype=torch.float64)
        >>> w = imtlg_weights(jac @ jac.T)
        >>> units = jac / jac.norm(dim=1, keepdim=True)
        >>> units @ (w @ jac)  # the same projection on every task's unit gradient
        tensor([0.5101, 0.5101], dtype=torch.float64)

    References:
        Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang. Towards Impartial Multi-task Learning.
        ICLR 2021.

        Quinton, Rey. Jacobian Descent for Multi-Objective Optimization. arXiv:2406.16232, 2024.
    """
    check_gramian(gramian)
    g = gramian.to(at_least_float32(gramian))
    diag = g.diagonal().clamp(min=0)
    v = pinv_psd(g, sweeps) @ diag.sqrt()
    v_sum = v.sum()
    # v scales as 1 / sqrt(scale of G): this product is dimensionless.
    scale = diag.amax().sqrt()
    tol = max(_SUM_TOL, _SUM_TOL_EPS * torch.finfo(g.dtype).eps)
    degenerate = (v_sum * scale).abs() < tol
    safe_sum = torch.where(degenerate, torch.ones_like(v_sum), v_sum)
    weights = torch.where(degenerate, torch.zeros_like(v), v / safe_sum)
    return weights.to(gramian.dtype)


class IMTLG(GramianWeighting):
    r"""IMTL-G: the combination whose projection on every task's unit gradient is equal.

    .. math::
        d = J^\top \alpha,\qquad u_k^\top d \text{ equal for all } k,\qquad
        u_k = g_k / \lVert g_k \rVert,\qquad \textstyle\sum_k \alpha_k = 1

    (Liu et al. 2021, "impartial" gradient: every task improves at the same rate along its own
    direction). Use it when tasks conflict and none should dominate the shared layers.

    It is :class:`~balanced_losses.GramianWeighting` with the rule
    :func:`~balanced_losses.aggregation.imtlg_weights`, and acts on each task's gradient at the
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
        >>> imtlg = IMTLG(["a", "b"])
        >>> views = imtlg.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().mean()
        >>> imtlg({"a": loss_a, "b": loss_b}).backward()  # the plain sum; combined in backward
        >>> imtlg.last_weights.shape
        torch.Size([2])

    References:
        Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang. Towards Impartial Multi-task Learning.
        ICLR 2021.
    """

    _shows_rule = False

    # The method is invariant to a constant factor of a loss (see Weighting._check_factors).
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
            imtlg_weights,
            balance_norms=balance_norms,
            momentum=momentum,
            weights=weights,
            allow_missing=allow_missing,
            sync_dist=sync_dist,
        )
