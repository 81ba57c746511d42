"""Gramian-based aggregators (UPGrad, MGDA, CAGrad): TorchJD 0.18, closed forms, exact QPs."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from balanced_losses import _numerics
from balanced_losses.aggregation import cagrad_weights, mgda_weights, upgrad_weights
from balanced_losses.features import _qp
from balanced_losses.features._qp import bound_qp, simplex_qp, simplex_soc, sweeps
from tests.asserts import NoSync


@pytest.fixture(autouse=True)
def _accelerator_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Check the fixed-budget path an accelerator runs, not the CPU's early exits and LAPACK.

    tests/test_aggregators.py checks that both paths give the same weights.
    """
    monkeypatch.setattr(_numerics, "HOST_SHORTCUTS", False)


quadprog = pytest.importorskip("quadprog")
aggregation = pytest.importorskip("torchjd.aggregation")

F64 = torch.float64
WEIGHTS: dict[str, Callable[[Tensor], Tensor]] = {
    "upgrad": upgrad_weights,
    "mgda": mgda_weights,
    "cagrad": cagrad_weights,
}


def _jacobian(kind: str, k: int, n: int) -> Tensor:
    """A (k, n) float64 Jacobian of the named kind, with some shared direction (conflicts mixed
    with agreement, as between real tasks)."""
    jac = torch.randn(k, n, dtype=F64) + 0.5 * torch.randn(1, n, dtype=F64)
    if kind == "rank_deficient":  # the last rows are combinations of the first two
        jac[2:] = torch.randn(k - 2, 2, dtype=F64) @ jac[:2]
    elif kind == "zero_row":
        jac[1] = 0.0
    elif kind == "duplicate":
        jac[-1] = jac[0]
    return jac


JACOBIANS = [
    pytest.param("random", 1, 5, id="K1"),
    pytest.param("random", 2, 5, id="K2"),
    pytest.param("random", 3, 2, id="K3-n2-wide"),
    pytest.param("random", 5, 30, id="K5"),
    pytest.param("random", 16, 40, id="K16"),
    pytest.param("random", 16, 6, id="K16-n6-rank6"),
    pytest.param("rank_deficient", 6, 20, id="K6-rank2"),
    pytest.param("zero_row", 4, 10, id="K4-zero-row"),
    pytest.param("duplicate", 5, 10, id="K5-duplicate-rows"),
]


def _relative_error(ours: Tensor, ref: Tensor) -> float:
    return float((ours - ref).norm() / ref.norm().clamp(min=1e-300))


# --- Against TorchJD 0.18 ----------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "k", "n"), JACOBIANS)
def test_upgrad_matches_torchjd(kind: str, k: int, n: int) -> None:
    """UPGrad() with its default QuadprogProjector(norm_eps=1e-4, reg_eps=1e-4); worst measured
    relative error on the vector over these cases (3 draws each): 6e-12."""
    jac = _jacobian(kind, k, n)
    torch.testing.assert_close(
        upgrad_weights(jac @ jac.T) @ jac, aggregation.UPGrad()(jac), rtol=1e-5, atol=1e-12
    )


def test_upgrad_matches_torchjd_with_a_preference() -> None:
    jac = _jacobian("random", 4, 9)
    pref = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=F64)
    torch.testing.assert_close(
        upgrad_weights(jac @ jac.T, pref) @ jac,
        aggregation.UPGrad(pref_vector=pref)(jac),
        rtol=1e-5,
        atol=1e-12,
    )


