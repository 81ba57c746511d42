"""Closed-form and Newton Gramian aggregators: PCGrad, IMTL-G, Aligned-MTL, Nash-MTL, FairGrad.

Checked against TorchJD 0.18, against hand-derived K = 2 closed forms, against their defining
equations and numpy's eigensolver, under torch.compile, and under a dispatch mode that fails on
any host-device synchronization.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor

from balanced_losses import _numerics
from balanced_losses.aggregation import (
    aligned_mtl_weights,
    config_weights,
    fairgrad_weights,
    imtlg_weights,
    nash_mtl_weights,
    pcgrad_orders,
    pcgrad_weights,
)
from balanced_losses.features._eigh import default_sweeps, jacobi_eigh, pinv_psd
from tests.asserts import NoSync


@pytest.fixture(autouse=True)
def _accelerator_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Check the fixed-budget path an accelerator runs, not the CPU's early exits and LAPACK.

    tests/test_aggregators.py checks that both paths give the same weights.
    """
    monkeypatch.setattr(_numerics, "HOST_SHORTCUTS", False)


torchjd_aggregation = pytest.importorskip("torchjd.aggregation")

F64 = torch.float64


def _jacobian(kind: str, *, positive: bool = False, seed: int = 0) -> Tensor:
    """A float64 Jacobian of a named shape; ``positive`` mixes with |A| so 0 is not in the hull."""
    gen = torch.Generator().manual_seed(seed)
    k, n, r = {
        "K1": (1, 5, 1),
        "K2": (2, 7, 2),
        "K3": (3, 9, 3),
        "K16": (16, 40, 16),
        "rank-deficient": (6, 30, 3),
        "zero-rows": (5, 12, 5),
        "duplicates": (6, 12, 4),
        "wide": (10, 4, 4),
    }[kind]
    mix = torch.randn(k, r, generator=gen, dtype=F64)
    if positive:
        mix = mix.abs() + 0.1
    jac = mix @ torch.randn(r, n, generator=gen, dtype=F64)
    if kind == "zero-rows":
        jac[1] = 0
        jac[3] = 0
    if kind == "duplicates":
        jac[2] = jac[0]
        jac[4] = jac[0]
    return jac


def _assert_vectors_close(ours: Tensor, theirs: Tensor, rtol: float) -> None:
    """Relative to the reference vector's norm (entries near 0 must not need their own rtol)."""
    scale = float(theirs.norm())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=rtol * max(scale, 1e-300))


def _torchjd(aggregator: Any, jac: Tensor) -> Tensor:
    with warnings.catch_warnings():
        # cvxpy and scipy warn about ill-posed inner problems; the outer answer is what we test.
        warnings.simplefilter("ignore")
        return aggregator(jac)


# --- Against TorchJD 0.18 ------------------------------------------------------------------

ALL_KINDS = ["K1", "K2", "K16", "rank-deficient", "zero-rows", "duplicates", "wide"]


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_imtlg_matches_torchjd(kind: str) -> None:
    jac = _jacobian(kind)
    theirs = _torchjd(torchjd_aggregation.IMTLG(), jac)
    _assert_vectors_close(imtlg_weights(jac @ jac.T) @ jac, theirs, 1e-5)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_config_matches_torchjd(kind: str) -> None:
    jac = _jacobian(kind)
    theirs = _torchjd(torchjd_aggregation.ConFIG(), jac)
    _assert_vectors_close(config_weights(jac @ jac.T) @ jac, theirs, 1e-6)


def test_config_equal_cosines_and_summed_projections() -> None:
    """Eq. 2 of Liu et al. 2025, by hand: equal cosines, length = sum of projections."""
    jac = _jacobian("K3", seed=3)
    d = config_weights(jac @ jac.T) @ jac
    unit = d / d.norm()
    cosines = (jac @ unit) / jac.norm(dim=1)
    torch.testing.assert_close(cosines, cosines.mean().expand(3), rtol=1e-10, atol=0)
    torch.testing.assert_close(d.norm(), (jac @ unit).sum(), rtol=1e-10, atol=0)


