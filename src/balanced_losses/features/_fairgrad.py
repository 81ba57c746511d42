"""FairGrad (Ban & Ji 2024): alpha-fair weights, G w = w^(-1/alpha), by damped Newton."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from balanced_losses._checks import check_number
from balanced_losses._numerics import settled
from balanced_losses.features._eigh import at_least_float32, check_gramian
from balanced_losses.features._gramian import GramianWeighting

__all__ = ["FairGrad", "fairgrad_weights"]

# Newton steps. From the start below, on random solvable Gramians (K <= 20, rank-deficient,
# rows scaled over 1e-3..1e3, duplicates, tightly aligned rows) the relative residual of
# G w = w^-p fell below 1e-12 within 9 steps for p = 1 (Nash), 18 for p in [0.5, 5] and 27 for
# p = 0.2 (alpha = 5: weights spread over 30 decades, each step cuts a weight at most 100-fold);
# tests/test_aggregation_closed.py checks the residual.
DEFAULT_NEWTON_STEPS = 32
# Step sizes tried per Newton step: t_max * 2^-j for j < 24, then 0 (always acceptable).
_BACKTRACK = 24
_ARMIJO = 1e-4
# Fraction to the boundary w = 0 a step may go (Nocedal & Wright, Eq. 19.9); 0.9999 and
# 1 - 1e-6 were measured no faster.
_FTB = 0.99


def _barrier(w: Tensor, p: float) -> Tensor:
    """``h(w)`` with ``h'(w) = w^-p``: ``log w`` for ``p = 1``, else ``w^(1-p) / (1-p)``."""
    if p == 1.0:
        return torch.log(w)
    return w.pow(1.0 - p) / (1.0 - p)


def alive_rows(gram: Tensor) -> Tensor:
    r"""Rows that are not zero: :math:`G_{ii} > \varepsilon^2 \max_j G_{jj}`.

    A row below that is under the rounding of the others (its gradient is shorter than
    :math:`\varepsilon` times the longest one), and the power equations have no finite solution
    for an exactly zero row (:math:`(G w)_i = 0 \ne w_i^{-p}`).
    """
    diag = gram.diagonal()
    return diag > diag.amax() * torch.finfo(gram.dtype).eps ** 2