@pytest.fixture
def tight_clarabel(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run TorchJD's CAGrad with Clarabel's tolerances tightened from ~1e-8 to 1e-11.

    At its defaults TorchJD's w* is only accurate to ~1e-5 (measured: our exact w* reaches an
    objective 1e-10 lower than its), so the vectors differ by up to ~8e-5: see
    `test_cagrad_close_to_default_torchjd`.
    """
    cp = pytest.importorskip("cvxpy")
    solve = cp.Problem.solve

    def tight(self: object, *args: object, **kwargs: object) -> object:
        kwargs.update(tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
        return solve(self, *args, **kwargs)

    monkeypatch.setattr(cp.Problem, "solve", tight)


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate:UserWarning")
@pytest.mark.usefixtures("tight_clarabel")
@pytest.mark.parametrize(("kind", "k", "n"), JACOBIANS)
def test_cagrad_matches_torchjd(kind: str, k: int, n: int) -> None:
    """CAGrad(c=0.4) (norm_eps=1e-4), its CLARABEL call tightened; worst measured relative
    error on the vector (3 draws per case): 9.6e-7."""
    jac = _jacobian(kind, k, n)
    ref = aggregation.CAGrad(c=0.4)(jac)
    # 1e-5 relative on the vector: atol scales with its norm, so a tiny entry is not held to
    # 1e-5 of itself.
    tol = 1e-5 * float(ref.norm())
    torch.testing.assert_close(cagrad_weights(jac @ jac.T, c=0.4) @ jac, ref, rtol=1e-5, atol=tol)


def test_cagrad_close_to_default_torchjd() -> None:
    """Untouched TorchJD (default Clarabel tolerances): within 3e-4 (measured worst 7.7e-5;
    4.3e-5 over the JACOBIANS cases)."""
    for k, n in [(3, 7), (10, 20), (16, 40)]:
        jac = _jacobian("random", k, n)
        ours = cagrad_weights(jac @ jac.T, c=0.5) @ jac
        assert _relative_error(ours, aggregation.CAGrad(c=0.5)(jac)) < 3e-4


@pytest.mark.parametrize(("kind", "k", "n"), JACOBIANS)
def test_mgda_matches_torchjd_and_quadprog(kind: str, k: int, n: int) -> None:
    """Two references. (1) quadprog, exact: min w^T G w over the simplex (G / tr G plus a 1e-13
    ridge so that quadprog accepts singular G), vector to 1e-7 relative (measured worst
    1.3e-10 of ||J||_F).
    (2) TorchJD's MGDA(epsilon=1e-9, max_iters=3000): Frank-Wolfe converges as O(1/t), so even
    this budget leaves up to 1.2e-3 of ||J||_F on the vector (measured); only 2e-2 relative
    can be asserted. A zero row puts 0 in the hull: the exact vector is 0, checked with an
    absolute tolerance."""
    jac = _jacobian(kind, k, n)
    gram = jac @ jac.T
    ours = mgda_weights(gram) @ jac
    exact = torch.from_numpy(_quadprog_simplex(gram.numpy())) @ jac
    scale = float(jac.norm())
    torch.testing.assert_close(ours, exact, rtol=1e-7, atol=1e-9 * scale)
    frank_wolfe = aggregation.MGDA(epsilon=1e-9, max_iters=3000)(jac)
    torch.testing.assert_close(ours, frank_wolfe, rtol=2e-2, atol=1e-3 * scale)


# --- Closed forms for K = 2, float64 -------------------------------------------------------------


@pytest.mark.parametrize(
    "jac",
    [
        pytest.param([[1.0, 0.0], [0.0, 3.0]], id="orthogonal"),
        pytest.param([[1.0, 0.0], [-1.0, 1.0]], id="conflicting"),
        pytest.param([[1.0, 0.0], [4.0, 1.0]], id="clipped-at-vertex"),
    ],
)
def test_mgda_two_tasks_closed_form(jac: list[list[float]]) -> None:
    # Sener & Koltun 2018, Algorithm 1: min_a ||a g1 + (1-a) g2||^2 over [0, 1] has
    # a = clip((g2 - g1).g2 / ||g1 - g2||^2, 0, 1), i.e. (G22 - G12) / (G11 + G22 - 2 G12).
    j = torch.tensor(jac, dtype=F64)
    g = j @ j.T
    a = ((g[1, 1] - g[0, 1]) / (g[0, 0] + g[1, 1] - 2 * g[0, 1])).clamp(0.0, 1.0)
    torch.testing.assert_close(mgda_weights(g), torch.stack([a, 1 - a]), rtol=1e-9, atol=1e-12)


def test_mgda_two_tasks_values() -> None:
    # g1 = (1, 0), g2 = (4, 1): (G22 - G12)/(G11 + G22 - 2 G12) = (17 - 4)/(1 + 17 - 8) = 1.3,
    # clipped to 1: the min-norm point is g1 itself.
    j = torch.tensor([[1.0, 0.0], [4.0, 1.0]], dtype=F64)
    torch.testing.assert_close(
        mgda_weights(j @ j.T), torch.tensor([1.0, 0.0], dtype=F64), rtol=0, atol=1e-12
    )


def test_upgrad_two_conflicting_tasks_closed_form() -> None:
    # g1 = (1, 0), g2 = (-1, 1): G = [[1, -1], [-1, 2]], tr G = 3, p = (1/2, 1/2). Program 1,
    # min v^T G~ v s.t. v >= (p, 0) with G~ = G/3 + eps I: v1 = p is active and v2 minimizes
    # G~22 v2^2 + 2 G~12 p v2, so v2 = -G12 p / (G22 + 3 eps) > 0. Symmetrically program 2 gives
    # v1 = -G12 p / (G11 + 3 eps). Hence w = (1/2 + 1/(2 (1 + 3 eps)), 1/2 + 1/(2 (2 + 3 eps))),
    # which for eps = 0 is (1, 3/4): pi(g1) = g1 + g2/2 = (1/2, 1/2), pi(g2) = g1 + g2 = (0, 1),
    # both orthogonal to the other task, and their mean (1/4, 3/4) = 1 g1 + 3/4 g2.
    j = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=F64)
    eps = 1e-4
    expected = torch.tensor([0.5 + 0.5 / (1 + 3 * eps), 0.5 + 0.5 / (2 + 3 * eps)], dtype=F64)
    torch.testing.assert_close(upgrad_weights(j @ j.T), expected, rtol=1e-12, atol=0)


def test_upgrad_two_orthogonal_tasks_is_the_mean() -> None:
    # Orthogonal gradients already lie in each other's dual cone (g1.g2 = 0 >= 0), and G~ is
    # diagonal, so each program's minimizer is its lower bound: w = p exactly, for any eps.
    j = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.5]], dtype=F64)
    torch.testing.assert_close(
        upgrad_weights(j @ j.T), torch.tensor([0.5, 0.5], dtype=F64), rtol=0, atol=1e-15
    )


def test_cagrad_two_aligned_tasks_closed_form() -> None:
    # g1 = a g, g2 = b g with 0 < a < b: g0 = (a + b)/2 g and every g_w = (w1 a + w2 b) g is a
    # positive multiple of g, so g_w.g0 + r ||g_w|| is smallest at the shortest, w* = e1 with
    # ||g_w*|| = a ||g||; r = c ||g0|| = c (a + b)/2 ||g||, so w = (1/2 + c (a + b) / (2 a), 1/2)
    # and d = (1 + c) g0: the ball's farthest point along g0. a = 1, b = 3, c = 0.4: (1.3, 0.5).
    g = torch.tensor([[0.6, 0.8]], dtype=F64)
    j = torch.cat([1.0 * g, 3.0 * g])
    torch.testing.assert_close(
        cagrad_weights(j @ j.T, c=0.4), torch.tensor([1.3, 0.5], dtype=F64), rtol=1e-10, atol=0
    )


# --- Solver accuracy against exact QP solutions ------------------------------------------------


def _quadprog_simplex(gram: np.ndarray, ridge: float = 1e-13) -> np.ndarray:
    k = gram.shape[0]
    g = gram / max(np.trace(gram), 1e-300) + ridge * np.eye(k)
    constraints = np.hstack([np.ones((k, 1)), np.eye(k)])
    bounds = np.hstack([[1.0], np.zeros(k)])
    return quadprog.solve_qp(g, np.zeros(k), constraints, bounds, meq=1)[0]


def _random_psd(k: int, rank: int, rng: np.random.Generator) -> np.ndarray:
    a = rng.standard_normal((k, rank)) + 0.5 * rng.standard_normal((1, rank))
    a *= np.exp(rng.uniform(-2.0, 2.0, (k, 1)))  # task gradients of very different norms
    return a @ a.T


# K <= ENUMERATION_MAX_K (10) runs the face enumeration, larger K the active-set sweeps.
PSD_CASES = [(k, rank) for k in (2, 3, 5, 8, 10, 12, 20) for rank in sorted({k, max(1, k // 2), 2})]


def test_bound_qp_matches_quadprog() -> None:
    """UPGrad's K programs (G / tr G + 1e-4 I) per Gramian; worst relative error on v found
    over these Gramians: 5.9e-14 (bound asserted: 1e-10)."""
    rng = np.random.default_rng(0)
    worst = 0.0
    for k, rank in PSD_CASES:
        g = _random_psd(k, rank, rng)
        g = g / np.trace(g) + 1e-4 * np.eye(k)
        for i in range(k):
            u = np.zeros(k)
            u[i] = 1.0 / k
            exact = quadprog.solve_qp(g, np.zeros(k), np.eye(k), u)[0]
            x = bound_qp(torch.from_numpy(g), torch.from_numpy(g @ u)[None], sweeps(k))[0]
            ours = u + x.numpy()
            worst = max(worst, float(np.linalg.norm(ours - exact) / np.linalg.norm(exact)))
    assert worst < 1e-10, worst


def _onto_simplex(w: np.ndarray) -> np.ndarray:
    """A reference solver's weights made feasible: negatives set to 0, then rescaled to sum 1.

    quadprog (Goldfarb-Idnani) meets its constraints only up to rounding, and how far depends on
    the BLAS build: weights of -2.6e-11 and -3.9e-12 were seen with OpenBLAS 0.3.30's Haswell
    kernel. Its objective can then fall below the feasible optimum, which no feasible point
    reaches. The repaired point is feasible, so its objective is at or above the optimum.
    """
    clipped = np.clip(w, 0.0, None)
    return clipped / clipped.sum()


def test_simplex_qp_matches_quadprog() -> None:
    """MGDA's program; the error is measured on the vector relative to ||J||_F, ||J^T (w - w*)||
    / ||J||_F = sqrt((w - w*)^T G (w - w*)) with tr G = 1 (w itself is not unique for singular G,
    and the min-norm vector is 0 when 0 is in the hull). Worst found: 3.3e-11 (bound
    asserted: 1e-7).

    The objectives are compared between feasible points only: ours, and quadprog's made
    feasible (`_onto_simplex`). Ours may exceed that by our own solver's accuracy, 1e-12 with
    tr G = 1 (its vector error of 3.3e-11 squared is far below)."""
    rng = np.random.default_rng(1)
    worst = 0.0
    for k, rank in PSD_CASES:
        g = _random_psd(k, rank, rng)
        g = g / np.trace(g)
        exact = _onto_simplex(_quadprog_simplex(g))
        ours = simplex_qp(torch.from_numpy(g + 1e-12 * np.eye(k)), sweeps(k)).numpy()
        assert ours.min() >= 0.0
        assert abs(ours.sum() - 1.0) < 1e-12
        assert ours @ g @ ours <= exact @ g @ exact + 1e-12, (k, rank)
        diff = ours - exact
        worst = max(worst, math.sqrt(max(diff @ g @ diff, 0.0)))
    assert worst < 1e-7, worst


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate:UserWarning")
def test_simplex_soc_matches_clarabel() -> None:
    """CAGrad's dual against Clarabel at 1e-11 tolerances. Clarabel's own w* is accurate to
    ~1e-7 only, so the check is on objective values of feasible points, both computed here from
    G: ours is never worse than Clarabel's made feasible (`_onto_simplex`) by more than 1e-11
    relative (measured worst: 2.7e-12 above, from the different ridges)."""

    def objective(w: np.ndarray) -> float:
        return float(b @ w + r * math.sqrt(max(w @ g @ w, 0.0)))

    cp = pytest.importorskip("cvxpy")
    rng = np.random.default_rng(2)
    for k, rank in PSD_CASES:
        g = _random_psd(k, rank, rng)
        g = g / np.trace(g)
        b = g.mean(1)
        r = 0.4 * math.sqrt(b.mean())
        w = cp.Variable(k)
        root = np.linalg.cholesky(g + 1e-13 * np.eye(k))
        problem = cp.Problem(cp.Minimize(b @ w + r * cp.norm(root.T @ w)), [w >= 0, cp.sum(w) == 1])
        problem.solve(cp.CLARABEL, tol_gap_abs=1e-11, tol_gap_rel=1e-11, tol_feas=1e-11)
        ours = simplex_soc(
            torch.from_numpy(g + 1e-12 * np.eye(k)), torch.from_numpy(b), torch.tensor(r), sweeps(k)
        ).numpy()
        reference = objective(_onto_simplex(np.asarray(w.value)))
        assert ours.min() >= 0.0
        assert objective(ours) <= reference + 1e-11 * abs(reference) + 1e-14, (k, rank)


# --- The two accelerator paths: face enumeration (K <= 10) and active-set sweeps ----------------


@pytest.mark.parametrize("k", [1, 2, 3, 5, 10])
def test_all_faces_lists_every_subset_once(k: int) -> None:
    for empty in (True, False):
        faces = _qp._all_faces(k, torch.device("cpu"), empty=empty)
        codes = {tuple(row.tolist()) for row in faces}
        assert faces.dtype == torch.bool
        assert faces.shape == (2**k - (not empty), k)
        assert len(codes) == faces.shape[0]
        assert ((False,) * k in codes) == empty


@pytest.mark.parametrize("kind", ["random", "rank_deficient", "zero_row", "duplicate"])
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_enumeration_equals_the_sweeps(
    name: str, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both accelerator paths give one aggregate for K = 3 ... 10 (the enumeration's range):
    the weights themselves where the program is well conditioned (UPGrad's ridge of 1e-4), the
    vector w^T J for MGDA and CAGrad (a ridge of 1e-12 leaves w loose along G's null space)."""
    torch.manual_seed(3)
    for k in range(3, _qp.ENUMERATION_MAX_K + 1):
        jac = _jacobian(kind, k, 12)
        gram = jac @ jac.T
        enumerated = WEIGHTS[name](gram)
        with monkeypatch.context() as patch:
            patch.setattr(_qp, "ENUMERATION_MAX_K", 0)
            swept = WEIGHTS[name](gram)
        scale = float(jac.norm())
        if name == "upgrad":
            torch.testing.assert_close(enumerated, swept, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(enumerated @ jac, swept @ jac, rtol=0, atol=1e-7 * scale)


# --- Edge cases, dtypes, scale -------------------------------------------------------------------


@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("scale", [1e-30, 1e-8, 1e8, 1e30], ids=lambda s: f"scale{s:g}")
def test_scale_invariance(name: str, scale: float) -> None:
    # All three are invariant to G -> s G; TorchJD's UPGrad and CAGrad are not below
    # tr G = 1e-4 (an absolute threshold we replace by a relative one).
    jac = _jacobian("random", 5, 8)
    gram = jac @ jac.T
    fn = WEIGHTS[name]
    torch.testing.assert_close(fn(scale * gram), fn(gram), rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_float32_input_gives_float32_weights_close_to_float64(name: str) -> None:
    jac = _jacobian("random", 6, 12)
    gram = jac @ jac.T
    ours = WEIGHTS[name](gram.float())
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours.double(), WEIGHTS[name](gram), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("upgrad", [1.0]), ("mgda", [1.0]), ("cagrad", [1.4])],
    ids=["upgrad", "mgda", "cagrad"],
)
def test_single_task_matches_torchjd(name: str, expected: list[float]) -> None:
    # TorchJD: UPGrad and MGDA give weight 1 for K = 1; CAGrad(c) gives 1 + c (g_w = g0).
    gram = torch.tensor([[2.5]], dtype=F64)
    torch.testing.assert_close(
        WEIGHTS[name](gram), torch.tensor(expected, dtype=F64), rtol=1e-12, atol=0
    )