def test_config_k2_orthogonal_closed_form() -> None:
    # g1 = (a, 0), g2 = (0, b): the bisector, of length (a + b) / sqrt(2), so
    # d = ((a + b) / 2, (a + b) / 2) and w = ((a + b) / (2 a), (a + b) / (2 b)).
    a, b = 3.0, 0.5
    jac = torch.tensor([[a, 0.0], [0.0, b]], dtype=F64)
    expected = torch.tensor([(a + b) / (2 * a), (a + b) / (2 * b)], dtype=F64)
    torch.testing.assert_close(config_weights(jac @ jac.T), expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_aligned_mtl_matches_torchjd(kind: str) -> None:
    jac = _jacobian(kind)
    theirs = _torchjd(torchjd_aggregation.AlignedMTL(), jac)
    _assert_vectors_close(aligned_mtl_weights(jac @ jac.T) @ jac, theirs, 1e-5)


def test_aligned_mtl_pref_matches_torchjd() -> None:
    jac = _jacobian("rank-deficient")
    pref = torch.tensor([0.5, 0.1, 0.1, 0.1, 0.1, 0.1], dtype=F64)
    theirs = _torchjd(torchjd_aggregation.AlignedMTL(pref_vector=pref), jac)
    _assert_vectors_close(aligned_mtl_weights(jac @ jac.T, pref) @ jac, theirs, 1e-5)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("kind", ALL_KINDS)
def test_fairgrad_matches_torchjd(kind: str, alpha: float) -> None:
    # Positive mixing: zero is not a convex combination of the rows, so a solution exists.
    jac = _jacobian(kind, positive=True)
    # scipy's least_squares (tolerances 1e-8) converges on these; more evaluations than its
    # default 100 K cost nothing when it does.
    theirs = _torchjd(torchjd_aggregation.FairGrad(alpha, max_iters=2000), jac)
    _assert_vectors_close(fairgrad_weights(jac @ jac.T, alpha) @ jac, theirs, 1e-5)


def test_fairgrad_alpha_zero_is_uniform_like_torchjd() -> None:
    jac = _jacobian("K3")
    theirs = _torchjd(torchjd_aggregation.FairGrad(0.0), jac)
    _assert_vectors_close(fairgrad_weights(jac @ jac.T, 0.0) @ jac, theirs, 1e-12)


# TorchJD's NashMTL cannot take K = 1 (cvxpy rejects its scalar matmul) nor a zero row (the
# constraint log((G a)_i) is -inf; it falls back to its previous alpha): both are checked
# against the closed form and the defining equation below instead.
@pytest.mark.parametrize("max_norm", [1.0, 0.0])
@pytest.mark.parametrize("kind", ["K2", "K16", "rank-deficient", "duplicates", "wide"])
def test_nash_mtl_matches_torchjd(kind: str, max_norm: float) -> None:
    jac = _jacobian(kind, positive=True)
    agg = torchjd_aggregation.NashMTL(n_tasks=jac.shape[0], max_norm=max_norm, optim_niter=100)
    theirs = _torchjd(agg, jac)
    _assert_vectors_close(nash_mtl_weights(jac @ jac.T, max_norm=max_norm) @ jac, theirs, 1e-5)


@pytest.mark.parametrize("kind", ["K1", "K2", "no-conflict"])
def test_pcgrad_matches_torchjd_where_order_cannot_matter(kind: str) -> None:
    if kind == "no-conflict":
        # Orthonormal B: G = |A| |A|^T >= 0 entrywise, so no pair conflicts, in any order.
        basis = torch.linalg.qr(torch.randn(20, 6, dtype=F64)).Q.T
        jac = (torch.randn(6, 6, dtype=F64).abs()) @ basis
    else:
        jac = _jacobian(kind)
    theirs = _torchjd(torchjd_aggregation.PCGrad(), jac)
    orders = pcgrad_orders(jac.shape[0], torch.tensor(3), torch.tensor(0))
    _assert_vectors_close(pcgrad_weights(jac @ jac.T, orders) @ jac, theirs, 1e-10)


def test_pcgrad_k2_conflicting_matches_torchjd() -> None:
    jac = torch.tensor([[1.0, 0.2, 0.0], [-0.8, 1.0, 0.5]], dtype=F64)
    theirs = _torchjd(torchjd_aggregation.PCGrad(), jac)
    orders = pcgrad_orders(2, torch.tensor(0), torch.tensor(0))
    _assert_vectors_close(pcgrad_weights(jac @ jac.T, orders) @ jac, theirs, 1e-12)


# --- PCGrad against plain loops over explicit vectors ---------------------------------------


def _pcgrad_reference(jac: Tensor, orders: Tensor) -> Tensor:
    """Algorithm 1 of Yu et al. 2020, on the gradient vectors themselves."""
    total = torch.zeros(jac.shape[1], dtype=F64)
    for i in range(jac.shape[0]):
        g = jac[i].clone()
        for j in orders[i].tolist():
            if j == i:
                continue
            dot = float(g @ jac[j])
            if dot < 0:
                g = g - dot / float(jac[j] @ jac[j]) * jac[j]
        total += g
    return total


@pytest.mark.parametrize("kind", ["K3", "K16", "rank-deficient", "zero-rows", "duplicates", "wide"])
@pytest.mark.parametrize("step", [0, 1, 7])
def test_pcgrad_matches_reference_loops(kind: str, step: int) -> None:
    jac = _jacobian(kind)
    orders = pcgrad_orders(jac.shape[0], torch.tensor(11), torch.tensor(step))
    _assert_vectors_close(
        pcgrad_weights(jac @ jac.T, orders) @ jac, _pcgrad_reference(jac, orders), 1e-10
    )


def test_pcgrad_order_matters_for_k3() -> None:
    # The reference comparison above would be vacuous if the order never changed the result.
    jac = torch.tensor([[1.0, 0.0], [-0.9, 0.5], [-0.2, -1.0]], dtype=F64)
    gram = jac @ jac.T
    first = pcgrad_weights(gram, torch.tensor([[0, 1, 2], [0, 1, 2], [0, 1, 2]]))
    second = pcgrad_weights(gram, torch.tensor([[0, 2, 1], [1, 2, 0], [2, 1, 0]]))
    assert (first - second).abs().max() > 1e-3


# --- PCGrad's orders --------------------------------------------------------------------------


def test_pcgrad_orders_are_reproducible_permutations() -> None:
    seed = torch.tensor(2024)
    a = pcgrad_orders(7, seed, torch.tensor(5))
    b = pcgrad_orders(7, seed, torch.tensor(5))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.dtype == torch.int64
    torch.testing.assert_close(a.sort(dim=1).values, torch.arange(7).expand(7, 7), rtol=0, atol=0)
    steps = torch.stack([pcgrad_orders(7, seed, torch.tensor(s)) for s in range(6)])
    # Different steps (and different seeds) give different orders.
    assert len({tuple(o.flatten().tolist()) for o in steps}) == 6
    assert not torch.equal(pcgrad_orders(7, torch.tensor(2025), torch.tensor(5)), a)
    # Steps past 2^32 use the high counter word.
    assert not torch.equal(pcgrad_orders(7, seed, torch.tensor(5 + 2**32)), a)


def test_pcgrad_orders_are_roughly_uniform() -> None:
    # Over 3000 draws of K = 3, each of the 6 permutations of row 0 appears about 500 times.
    rows = pcgrad_orders(3, torch.tensor(1), torch.arange(3000).view(-1, 1, 1))[:, 0]
    torch.testing.assert_close(rows[17], pcgrad_orders(3, torch.tensor(1), torch.tensor(17))[0])
    _, counts = torch.unique(rows, dim=0, return_counts=True)
    assert counts.numel() == 6
    assert int(counts.min()) > 400
    assert int(counts.max()) < 600


# --- Hand-derived K = 2 closed forms ----------------------------------------------------------
# Throughout, G = [[a, c], [c, b]] with a = |g1|^2, b = |g2|^2, c = g1 . g2.
K2_GRAMIANS = [(4.0, 1.0, -1.5), (2.0, 3.0, 0.5), (1.0, 9.0, 0.0), (5.0, 0.5, -1.2)]


@pytest.mark.parametrize(("a", "b", "c"), K2_GRAMIANS)
def test_k2_closed_forms(a: float, b: float, c: float) -> None:
    gram = torch.tensor([[a, c], [c, b]], dtype=F64)
    sa, sb = math.sqrt(a), math.sqrt(b)

    # PCGrad: on conflict (c < 0), g1^PC = g1 - (c / b) g2 and g2^PC = g2 - (c / a) g1, so the
    # weights of g1 and g2 in the sum are 1 - c / a and 1 - c / b; otherwise 1 and 1.
    pc = [1 - c / a, 1 - c / b] if c < 0 else [1.0, 1.0]
    orders = torch.tensor([[0, 1], [1, 0]])
    torch.testing.assert_close(pcgrad_weights(gram, orders), torch.tensor(pc, dtype=F64))

    # IMTL-G: G^-1 d with d = (sa, sb) is (b sa - c sb, a sb - c sa) / det
    # = (sb (sa sb - c), sa (sa sb - c)) / det, so w = (sb, sa) / (sa + sb).
    imtl = torch.tensor([sb, sa], dtype=F64) / (sa + sb)
    torch.testing.assert_close(imtlg_weights(gram), imtl, rtol=1e-13, atol=0)

    # Aligned-MTL: B = sqrt(lmin) G^-1/2 with lmin = (t - sqrt(t^2 - 4 det)) / 2, t = a + b, and
    # for a 2x2 PD matrix sqrt(G) = (G + s I) / sqrt(t + 2 s), s = sqrt(det) (Cayley-Hamilton).
    det, t = a * b - c * c, a + b
    lmin = (t - math.sqrt(t * t - 4 * det)) / 2
    root = (gram + math.sqrt(det) * torch.eye(2, dtype=F64)) / math.sqrt(t + 2 * math.sqrt(det))
    aligned = math.sqrt(lmin) * torch.linalg.inv(root) @ torch.full((2,), 0.5, dtype=F64)
    torch.testing.assert_close(aligned_mtl_weights(gram), aligned, rtol=1e-12, atol=0)

    # Nash-MTL: a x^2 + c x y = 1 = b y^2 + c x y gives a x^2 = b y^2, y = x sa / sb, and
    # x^2 (a + c sa / sb) = 1: x = sqrt(sb / (sa (sa sb + c))), y = sqrt(sa / (sb (sa sb + c))).
    nash = torch.tensor(
        [math.sqrt(sb / (sa * (sa * sb + c))), math.sqrt(sa / (sb * (sa * sb + c)))], dtype=F64
    )
    torch.testing.assert_close(nash_mtl_weights(gram, max_norm=0.0), nash, rtol=1e-12, atol=0)
    # FairGrad with alpha = 1 is the same equation.
    torch.testing.assert_close(fairgrad_weights(gram, 1.0), nash, rtol=1e-12, atol=0)
    # With max_norm = 1: ||J^T x||^2 = x^T G x = 2 at the solution, so the clip divides by sqrt 2.
    torch.testing.assert_close(nash_mtl_weights(gram), nash / math.sqrt(2), rtol=1e-12, atol=0)


@pytest.mark.parametrize("alpha", [0.5, 2.0, 5.0])
def test_fairgrad_orthogonal_k2_closed_form(alpha: float) -> None:
    # c = 0 decouples the tasks: a w1 = w1^(-1/alpha) gives w1 = a^(-alpha / (1 + alpha)).
    gram = torch.tensor([[4.0, 0.0], [0.0, 0.25]], dtype=F64)
    expected = torch.tensor([4.0, 0.25], dtype=F64).pow(-alpha / (1 + alpha))
    torch.testing.assert_close(fairgrad_weights(gram, alpha), expected, rtol=1e-12, atol=0)


# --- Defining equations and exact references ---------------------------------------------------


def _random_gramians(count: int, kmax: int = 20, seed: int = 0) -> list[Tensor]:
    """PSD Gramians, K in 2..kmax: full rank, rank K/2 and 1, rows scaled over 1e-3..1e3,
    duplicate rows; all with positive mixing (so the power equations have a solution)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for index in range(count):
        k = 2 + index % (kmax - 1)
        rank = [k, max(1, k // 2), 1, k][index % 4]
        mix = torch.randn(k, rank, generator=gen, dtype=F64).abs() + 0.05
        jac = mix @ torch.randn(rank, 30, generator=gen, dtype=F64)
        if index % 3 == 1:
            jac = (
                jac * torch.logspace(-3, 3, k, dtype=F64)[torch.randperm(k, generator=gen)][:, None]
            )
        if index % 5 == 2:
            jac[-1] = jac[0]
        out.append(jac @ jac.T)
    return out


def test_jacobi_eigh_against_numpy() -> None:
    """Worst measured over 38 Gramians (K = 2..20 twice: full rank, rank K/2, rank 1, rows
    graded over 1e-3..1e3, duplicates), float64: eigenvalue error 6.0e-15 ||G||_2,
    reconstruction 1.1e-14 ||G||_F, orthogonality 6.0e-15; asserted 1e-13 each. Float32:
    2.8e-6, 5.2e-6 and 4.2e-6; asserted 1e-5."""
    worst = {"eig": 0.0, "rec": 0.0, "orth": 0.0}
    worst32 = dict(worst)
    for gram in _random_gramians(38):
        k = gram.shape[0]
        ref = np.linalg.eigvalsh(gram.numpy())
        for dtype, record in ((F64, worst), (torch.float32, worst32)):
            lam, vec = jacobi_eigh(gram.to(dtype))
            lam, vec = lam.double(), vec.double()
            record["eig"] = max(
                record["eig"], np.abs(np.sort(lam.numpy()) - ref).max() / np.abs(ref).max()
            )
            record["rec"] = max(
                record["rec"], float(((vec * lam) @ vec.T - gram).norm() / gram.norm())
            )
            record["orth"] = max(
                record["orth"], float((vec.T @ vec - torch.eye(k, dtype=F64)).abs().max())
            )
    assert max(worst.values()) < 1e-13, worst
    assert max(worst32.values()) < 1e-5, worst32


def test_jacobi_sweeps_are_needed() -> None:
    # The budget is not vacuous: two sweeps leave a K = 20 Gramian far from diagonal.
    gram = _random_gramians(57)[56]
    assert gram.shape == (20, 20)
    _, vec = jacobi_eigh(gram, sweeps=2)
    eye = torch.eye(gram.shape[0], dtype=F64)
    assert float((vec.T @ vec - eye).abs().max()) < 1e-13  # rotations: still orthogonal
    off = vec.T @ gram @ vec
    assert float((off - torch.diag(off.diagonal())).norm() / gram.norm()) > 1e-6
    assert default_sweeps(20) == 12


def test_pinv_psd_against_numpy() -> None:
    for gram in _random_gramians(40, seed=1):
        ref = torch.from_numpy(np.linalg.pinv(gram.numpy(), hermitian=True))
        # Both drop eigenvalues below K eps lambda_max; the kept ones are inverted with an
        # error of about eps lambda_max / lambda_min_kept (relative).
        lam = np.abs(np.linalg.eigvalsh(gram.numpy()))
        kept = lam[lam > gram.shape[0] * np.finfo(np.float64).eps * lam.max()]
        rtol = 1e-13 * kept.max() / kept.min()
        torch.testing.assert_close(pinv_psd(gram), ref, rtol=0, atol=rtol * float(ref.abs().max()))


def test_power_equations_hold() -> None:
    """Worst relative residual ||G w - w^(-1/alpha)|| / ||w^(-1/alpha)|| measured over 30
    Gramians (K = 2..20, incl. rank 1 and K/2 and rows graded over 1e-3..1e3) and
    alpha in {0.5, 1, 2, 5}, plus Nash-MTL (unclipped): 1.3e-15. Asserted: 1e-8."""
    worst = 0.0
    for gram in _random_gramians(30, seed=2):
        for alpha in (0.5, 1.0, 2.0, 5.0):
            w = fairgrad_weights(gram, alpha)
            assert bool((w > 0).all())
            rhs = w.pow(-1 / alpha)
            worst = max(worst, float((gram @ w - rhs).norm() / rhs.norm()))
        w = nash_mtl_weights(gram, max_norm=0.0)
        worst = max(worst, float((gram @ w - 1 / w).norm() / (1 / w).norm()))
    assert worst < 1e-8, worst


def test_imtlg_equal_projections() -> None:
    # The defining property: J d has equal projections on the unit task gradients, sum w = 1.
    for gram in _random_gramians(20, seed=3):
        if torch.linalg.matrix_rank(gram) < gram.shape[0]:
            continue
        w = imtlg_weights(gram)
        proj = (gram @ w) / gram.diagonal().sqrt()
        torch.testing.assert_close(proj, proj.mean().expand_as(proj), rtol=1e-9, atol=0)
        torch.testing.assert_close(w.sum(), torch.tensor(1.0, dtype=F64))


def test_aligned_mtl_equalizes_singular_values() -> None:
    # J_hat = B J must have all nonzero singular values equal to J's smallest nonzero one; on
    # a rank-deficient J the rank is kept.
    for kind in ("K16", "rank-deficient", "duplicates"):
        jac = _jacobian(kind)
        gram = jac @ jac.T
        eye = torch.eye(jac.shape[0], dtype=F64)
        balance = torch.stack([aligned_mtl_weights(gram, e) for e in eye], dim=1)
        sv = torch.linalg.svdvals(balance @ jac)
        ref = torch.linalg.svdvals(jac)
        rank = int(torch.linalg.matrix_rank(jac))
        smallest = ref[rank - 1]
        torch.testing.assert_close(sv[:rank], smallest.expand(rank), rtol=1e-10, atol=0)
        rest = torch.cat([sv[rank:], torch.zeros(1, dtype=F64)])
        assert float(rest.abs().max()) < 1e-10 * float(smallest)


# --- Edge cases: K = 1, zero rows, scale, dtypes -------------------------------------------------

GramFn = Callable[[Tensor], Tensor]


def _pcgrad_fixed(gram: Tensor) -> Tensor:
    orders = pcgrad_orders(gram.shape[0], torch.tensor(5), torch.tensor(2), gram.device)
    return pcgrad_weights(gram, orders)


FUNCTIONS: dict[str, GramFn] = {
    "pcgrad": _pcgrad_fixed,
    "config": config_weights,
    "imtlg": imtlg_weights,
    "aligned_mtl": aligned_mtl_weights,
    "nash_mtl": nash_mtl_weights,
    "fairgrad": fairgrad_weights,
    "fairgrad-alpha2": lambda g: fairgrad_weights(g, 2.0),
}
# How the weights change when G is scaled by s: w(s G) = s^power w(G).
SCALE_POWER = {
    "pcgrad": 0.0,
    "config": 0.0,
    "imtlg": 0.0,
    "aligned_mtl": 0.0,
    "nash_mtl": -0.5,
    "fairgrad": -0.5,
    "fairgrad-alpha2": -2.0 / 3.0,
}


@pytest.mark.parametrize("name", FUNCTIONS)
def test_k1(name: str) -> None:
    gram = torch.tensor([[4.0]], dtype=F64)
    expected = {
        "pcgrad": 1.0,
        "config": 1.0,  # the one gradient, at its own length
        "imtlg": 1.0,
        "aligned_mtl": 1.0,
        "nash_mtl": 0.5,  # 4 a = 1 / a; ||J^T a|| = 1, not above max_norm
        "fairgrad": 0.5,
        "fairgrad-alpha2": 4.0 ** (-2 / 3),
    }[name]
    torch.testing.assert_close(FUNCTIONS[name](gram), torch.tensor([expected], dtype=F64))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_zero_gramian_gives_finite_weights(name: str) -> None:
    w = FUNCTIONS[name](torch.zeros(3, 3, dtype=F64))
    assert bool(w.isfinite().all())


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad", "fairgrad-alpha2"])
def test_zero_rows_are_decoupled(name: str) -> None:
    # A zero row gets weight 0 and the others are the solution without it.
    jac = _jacobian("zero-rows", positive=True)
    keep = torch.tensor([0, 2, 4])
    w = FUNCTIONS[name](jac @ jac.T)
    sub = FUNCTIONS[name](jac[keep] @ jac[keep].T)
    torch.testing.assert_close(w[keep], sub, rtol=1e-10, atol=0)
    torch.testing.assert_close(w[torch.tensor([1, 3])], torch.zeros(2, dtype=F64))


@pytest.mark.parametrize("name", ["nash_mtl", "fairgrad"])
def test_pareto_stationary_input_stays_finite(name: str) -> None:
    # g2 = -g1: no solution exists (f unbounded below); the weights stay finite and the
    # aggregate is about 0.
    jac = torch.tensor([[1.0, 2.0], [-1.0, -2.0]], dtype=F64)
    w = FUNCTIONS[name](jac @ jac.T)
    assert bool(w.isfinite().all())
    assert float((w @ jac).norm()) < 1e-6 * float(w.norm() * jac.norm())


@pytest.mark.parametrize("scale", [1e-20, 1e20])
@pytest.mark.parametrize("name", FUNCTIONS)
def test_scale(name: str, scale: float) -> None:
    jac = _jacobian("rank-deficient", positive=True)
    gram = jac @ jac.T
    w = FUNCTIONS[name](gram)
    scaled = FUNCTIONS[name](gram * scale)
    power = SCALE_POWER[name]
    if name == "nash_mtl":
        # The clip to max_norm = 1 (active for K >= 2) fixes w^T G w = 1 at every scale, so
        # w still scales as s^-1/2; check the unclipped solution too.
        torch.testing.assert_close(
            nash_mtl_weights(gram * scale, max_norm=0.0),
            nash_mtl_weights(gram, max_norm=0.0) * scale**power,
            rtol=1e-9,
            atol=0,
        )
    torch.testing.assert_close(scaled, w * scale**power, rtol=1e-9, atol=0)


@pytest.mark.parametrize("name", FUNCTIONS)
def test_float32_agrees_with_float64(name: str) -> None:
    jac = _jacobian("K3", positive=True, seed=4)
    gram = jac @ jac.T
    w64 = FUNCTIONS[name](gram)
    w32 = FUNCTIONS[name](gram.float())
    assert w32.dtype == torch.float32
    torch.testing.assert_close(w32.double(), w64, rtol=1e-4, atol=1e-5 * float(w64.abs().max()))


@pytest.mark.parametrize("name", FUNCTIONS)
def test_float32_extreme_scale_is_finite(name: str) -> None:
    jac = _jacobian("duplicates", positive=True)
    for scale in (1e-15, 1e15):
        w = FUNCTIONS[name]((jac @ jac.T * scale).float())
        assert bool(w.isfinite().all()), scale


def test_invalid_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="`gramian` must be a square"):
        imtlg_weights(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="`orders` must be a"):
        pcgrad_weights(torch.eye(3), torch.zeros(3, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"`alpha` must be finite and >= 0, got -1\.0"):
        fairgrad_weights(torch.eye(2), -1.0)
    with pytest.raises(ValueError, match="`max_norm` must be finite"):
        nash_mtl_weights(torch.eye(2), max_norm=float("nan"))
    with pytest.raises(ValueError, match="`pref` must have shape"):
        aligned_mtl_weights(torch.eye(2), torch.ones(3))
    with pytest.raises(ValueError, match="`num_tasks` must be a positive integer"):
        pcgrad_orders(0, torch.tensor(0), torch.tensor(0))


# --- No host-device synchronization ----------------------------------------------------------


def test_no_sync_guard_catches_syncs() -> None:
    # The guard is real: each way of syncing trips it.
    x = torch.tensor([1.0, -2.0])
    syncs = [
        lambda: x.sum().item(),
        lambda: bool(x[0] > 0),
        lambda: x[torch.tensor(1)],
        lambda: x[x > 0],
        lambda: torch.nonzero(x),
        lambda: torch.linalg.solve(torch.eye(2), x),
        lambda: torch.linalg.eigh(torch.eye(2)),
        lambda: torch.linalg.pinv(torch.eye(2)),
    ]
    for sync in syncs:
        with pytest.raises(AssertionError, match="host-device sync"), NoSync():
            sync()


@pytest.mark.parametrize("name", FUNCTIONS)
def test_no_host_device_sync(name: str) -> None:
    for kind in ("K1", "K3", "zero-rows"):
        jac = _jacobian(kind, positive=True)
        for gram in (jac @ jac.T, (jac @ jac.T).float()):
            with NoSync():
                FUNCTIONS[name](gram)


# --- torch.compile ------------------------------------------------------------------------------
# fullgraph=True makes Dynamo fail on any graph break (a sync, a data-dependent branch); the
# aot_eager backend also traces the graph through AOTAutograd without Inductor's C++ build,
# which this machine's CPU toolchain makes slow (and whose internal DeprecationWarning the
# filterwarnings=error setting would turn into a failure).


@pytest.mark.slow
@pytest.mark.parametrize("name", FUNCTIONS)
def test_compile_fullgraph_matches_eager(name: str) -> None:
    jac = _jacobian("K3", positive=True, seed=5)
    gram = jac @ jac.T
    torch._dynamo.reset()
    compiled = torch.compile(FUNCTIONS[name], fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(gram), FUNCTIONS[name](gram), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compile_pcgrad_orders_matches_eager() -> None:
    torch._dynamo.reset()
    compiled = torch.compile(pcgrad_orders, fullgraph=True, backend="aot_eager")
    seed, step = torch.tensor(9), torch.tensor(4)
    torch.testing.assert_close(compiled(5, seed, step), pcgrad_orders(5, seed, step))