def solve_power_equation(gram: Tensor, alive: Tensor, p: float, steps: int) -> Tensor:
    r"""The :math:`w > 0` with :math:`(G w)_i = w_i^{-p}` on the ``alive`` rows; 0 elsewhere.

    It is the unique minimizer of the convex function

    .. math::
        f(w) = \tfrac12 w^\top G w - \sum_i h(w_i),\qquad h'(w) = w^{-p}

    (:math:`-h` is strictly convex on :math:`w > 0` with :math:`h'(0^+) = \infty`, so the
    minimizer is interior), found by Newton's method with the Hessian
    :math:`G + p\,\operatorname{diag}(w^{-p-1})` (positive definite), a fraction-to-boundary
    cap (99% of the way to the nearest :math:`w_i = 0`), and Armijo backtracking over a fixed
    grid of step sizes (Nocedal & Wright, Alg. 3.1) evaluated at once and picked with
    ``argmax``: a fixed number of steps, no data-dependent branch, no host-device sync. The
    Armijo test allows for the rounding of :math:`f`, so full Newton steps are taken near the
    solution and convergence ends quadratic. Dead rows are decoupled as identity rows
    (solution 1), then zeroed. The start is the solution of the diagonal problem,
    :math:`w_i = G_{ii}^{-1/(1+p)}`, rescaled to the best point on its ray.

    ``gram`` should be normalized to unit scale (so that :math:`f` and the start are O(1)).
    """
    k = gram.shape[0]
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    gram = torch.where(alive[:, None] & alive[None, :], gram, eye)
    eps = torch.finfo(gram.dtype).eps
    w = gram.diagonal().pow(-1.0 / (1.0 + p))
    # Along the ray s w: f'(s) = s q - s^-p sum w^(1-p) = 0 gives s^(1+p) = sum w^(1-p) / q. A
    # q of 0 (w in the null space: a Pareto-stationary point) keeps s = 1.
    quad = w @ gram @ w
    ray = w.pow(1.0 - p).sum() / torch.where(quad > 0, quad, torch.ones_like(quad))
    w = w * torch.where(quad > 0, ray, torch.ones_like(ray)).pow(1.0 / (1.0 + p))
    grid = torch.cat(
        [
            torch.pow(2.0, -torch.arange(_BACKTRACK, dtype=gram.dtype, device=gram.device)),
            torch.zeros(1, dtype=gram.dtype, device=gram.device),
        ]
    )
    for _ in range(steps):
        w_p = w.pow(-p)
        grad = gram @ w - w_p
        hess = gram + torch.diag_embed(p * w_p / w)
        step = -torch.linalg.solve_ex(hess, grad, check_errors=False)[0]
        step = torch.where(step.isfinite().all(), step, torch.zeros_like(step))
        # The largest t with w + t d > 0, times 0.99, and at most the full Newton step 1.
        to_boundary = torch.where(step < 0, -w / torch.where(step < 0, step, -1), torch.inf)
        t_max = torch.clamp(_FTB * to_boundary.amin(), max=1.0)
        ts = t_max * grid
        trial = w + ts[:, None] * step
        feasible = (trial > 0).all(dim=1)
        trial = torch.where(trial > 0, trial, torch.ones_like(trial))
        f_trial = 0.5 * ((trial @ gram) * trial).sum(dim=1) - _barrier(trial, p).sum(dim=1)
        quad_w = 0.5 * (w @ gram @ w)
        bar_w = _barrier(w, p)
        f_w = quad_w - bar_w.sum()
        # f is computed to about K eps (|quadratic| + sum |h|): below that, accept.
        slack = (16 * k * eps) * (quad_w.abs() + bar_w.abs().sum())
        accept = feasible & (f_trial <= f_w + _ARMIJO * ts * (grad @ step) + slack)
        # The first (largest) acceptable step; the last candidate, t = 0, always is.
        # (gather, not ts[index]: a 0-d index tensor is read on the host.)
        t = ts.gather(0, torch.argmax(accept.to(torch.int32)).reshape(1))[0]
        w = w + t * step
        if settled(t * step.abs() <= 4 * eps * w.abs()):
            break
    return torch.where(alive, w, torch.zeros_like(w))