def test_all_zero_gramian() -> None:
    zero = torch.zeros(3, 3, dtype=F64)
    third = torch.full((3,), 1 / 3, dtype=F64)
    torch.testing.assert_close(upgrad_weights(zero), third, rtol=0, atol=0)  # TorchJD: p
    torch.testing.assert_close(mgda_weights(zero), third, rtol=0, atol=1e-15)
    torch.testing.assert_close(cagrad_weights(zero), torch.zeros(3, dtype=F64), rtol=0, atol=0)


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_finite_on_degenerate_psd_inputs(name: str) -> None:
    g = torch.randn(1, 4, dtype=F64)
    cases = [
        torch.cat([g, -g, 2 * g]),  # rank 1 with opposite rows: 0 in the hull
        torch.cat([g, g, g]),  # identical rows
        torch.cat([g, torch.zeros_like(g), torch.zeros_like(g)]),  # one nonzero row
        torch.cat([g, 1e-150 * torch.randn(1, 4, dtype=F64), g]),  # a tiny row
    ]
    for jac in cases:
        w = WEIGHTS[name](jac @ jac.T)
        assert bool(torch.isfinite(w).all()), (name, jac)


def test_opposite_gradients() -> None:
    # g and -g: MGDA's min-norm point is 0 at w = (1/2, 1/2); CAGrad is then at the Pareto
    # front (||g_w*|| = 0 < 1e-4), weights 0 as in TorchJD; UPGrad projects both onto {g.x = 0}.
    jac = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=F64)
    gram = jac @ jac.T
    zero = torch.zeros(2, dtype=F64)
    torch.testing.assert_close(mgda_weights(gram) @ jac, zero, rtol=0, atol=1e-9)
    torch.testing.assert_close(cagrad_weights(gram), torch.zeros(2, dtype=F64), rtol=0, atol=0)
    torch.testing.assert_close(
        upgrad_weights(gram) @ jac, aggregation.UPGrad()(jac), rtol=1e-5, atol=1e-12
    )


