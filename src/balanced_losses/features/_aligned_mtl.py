"""Aligned-MTL (Senushkin et al. 2023): align the singular values of the task Jacobian."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from balanced_losses.features._eigh import at_least_float32, check_gramian, jacobi_eigh
from balanced_losses.features._gramian import GramianWeighting

__all__ = ["AlignedMTL", "aligned_mtl_weights"]


def aligned_mtl_weights(
    gramian: Tensor, pref: Tensor | None = None, *, sweeps: int | None = None
) -> Tensor:
    r"""Aligned-MTL weights: the preference-weighted aggregate of the condition-1 Jacobian.

    Aligned-MTL (Senushkin et al. 2023, Algorithm 1 and Eq. 9) replaces the Jacobian
    :math:`J = U \Sigma V^\top` by :math:`\hat J = \sigma_{\min} U V^\top`, whose nonzero
    singular values all equal the smallest nonzero one of :math:`J`, and returns
    :math:`\hat J^\top w` for a preference :math:`w`. Since
    :math:`\hat J = \sigma_{\min} U \Sigma^{-1} U^\top J`, in Gramian form with
    :math:`G = U \Lambda U^\top`:

    .. math::
        B = \sqrt{\lambda_{\min}}\; U_r \Lambda_r^{-1/2} U_r^\top,\qquad \alpha = B\, w,

    where :math:`U_r, \Lambda_r` keep the eigenvalues above
    :math:`K \varepsilon \lambda_{\max}` (the numerical rank, as in TorchJD 0.18's
    ``AlignedMTL``), and :math:`\lambda_{\min}` is the smallest of them. A Gramian of rank 0
    gives :math:`B = I`. The eigendecomposition is the sync-free Jacobi solver; duplicate rows,
    zero rows and rank deficiency only lower :math:`r`. The weights are invariant to scaling
    :math:`G` by :math:`s > 0`. A finite PSD ``gramian`` gives finite weights; NaN in
    ``gramian`` may give NaN (the caller guards).

    Args:
        gramian: :math:`G = J J^\top`, ``(K, K)``, symmetric PSD.
        pref: The preference :math:`w`, ``(K,)``; ``None`` is :math:`\mathbf 1 / K` (TorchJD's
            default, the mean).
        sweeps: Jacobi sweeps; ``None`` takes ``3 + ceil(2 log2 K)``.

    Returns:
        ``(K,)`` weights in the Gramian's dtype (computed in at least float32).

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [-0.5, 2.0]], dtype=torch.float64)
        >>> aligned_mtl_weights(jac @ jac.T)
        tensor([0.5336, 0.2767], dtype=torch.float64)

    References:
        Senushkin, Patakin, Kuznetsov, Konushin. Independent Component Alignment for Multi-Task
        Learning. CVPR 2023.
    """
    k = check_gramian(gramian)
    g = gramian.to(at_least_float32(gramian))
    if pref is None:
        w = torch.full((k,), 1.0 / k, dtype=g.dtype, device=g.device)
    else:
        if pref.shape != (k,):
            raise ValueError(f"`pref` must have shape ({k},), got {tuple(pref.shape)}")
        w = pref.to(device=g.device, dtype=g.dtype)
    lam, vec = jacobi_eigh(g, sweeps)
    # The numerical rank of TorchJD 0.18 (and numpy.linalg.matrix_rank): lambda > K eps max.
    keep = lam > lam.amax() * (k * torch.finfo(g.dtype).eps)
    rank_zero = ~keep.any()
    ones = torch.ones_like(lam)
    lam_kept = torch.where(keep, lam, ones)
    lam_min = torch.where(keep, lam, torch.full_like(lam, torch.inf)).amin()
    lam_min = torch.where(rank_zero, ones[0], lam_min)
    # Eq. 9: every kept singular value sigma_i becomes sigma_min, i.e. a factor
    # sqrt(lambda_min / lambda_i) along u_i; the dropped directions get 0.
    factor = torch.where(keep, torch.sqrt(lam_min / lam_kept), torch.zeros_like(lam))
    balance = (vec * factor) @ vec.mT
    balance = torch.where(rank_zero, torch.eye(k, dtype=g.dtype, device=g.device), balance)
    return (balance @ w).to(gramian.dtype)


class AlignedMTL(GramianWeighting):
    r"""Aligned-MTL: align the singular values of the task gradients to the smallest one.

    .. math::
        J = U \Sigma V^\top \;\to\; \hat J = \sigma_{\min} U V^\top,\qquad
        d = \hat J^\top \mathbf 1 / K

    (Senushkin et al. 2023): a well-conditioned system of gradients, so no direction dominates.
    Use it when the gradients are close to collinear or of very different sizes.

    It is :class:`~balanced_losses.GramianWeighting` with the rule
    :func:`~balanced_losses.aggregation.aligned_mtl_weights`, and acts on each task's gradient at
    the shared features inside the one backward pass (route the features through :meth:`branch`);
    the forward total is the plain sum of the losses. The docs page "When task gradients conflict"
    says what it costs and when the representation-level version differs from the parameter-level
    one.

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
        >>> alignedmtl = AlignedMTL(["a", "b"])
        >>> views = alignedmtl.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().mean()
        >>> alignedmtl({"a": loss_a, "b": loss_b}).backward()  # the plain sum; combined in backward
        >>> alignedmtl.last_weights.shape
        torch.Size([2])

    References:
        Senushkin, Patakin, Kuznetsov, Konushin. Independent Component Alignment for
        Multi-Task Learning. CVPR 2023.
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
            aligned_mtl_weights,
            balance_norms=balance_norms,
            momentum=momentum,
            weights=weights,
            allow_missing=allow_missing,
            sync_dist=sync_dist,
        )