def fairgrad_weights(gramian: Tensor, alpha: float = 1.0, *, steps: int | None = None) -> Tensor:
    r"""FairGrad weights: the :math:`\alpha`-fair allocation of the update among the tasks.

    FairGrad (Ban & Ji 2024, Eq. 4 and Algorithm 1) picks the update :math:`d = J^\top w`
    that maximizes :math:`\sum_i u_\alpha(g_i \cdot d)` for the :math:`\alpha`-fair utility
    :math:`u_\alpha`; its stationarity condition is

    .. math::
        G w = w^{-1/\alpha}\quad (\text{elementwise}),\qquad w > 0,

    which is the stationary point of the convex function
    :math:`\tfrac12 w^\top G w - \sum_i h(w_i)` with :math:`h'(w) = w^{-1/\alpha}`, solved
    here by damped Newton with a fixed budget (see :func:`solve_power_equation`). The
    equation is solved for :math:`G / \max_i G_{ii}` and rescaled: :math:`G \to s G` maps the
    solution to :math:`s^{-\alpha / (1 + \alpha)} w`, exactly. :math:`\alpha = 1` is
    proportional fairness, the Nash bargaining solution of Nash-MTL (without its
    normalization); :math:`\alpha = 0` is linear scalarization, and like TorchJD 0.18 it
    returns the uniform :math:`\mathbf 1 / K`.

    A zero row has no finite solution (:math:`(G w)_i = 0`) and gets weight 0, which changes
    nothing in :math:`w^\top J`; TorchJD's solver instead lets that weight grow. Duplicate rows
    and rank deficiency are fine as long as no nonzero :math:`v \ge 0` has :math:`G v = 0`;
    when one does (zero is a convex combination of the task gradients, e.g. :math:`g_2 = -g_1`:
    a Pareto-stationary point), no solution exists, :math:`f` is unbounded below, and the
    weights after the fixed budget are finite but large along :math:`v`, so :math:`w^\top J`
    is still about 0. NaN in ``gramian`` may give NaN (the caller guards).

    TorchJD 0.18's ``FairGrad`` has no default :math:`\alpha` (it must be given); the paper's
    experiments use several values. The default 1 here is the proportionally fair one.

    Args:
        gramian: :math:`G = J J^\top`, ``(K, K)``, symmetric PSD.
        alpha: The fairness :math:`\alpha \ge 0`, finite.
        steps: Newton steps; ``None`` takes ``DEFAULT_NEWTON_STEPS`` (32).

    Returns:
        ``(K,)`` weights in the Gramian's dtype (computed in at least float32).

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [-0.5, 2.0]], dtype=torch.float64)
        >>> gram = jac @ jac.T
        >>> w = fairgrad_weights(gram, alpha=1.0)
        >>> torch.allclose(w * (gram @ w), torch.ones(2, dtype=torch.float64))  # G w = 1 / w
        True

    References:
        Ban, Ji. Fair Resource Allocation in Multi-Task Learning. ICML 2024.

        Nocedal, Wright. Numerical Optimization, 2nd ed., Ch. 3. 2006.
    """
    k = check_gramian(gramian)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"`alpha` must be a float >= 0, got {alpha!r}")
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"`alpha` must be finite and >= 0, got {alpha!r}")
    g = gramian.to(at_least_float32(gramian))
    if alpha == 0:
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device)
    p = 1.0 / alpha
    alive = alive_rows(g)
    scale = g.diagonal().amax()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    w = solve_power_equation(g / scale, alive, p, DEFAULT_NEWTON_STEPS if steps is None else steps)
    return (w * scale.pow(-1.0 / (1.0 + p))).to(gramian.dtype)


class FairGrad(GramianWeighting):
    r"""FairGrad: alpha-fair shares of improvement between the tasks.

    .. math::
        d = J^\top w,\qquad G w = w^{-1/\alpha}

    (Ban & Ji 2024): :math:`\alpha = 1` is proportional fairness (Nash-MTL's condition
    without its clip), larger :math:`\alpha` moves towards max-min fairness. Solved exactly
    (a convex problem's stationary point, Newton with a fixed budget).

    It is :class:`~balanced_losses.GramianWeighting` with the rule
    :func:`~balanced_losses.aggregation.fairgrad_weights`, and acts on each task's gradient at the
    shared features inside the one backward pass (route the features through :meth:`branch`); the
    forward total is the plain sum of the losses. The docs page "When task gradients conflict" says
    what it costs and when the representation-level version differs from the parameter-level one.

    Args:
        tasks: Task names, in order.
        alpha: The fairness exponent :math:`\alpha \ge 0`.
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
        >>> fairgrad = FairGrad(["a", "b"])
        >>> views = fairgrad.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().mean()
        >>> fairgrad({"a": loss_a, "b": loss_b}).backward()  # the plain sum; combined in backward
        >>> fairgrad.last_weights.shape
        torch.Size([2])

    References:
        Ban, Ji. Fair Resource Allocation in Multi-Task Learning. ICML 2024.
    """

    _shows_rule = False

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        alpha: float = 1.0,
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
        self.alpha = check_number("alpha", alpha, low=0.0, strict=False)
        # alpha = 1 is Nash-MTL's condition G w = 1 / w (Navon et al. 2022, eq. 2): a task's
        # gradient times s gives it weight w / s, the same update, so a constant factor of a
        # loss cancels and the warning about one applies. Other alphas keep the factor.
        self._cancels_factors = self._cancels_factors or self.alpha == 1.0

    def _rule(self, gramian: Tensor) -> Tensor:
        """FairGrad's weights for a ``(K, K)`` Gramian."""
        return fairgrad_weights(gramian, self.alpha)

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return super().extra_repr() + f", alpha={self.alpha}"