@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_non_finite_gramian_neither_raises_nor_syncs(name: str, bad: float) -> None:
    # Documented: nothing is checked (that would sync) and the weights are then NaN or
    # meaningless (UPGrad, whose active set never grows, returns p); the caller guards.
    gram = torch.tensor([[1.0, bad], [bad, 1.0]], dtype=F64)
    with NoSync():
        w = WEIGHTS[name](gram)
    assert w.shape == (2,)
    assert w.dtype == F64


def test_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match=r"`gramian` must be a square \(K, K\).*\(2, 3\)"):
        upgrad_weights(torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"`pref` must have shape \(2,\).*\(3,\)"):
        upgrad_weights(torch.eye(2), torch.ones(3))
    with pytest.raises(ValueError, match=r"`c` must be a finite number >= 0, got -1.0"):
        cagrad_weights(torch.eye(2), c=-1.0)


def test_cagrad_c_zero_is_the_mean() -> None:
    jac = _jacobian("random", 3, 4)
    torch.testing.assert_close(
        cagrad_weights(jac @ jac.T, c=0.0), torch.full((3,), 1 / 3, dtype=F64), rtol=0, atol=0
    )


# --- No host-device sync; torch.compile --------------------------------------------------------


def test_no_sync_guard_catches_item() -> None:
    # The guard is real: the ops behind .item() and a boolean mask are caught.
    t = torch.tensor([1.0, -1.0])
    with pytest.raises(AssertionError, match="_local_scalar_dense"), NoSync():
        t.sum().item()
    with pytest.raises(AssertionError, match="nonzero"), NoSync():
        torch.nonzero(t)
    with pytest.raises(AssertionError, match="boolean mask"), NoSync():
        t[t > 0]
    with pytest.raises(AssertionError, match="_local_scalar_dense"), NoSync():
        bool(t.sum() > 0)


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_no_host_device_sync(name: str) -> None:
    jac = _jacobian("duplicate", 5, 7)
    gram = jac @ jac.T
    expected = WEIGHTS[name](gram)
    with NoSync():
        ours = WEIGHTS[name](gram)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(WEIGHTS))
def test_compile_fullgraph_traces(name: str) -> None:
    # Dynamo with fullgraph=True fails on any graph break (a sync, data-dependent control flow);
    # the eager backend keeps this fast. The inductor build is the slow test below.
    torch._dynamo.reset()
    jac = _jacobian("zero_row", 3, 4)
    gram = jac @ jac.T
    compiled = torch.compile(WEIGHTS[name], fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(gram), WEIGHTS[name](gram), rtol=1e-12, atol=1e-14)


@pytest.mark.slow
# Deprecation notices raised inside inductor itself (torch 2.13), not by our code.
@pytest.mark.filterwarnings("ignore:`torch._prims_common.check` is deprecated:FutureWarning")
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_compile_inductor_equals_eager(name: str) -> None:
    torch._dynamo.reset()
    jac = _jacobian("random", 3, 5)
    gram = jac @ jac.T
    compiled = torch.compile(WEIGHTS[name], fullgraph=True)
    torch.testing.assert_close(compiled(gram), WEIGHTS[name](gram), rtol=1e-10, atol=1e-12)
