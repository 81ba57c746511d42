"""Nash-MTL (Navon et al. 2022): the Nash bargaining solution, G alpha = 1 / alpha."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from balanced_losses._checks import check_number
from balanced_losses.features._eigh import at_least_float32, check_gramian
from balanced_losses.features._fairgrad import alive_rows, solve_power_equation
from balanced_losses.features._gramian import GramianWeighting

__all__ = ["NashMTL", "nash_mtl_weights"]

# Newton steps for p = 1, where f is self-concordant: at most 9 were needed on the random
# solvable Gramians described in _fairgrad.py; 20 leave a margin.
DEFAULT_NEWTON_STEPS = 20


def nash_mtl_weights(gramian: Tensor, *, max_norm: float = 1.0, steps: int | None = None) -> Tensor:
    r"""Nash-MTL weights: the bargaining solution of the tasks, clipped as in TorchJD 0.18.

    Nash-MTL (Navon et al. 2022, Theorem 5.1 and Algorithm 1) updates along
    :math:`d = J^\top \alpha` for the :math:`\alpha > 0` with

    .. math::
        (G \alpha)_i = \frac{1}{\alpha_i}\quad\text{for all } i,

    the stationary point of the self-concordant convex function
    :math:`\tfrac12 \alpha^\top G \alpha - \sum_i \log \alpha_i`, solved exactly by damped Newton
    with a fixed budget (see ``solve_power_equation``; the paper's own solver is a sequence of
    convex programs, which TorchJD runs with cvxpy). At the solution
    :math:`\lVert J^\top \alpha \rVert^2 = \alpha^\top G \alpha = \sum_i \alpha_i (G\alpha)_i
    = K`. Then, as in the official implementation and TorchJD 0.18's ``NashMTL``, if
    ``max_norm > 0`` and :math:`\lVert J^\top \alpha \rVert > \text{max\_norm}`, :math:`\alpha`
    is scaled so that :math:`\lVert J^\top \alpha \rVert = \text{max\_norm}`; with TorchJD's
    default 1.0 that is every call with :math:`K \ge 2`. (The official code and TorchJD divide
    :math:`G` by :math:`\lVert G \rVert_F` but multiply the constraints back by it, so the
    solution is that of :math:`G` itself, checked against TorchJD to 1e-8; we also solve for the
    normalized :math:`G` and rescale, :math:`\alpha^*(G) = \alpha^*(G / c) / \sqrt c`, exactly.)
    Scaling :math:`G` by :math:`s` scales the weights by :math:`s^{-1/2}`, so :math:`J^\top
    \alpha` does not depend on the scale of :math:`J`.

    What TorchJD's ``NashMTL`` does and this function does not: it is stateful (it warm-starts
    from the previous call's :math:`\alpha`, and with ``update_weights_every > 1`` reuses old
    weights), and its loop stops once :math:`\lVert G\alpha - 1/\alpha \rVert < 10^{-3}`, so it
    is approximate; here every call solves its Gramian to rounding. A zero row has no finite
    solution (:math:`(G\alpha)_i = 0`) and gets weight 0 (no effect on :math:`J^\top\alpha`;
    cvxpy fails on such input and TorchJD falls back to its previous :math:`\alpha`). If zero
    is a convex combination of the task gradients (a Pareto-stationary point, e.g.
    :math:`g_2 = -g_1`) no solution exists; the weights are finite after the fixed budget and
    :math:`J^\top \alpha` is about 0. NaN in ``gramian`` may give NaN (the caller guards).

    Args:
        gramian: :math:`G = J J^\top`, ``(K, K)``, symmetric PSD.
        max_norm: Largest :math:`\lVert J^\top \alpha \rVert`; 0 disables the clipping.
        steps: Newton steps; ``None`` takes ``DEFAULT_NEWTON_STEPS`` (20).

    Returns:
        ``(K,)`` weights in the Gramian's dtype (computed in at least float32).

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [-0.5, 2.0]], dtype=torch.float64)
        >>> gram = jac @ jac.T
        >>> w = nash_mtl_weights(gram)
        >>> w * (gram @ w)  # the bargaining solution: the same for every task
        tensor([0.5000, 0.5000], dtype=torch.float64)

    References:
        Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya. Multi-Task Learning as a
        Bargaining Game. ICML 2022.
    """
    check_gramian(gramian)
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)):
        raise ValueError(f"`max_norm` must be a float >= 0, got {max_norm!r}")
    if not (math.isfinite(max_norm) and max_norm >= 0):
        raise ValueError(f"`max_norm` must be finite and >= 0, got {max_norm!r}")
    g = gramian.to(at_least_float32(gramian))
    # Solve at unit scale, where the start and the Armijo slack are O(1): G alpha = 1 / alpha
    # for G = c G_1 is alpha = alpha_1 / sqrt(c).
    norm = torch.linalg.matrix_norm(g)
    norm = torch.where(norm > 0, norm, torch.ones_like(norm))
    steps = DEFAULT_NEWTON_STEPS if steps is None else steps
    alpha = solve_power_equation(g / norm, alive_rows(g), 1.0, steps) / norm.sqrt()
    if max_norm > 0:
        # ||J^T alpha|| = sqrt(alpha^T G alpha), with the unnormalized G.
        length = torch.sqrt((alpha @ g @ alpha).clamp(min=0))
        clip = length > max_norm
        alpha = torch.where(clip, alpha * (max_norm / torch.where(clip, length, 1.0)), alpha)
    return alpha.to(gramian.dtype)


class NashMTL(GramianWeighting):
    r"""Nash-MTL: the Nash bargaining solution between the tasks' gradients.

    .. math::
        d = J^\top \alpha,\qquad (G\alpha)_k = 1/\alpha_k,\ \alpha > 0,

    scaled down so that :math:`\lVert d \rVert \le` ``max_norm`` (Navon et al. 2022; the
    clip as in TorchJD's ``NashMTL``). Every task's utility :math:`\log(g_k^\top d)` is
    weighed equally; solved exactly here (a convex problem's stationary point, damped Newton
    with a fixed budget), with no solver on the host.

    It is :class:`~balanced_losses.GramianWeighting` with the rule
    :func:`~balanced_losses.aggregation.nash_mtl_weights`, and acts on each task's gradient at the
    shared features inside the one backward pass (route the features through :meth:`branch`); the
    forward total is the plain sum of the losses. The docs page "When task gradients conflict" says
    what it costs and when the representation-level version differs from the parameter-level one.

    Args:
        tasks: Task names, in order.
        max_norm: Upper bound on the norm of the combined gradient (TorchJD's default).
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
        >>> nashmtl = NashMTL(["a", "b"])
        >>> views = nashmtl.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().mean()
        >>> nashmtl({"a": loss_a, "b": loss_b}).backward()  # the plain sum; combined in backward
        >>> nashmtl.last_weights.shape
        torch.Size([2])

    References:
        Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya. Multi-Task Learning as a
        Bargaining Game. ICML 2022.
    """

    _shows_rule = False

    # The method is invariant to a constant factor of a loss (see Weighting._check_factors).
    _cancels_factors = True

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        max_norm: float = 1.0,
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
        self.max_norm = check_number("max_norm", max_norm, low=0.0, strict=True)

    def _rule(self, gramian: Tensor) -> Tensor:
        """NashMTL's weights for a ``(K, K)`` Gramian."""
        return nash_mtl_weights(gramian, max_norm=self.max_norm)

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return super().extra_repr() + f", max_norm={self.max_norm}"
