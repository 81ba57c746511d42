r"""Small convex programs over task weights, solved exactly without a host-device sync.

Every feature-level aggregator reduces to a program in :math:`K` task weights built from the
Gramian :math:`G = JJ^\top` (:math:`K \times K`, :math:`K` small). The solvers here are a
*primal active-set method* (Nocedal & Wright 2006, Algorithm 16.3; for bounds alone this is
Lawson & Hanson 1974's NNLS scheme) written as a fixed number of identical sweeps of tensor
operations:

* each sweep solves the equality-constrained problem on the current *free set* :math:`F`
  (the coordinates not held at their bound) with one masked linear system: the coordinates
  outside :math:`F` get an identity row, so the system keeps its :math:`K \times K` (or
  :math:`(K+1) \times (K+1)`) shape and no index set ever becomes a data-dependent shape;
* if that face minimizer :math:`z` is infeasible, the iterate moves from :math:`x` towards it
  until the first coordinate hits its bound (the ratio test) and the blocking coordinates
  leave :math:`F`; otherwise :math:`x = z` and the fixed coordinate whose multiplier is most
  negative joins :math:`F`;
* both outcomes are computed and one is selected with ``torch.where``, so a sweep never asks
  the host which branch to take. Once optimal, a sweep maps the iterate to itself, so extra
  sweeps cost time but not accuracy.

Every sweep moves along a segment towards a face minimizer from a feasible point, so the
objective never increases and the method terminates in finitely many sweeps (no face is
visited twice without progress); in practice a few sweeps more than the number of free
coordinates at the optimum. The result is the exact optimum up to rounding once enough sweeps
ran, unlike a first-order method whose error shrinks with the iteration count: with the
Gramian's condition number up to :math:`10^4` (UPGrad's regularization) accelerated projected
gradient would need thousands of steps to reach :math:`10^{-7}`.

**Small programs on an accelerator.** Each sweep above is some twenty tensor operations, and on a
GPU each is a kernel launch of a few microseconds that does almost no work: at :math:`K = 10` the
:math:`2K + 4` sweeps dispatch over a thousand operations. Where :math:`K \le`
:data:`ENUMERATION_MAX_K` and the host cannot read the device for free (see
:func:`~balanced_losses._numerics.host_shortcuts`), the solvers instead build the face system of
*every* face at once (:math:`2^K` masked systems, one batched ``solve_ex``), make each face's
minimizer feasible, and keep the one with the least objective (:func:`_least`): some forty
operations whatever :math:`K`. This is exact for the same reason the active-set method is: the
optimum lies in the relative interior of one face (its support), where it is that face's
minimizer; every other candidate, once made feasible, is a feasible point, so its objective is at
least the optimum's. The programs here are strictly convex (the callers add a ridge), so the least
objective is attained at the optimum alone, and no tolerance decides anything. On the CPU the
sweeps with their early exit stay cheaper (0.3 ms against 2.4 ms for UPGrad's ten programs at
:math:`K = 10`), so the CPU keeps them.

All solves use ``torch.linalg.solve_ex`` (no error check, hence no sync) in the working dtype
of :func:`~balanced_losses._numerics.wide_dtype` (float64; float32 on MPS, which has none):
the systems are :math:`K \times K`, so float64 costs nothing measurable even on a GPU, and
UPGrad's regularized Gramian has a condition number up to :math:`10^4`, where float32 would
leave about three correct digits.

References:
    Nocedal, Wright. Numerical Optimization, 2nd ed. Springer 2006, Sec. 16.5.

    Lawson, Hanson. Solving Least Squares Problems. Prentice-Hall 1974, Ch. 23.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from balanced_losses._numerics import host_shortcuts, settled

__all__ = [
    "ENUMERATION_MAX_K",
    "bound_qp",
    "normalize_gramian",
    "simplex_qp",
    "simplex_soc",
    "sweeps",
]

# A face solver: (free set, current iterate) -> (face minimizer, multipliers of the fixed
# coordinates at that minimizer); the multipliers matter only where the minimizer is feasible.
_Face = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def sweeps(k: int) -> int:
    """The fixed sweep budget for ``k`` tasks: ``2k + 4``.

    A primal active-set method that starts from the full free set (as all solvers here do)
    needs one sweep per coordinate it drops or adds; on random and adversarial Gramians up to
    :math:`K = 40` (tests/test_aggregation_qp.py) the optimum was reached within
    :math:`K + 2` sweeps, so :math:`2K + 4` leaves a wide margin.
    """
    return 2 * k + 4


def normalize_gramian(gramian: Tensor) -> Tensor:
    r"""Divide a ``(K, K)`` PSD Gramian by its trace, :math:`\lVert J \rVert_F^2`.

    Every entry of a PSD matrix is bounded by its trace (:math:`|G_{ij}| \le
    \sqrt{G_{ii} G_{jj}}`), so the quotient cannot overflow; a zero trace (all gradients zero)
    gives the zero matrix instead of NaN (a division by infinity). The methods here are
    invariant to this scale, and a trace of 1 lets the solvers' tolerances be absolute.
    """
    trace = gramian.trace()
    return gramian / torch.where(trace > 0, trace, torch.inf)


#: The accelerator path solves programs in at most this many weights by enumerating their faces:
#: :math:`2^{10}` systems of :math:`10 \times 10` (for UPGrad's ten programs, 8 MB in float64) are
#: one small batched solve; beyond that the count doubles with each task and the sweeps win.
ENUMERATION_MAX_K = 10


def _enumerates(q: Tensor) -> bool:
    """Whether the solvers take the face enumeration for this ``(K, K)`` matrix (see above)."""
    return q.shape[-1] <= ENUMERATION_MAX_K and not host_shortcuts(q)


def _all_faces(k: int, device: torch.device, *, empty: bool) -> Tensor:
    """Every subset of ``range(k)``: a ``(2**k, k)`` bool mask, the empty set first.

    Without the empty set (``empty=False``) it is ``(2**k - 1, k)``.
    """
    bit = torch.arange(2, device=device)
    faces = torch.cartesian_prod(*[bit] * k).bool()
    if k == 1:  # cartesian_prod of one tensor is that tensor
        faces = faces[:, None]
    return faces if empty else faces[1:]


def _least(candidates: Tensor, objective: Tensor) -> Tensor:
    """The row of ``candidates`` ``(..., M, K)`` whose ``objective`` ``(..., M)`` is least.

    A NaN objective (a singular face system's, or a candidate with nothing left once made
    feasible) never wins over a number.
    """
    best = objective.nan_to_num(nan=torch.inf).argmin(-1, keepdim=True)
    return torch.take_along_dim(candidates, best[..., None], dim=-2).squeeze(-2)


def _onto_simplex(w: Tensor) -> Tensor:
    """``w`` clamped at 0 and rescaled to sum 1: a feasible point (NaN if nothing is left)."""
    clamped = w.clamp(min=0.0)
    return clamped / clamped.sum(-1, keepdim=True)


def _tolerance(dtype: torch.dtype) -> float:
    """Multiplier threshold below which a fixed coordinate joins the free set (trace-1 scale)."""
    return 1e3 * torch.finfo(dtype).eps


def _active_set(x: Tensor, free: Tensor, face: _Face, num_sweeps: int) -> Tensor:
    """Primal active-set sweeps from the feasible ``x`` (``x >= 0``) with free set ``free``."""
    tol = _tolerance(x.dtype)
    inf = torch.full_like(x, torch.inf)
    for _ in range(num_sweeps):
        z, mu = face(free, x)
        # Ratio test (Nocedal & Wright, Eq. 16.41): the largest step towards z keeping x >= 0.
        infeasible = free & (z < 0)
        ratio = torch.where(infeasible, x / torch.where(infeasible, x - z, 1.0), inf)
        alpha = ratio.amin(-1, keepdim=True).clamp(max=1.0)
        blocked = infeasible & (ratio <= alpha)
        stepped = torch.where(blocked, 0.0, (x + alpha * (z - x)).clamp(min=0.0))
        # At a feasible face minimizer the fixed coordinate with the most negative multiplier
        # joins the free set (Eq. 16.42); none does once all are >= -tol: x is optimal.
        mu_fixed = torch.where(free, inf, mu)
        best = mu_fixed.amin(-1, keepdim=True)
        add = (mu_fixed <= best) & (best < -tol)
        any_infeasible = infeasible.any(-1, keepdim=True)
        new_x = torch.where(any_infeasible, stepped, z.clamp(min=0.0))
        new_free = torch.where(any_infeasible, free & ~blocked, free | add)
        done = settled((new_x == x).all() & (new_free == free).all())
        x, free = new_x, new_free
        if done:
            break
    return x


def _masked_matrix(q: Tensor, free: Tensor) -> Tensor:
    """``q`` restricted to ``free`` x ``free``, with an identity row for each fixed coordinate."""
    both = free[..., :, None] & free[..., None, :]
    return torch.where(both, q, torch.eye(q.shape[-1], dtype=q.dtype, device=q.device))


def bound_qp(q: Tensor, c: Tensor, num_sweeps: int) -> Tensor:
    r"""Solve :math:`\min_{x \ge 0} \tfrac12 x^\top Q x + c^\top x` for a positive definite Q.

    Args:
        q: The matrix :math:`Q`, ``(K, K)``, symmetric positive definite.
        c: The linear terms, ``(..., K)``: one program per leading index, all sharing :math:`Q`.
        num_sweeps: Active-set sweeps (see :func:`sweeps`).

    Returns:
        The minimizers, shaped like ``c``.
    """

    def face(free: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        rhs = torch.where(free, -c, 0.0)
        z = torch.linalg.solve_ex(_masked_matrix(q, free), rhs.unsqueeze(-1))[0].squeeze(-1)
        # The gradient Qz + c is the multiplier of each bound x_i >= 0 held active.
        return z, z @ q + c

    if _enumerates(q):
        # Face F: Q_FF x_F = -c_F, x = 0 elsewhere; made feasible by clamping at 0.
        free = _all_faces(q.shape[-1], q.device, empty=True)
        rhs = torch.where(free[..., None], -c[..., None, :, None], 0.0)
        x = torch.linalg.solve_ex(_masked_matrix(q, free), rhs)[0].squeeze(-1).clamp(min=0.0)
        return _least(x, ((0.5 * x @ q + c[..., None, :]) * x).sum(-1))
    # Start at x = 0 with every coordinate free: the first sweeps drop, at no cost in
    # objective, the coordinates that the unconstrained minimizer would push below 0.
    x = torch.zeros_like(c)
    return _active_set(x, torch.zeros_like(c, dtype=torch.bool), face, num_sweeps)


def _simplex_kkt(q: Tensor, free: Tensor) -> Tensor:
    r"""KKT matrix :math:`\begin{bmatrix} Q_{FF} & 1_F \\ 1_F^\top & 0 \end{bmatrix}` of a face."""
    top = torch.cat([_masked_matrix(q, free), free.to(q.dtype).unsqueeze(-1)], dim=-1)
    bottom = torch.cat([free.to(q.dtype), torch.zeros_like(free[..., :1], dtype=q.dtype)], -1)
    return torch.cat([top, bottom.unsqueeze(-2)], dim=-2)


def simplex_qp(q: Tensor, num_sweeps: int) -> Tensor:
    r"""Solve :math:`\min_{w \in \Delta} \tfrac12 w^\top Q w` for a positive definite Q.

    :math:`\Delta = \{w \ge 0,\ \sum_i w_i = 1\}`. On a face :math:`F` the minimizer solves
    :math:`Q_{FF} w_F + \nu 1_F = 0,\ 1^\top w_F = 1`, and :math:`\mu = Qw + \nu 1` are the
    multipliers of the bounds.

    Args:
        q: The matrix :math:`Q`, ``(K, K)``, symmetric positive definite.
        num_sweeps: Active-set sweeps (see :func:`sweeps`).

    Returns:
        The minimizer, ``(K,)``.
    """
    k = q.shape[-1]
    if _enumerates(q):
        # Face F: w_F is proportional to y = Q_FF^{-1} 1_F, whose entries sum to 1^T Q_FF^{-1}
        # 1_F > 0 (Q_FF is positive definite), so making y feasible also normalizes it.
        free = _all_faces(k, q.device, empty=False)
        y = torch.linalg.solve_ex(_masked_matrix(q, free), free[..., None].to(q.dtype))[0]
        w = _onto_simplex(y.squeeze(-1))
        return _least(w, torch.einsum("mi,ij,mj->m", w, q, w))
    rhs = torch.zeros(k + 1, 1, dtype=q.dtype, device=q.device)
    rhs[k] = 1.0

    def face(free: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        sol = torch.linalg.solve_ex(_simplex_kkt(q, free), rhs)[0].squeeze(-1)
        z, nu = sol[:k], sol[k]
        return z, q @ z + nu

    # Start at the barycenter with every coordinate free.
    x = torch.full((k,), 1.0 / k, dtype=q.dtype, device=q.device)
    return _active_set(x, torch.ones_like(x, dtype=torch.bool), face, num_sweeps)


def simplex_soc(q: Tensor, b: Tensor, r: Tensor, num_sweeps: int) -> Tensor:
    r"""Solve :math:`\min_{w \in \Delta} b^\top w + r \sqrt{w^\top Q w}` (CAGrad's dual).

    :math:`Q` positive definite, :math:`b` in its range (CAGrad has :math:`b = Q\,1/K`),
    :math:`r > 0`. The objective is convex but not quadratic, and the active-set method needs
    only each face's exact minimizer, which has a closed form. On a face :math:`F` stationarity
    reads :math:`b_F + \lambda Q_{FF} w_F = \gamma 1_F` with :math:`\lambda = r/\sqrt{w^\top Q
    w}`; writing :math:`s = 1/\lambda`, the solution is affine in :math:`s`,
    :math:`w = w_0 + s w_1`, with :math:`w_0` the face's min-norm point and :math:`w_1` solving
    the same KKT system with right-hand side :math:`(-b_F, 0)`. Since :math:`w_0^\top Q w_1 = 0`
    (:math:`Qw_0` is constant on :math:`F` and :math:`1^\top w_1 = 0`), the consistency
    condition :math:`w^\top Q w = r^2 s^2` gives

    .. math::
        s = \sqrt{\frac{w_0^\top Q w_0}{r^2 - w_1^\top Q w_1}}
        \quad\text{when } r^2 > w_1^\top Q w_1 .

    Otherwise the objective decreases without bound along :math:`w_1` on the face's affine hull
    (:math:`f(w_0 + s w_1) = -s\,w_1^\top Q w_1 + r\sqrt{w_0^\top Q w_0 + s^2 w_1^\top Q w_1}`),
    and the iterate moves along :math:`w_1` to the first bound. Where the face minimizer has
    :math:`Qw = 0` (the objective's kink), the multiplier of a fixed coordinate :math:`i` is the
    directional derivative towards vertex :math:`i`, :math:`b_i + r\sqrt{Q_{ii}}`.

    Args:
        q: The matrix :math:`Q`, ``(K, K)``, symmetric positive definite.
        b: The linear term, ``(K,)``.
        r: The radius :math:`r`, a 0-dim tensor > 0.
        num_sweeps: Active-set sweeps (see :func:`sweeps`).

    Returns:
        The minimizer, ``(K,)``.
    """
    k = q.shape[-1]
    if _enumerates(q):
        # Face F, without the KKT system: with y = Q_FF^{-1} 1_F and z = Q_FF^{-1} b_F,
        # w0 = y / 1^T y and w1 = (1^T z / 1^T y) y - z; then Q w0 = 1_F / 1^T y and
        # Q w1 = (1^T z / 1^T y) 1_F - b_F on F give w0^T Q w0 = 1 / 1^T y and
        # w1^T Q w1 = -b^T w1 (as 1^T w1 = 0). An unbounded face (r^2 <= w1^T Q w1) gets NaN
        # and never wins: the optimum lies on a bounded one.
        free = _all_faces(k, q.device, empty=False)
        rhs = torch.where(free[..., None], torch.stack([torch.ones_like(b), b], dim=-1), 0.0)
        sol = torch.linalg.solve_ex(_masked_matrix(q, free), rhs)[0]
        y, z = sol.unbind(-1)
        sum_y, sum_z = sol.sum(-2, keepdim=True).unbind(-1)
        w0 = y / sum_y
        w1 = sum_z * w0 - z
        s = (sum_y * (r * r + w1 @ b[:, None])).rsqrt()  # sqrt(n0 / (r^2 - n1))
        w = _onto_simplex(torch.addcmul(w0, s, w1))
        norm = torch.einsum("mi,ij,mj->m", w, q, w).sqrt()
        return _least(w, torch.addcmul(w @ b, r, norm))
    zero = torch.zeros(1, dtype=q.dtype, device=q.device)
    one = torch.ones(1, dtype=q.dtype, device=q.device)
    kink_mu = b + r * q.diagonal().clamp(min=0.0).sqrt()
    tiny = torch.finfo(q.dtype).tiny

    def face(free: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        rhs = torch.stack(
            [torch.cat([torch.zeros_like(b), one]), torch.cat([torch.where(free, -b, 0.0), zero])],
            dim=-1,
        )
        sol = torch.linalg.solve_ex(_simplex_kkt(q, free), rhs)[0]
        w0, w1 = sol[:k, 0], sol[:k, 1]
        nu0, nu1 = sol[k, 0], sol[k, 1]
        n0 = (w0 @ q @ w0).clamp(min=0.0)
        n1 = (w1 @ q @ w1).clamp(min=0.0)
        bounded = r * r > n1
        s = torch.sqrt(n0 / torch.where(bounded, r * r - n1, 1.0))
        stationary = w0 + s * w1
        # Unbounded face: the target x + (2 tau + 1) w1 lies beyond the first bound at distance
        # tau along w1, so the ratio test stops exactly there (see the docstring).
        shrink = torch.where(w1 < 0, x / torch.where(w1 < 0, -w1, 1.0), torch.inf)
        tau = shrink.amin().clamp(max=1.0 / tiny)
        z = torch.where(bounded, stationary, x + (2.0 * tau + 1.0) * w1)
        # Multipliers scaled by s > 0 (the sign is what counts): s b + Q z + (nu0 + s nu1) 1.
        scaled = s * b + q @ stationary + (nu0 + s * nu1)
        mu = torch.where(s > 0, scaled / torch.where(s > 0, s, 1.0), kink_mu)
        return z, mu

    x = torch.full((k,), 1.0 / k, dtype=q.dtype, device=q.device)
    return _active_set(x, torch.ones_like(x, dtype=torch.bool), face, num_sweeps)
