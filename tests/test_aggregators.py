"""The aggregator modules at the shared features, against TorchJD on the same Jacobian.

The pure weight functions are checked against TorchJD matrix by matrix in
``test_aggregation_qp.py`` and ``test_aggregation_closed.py``. Here the whole path is checked:
one backward through ``branch`` must give the trunk exactly the gradient that TorchJD's
aggregator, applied to the per-task gradients at the features, sends back through the trunk.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import balanced_losses as bl
from balanced_losses import _numerics, aggregation
from tests.asserts import by_task

# These tests scale losses by constants on purpose (to show a method's invariance).
pytestmark = pytest.mark.filterwarnings("ignore:.*multiplied by a constant:UserWarning")

torchjd = pytest.importorskip("torchjd.aggregation")

TASKS = ["a", "b", "c"]


def _aggregators() -> list[tuple[str, type, dict, object]]:
    """(id, our class, its options, TorchJD aggregator computing the same thing)."""
    return [
        ("UPGrad", bl.UPGrad, {}, torchjd.UPGrad()),
        # TorchJD's Frank-Wolfe is loose by default; tightened so it reaches the optimum.
        ("MGDA", bl.MGDA, {}, torchjd.MGDA(epsilon=1e-12, max_iters=20000)),
        # TorchJD's CAGrad solves its dual with cvxpy's default tolerances: good to ~1e-4 here
        # (test_aggregation_qp.py checks ours against a tightened solver to 1e-6).
        ("CAGrad", bl.CAGrad, {"c": 0.4}, torchjd.CAGrad(c=0.4)),
        ("IMTLG", bl.IMTLG, {}, torchjd.IMTLG()),
        ("AlignedMTL", bl.AlignedMTL, {}, torchjd.AlignedMTL()),
        ("FairGrad", bl.FairGrad, {"alpha": 1.0}, torchjd.FairGrad(alpha=1.0, max_iters=2000)),
    ]


CASES = _aggregators()


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 6), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(6, 1 + 3 * i) for i, t in enumerate(TASKS)})


def _losses(model: _Model, views: dict[str, Tensor], y: Tensor) -> dict[str, Tensor]:
    # Different scales and targets per task, so the gradients conflict and differ in size.
    return {
        t: (i + 1) ** 2 * (model.heads[t](views[t]) - y[:, : 1 + 3 * i] * (-1) ** i).square().mean()
        for i, t in enumerate(TASKS)
    }


def _data(seed: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 5, generator=g, dtype=torch.float64), torch.randn(
        16, 7, generator=g, dtype=torch.float64
    )


def _reference_trunk_grads(model: _Model, aggregator, x: Tensor, y: Tensor) -> list[Tensor]:
    feats = model.trunk(x)
    losses = _losses(model, dict.fromkeys(TASKS, feats), y)
    rows = [torch.autograd.grad(losses[t], feats, retain_graph=True)[0].reshape(-1) for t in TASKS]
    combined = aggregator(torch.stack(rows))
    return list(
        torch.autograd.grad(feats, list(model.trunk.parameters()), combined.reshape(feats.shape))
    )


@pytest.mark.parametrize(("name", "cls", "kwargs", "reference"), CASES, ids=[c[0] for c in CASES])
def test_trunk_gradient_equals_torchjd_on_the_feature_jacobian(name, cls, kwargs, reference):
    torch.manual_seed(0)
    model = _Model().double()
    x, y = _data(1)
    expected = _reference_trunk_grads(model, reference, x, y)
    weighting = cls(TASKS, **kwargs).double()
    views = weighting.branch(model.trunk(x))
    weighting(_losses(model, views, y)).backward()
    rtol, atol = (2e-3, 1e-7) if name == "CAGrad" else (1e-5, 1e-10)
    for p, want in zip(model.trunk.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=rtol, atol=atol)


def test_pcgrad_trunk_gradient_equals_torchjd_for_two_tasks() -> None:
    # With two tasks the projection order cannot matter, so TorchJD's random one agrees.
    torch.manual_seed(0)
    model = _Model().double()
    model.heads = nn.ModuleDict({t: model.heads[t] for t in TASKS[:2]})
    x, y = _data(2)
    feats = model.trunk(x)
    losses = {
        t: (i + 1) * (model.heads[t](feats) - (-1) ** i * y[:, : 1 + 3 * i]).square().mean()
        for i, t in enumerate(TASKS[:2])
    }
    rows = [torch.autograd.grad(losses[t], feats, retain_graph=True)[0].reshape(-1) for t in losses]
    combined = torchjd.PCGrad()(torch.stack(rows))
    expected = torch.autograd.grad(
        feats, list(model.trunk.parameters()), combined.reshape(feats.shape)
    )
    pcgrad = bl.PCGrad(TASKS[:2], seed=0).double()
    views = pcgrad.branch(model.trunk(x))
    losses = {
        t: (i + 1) * (model.heads[t](views[t]) - (-1) ** i * y[:, : 1 + 3 * i]).square().mean()
        for i, t in enumerate(TASKS[:2])
    }
    pcgrad(losses).backward()
    for p, want in zip(model.trunk.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-8, atol=1e-12)


def test_absent_task_is_dropped_not_given_a_zero_row() -> None:
    # MGDA-like methods would put all weight on a zero row (the min-norm point is 0): an absent
    # task must leave the other tasks' problem as if it did not exist.
    torch.manual_seed(0)
    model = _Model().double()
    x, y = _data(3)
    cls = bl.IMTLG
    two = cls(TASKS[:2]).double()
    views = two.branch(model.trunk(x))
    losses = _losses(model, {**views, "c": views["a"]}, y)
    two({t: losses[t] for t in TASKS[:2]}).backward()
    expected = [p.grad.clone() for p in model.trunk.parameters()]
    model.zero_grad()
    three = cls(TASKS, allow_missing=True).double()
    views = three.branch(model.trunk(x))
    losses = _losses(model, views, y)
    three({"a": losses["a"], "b": losses["b"]}).backward()
    for p, want in zip(model.trunk.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-10, atol=1e-12)
    assert by_task(three)["c"] == 0


def test_balance_norms_then_aggregate_equals_aggregating_rescaled_rows() -> None:
    torch.manual_seed(0)
    model = _Model().double()
    x, y = _data(4)
    feats = model.trunk(x)
    losses = _losses(model, dict.fromkeys(TASKS, feats), y)
    rows = torch.stack(
        [torch.autograd.grad(losses[t], feats, retain_graph=True)[0].reshape(-1) for t in TASKS]
    )
    norms = rows.norm(dim=1)
    # At the first step the bias-corrected EMA is the norm itself: rows scaled to their mean.
    scaled = rows * (norms.mean() / norms)[:, None]
    combined = torchjd.IMTLG()(scaled)
    expected = torch.autograd.grad(
        feats, list(model.trunk.parameters()), combined.reshape(feats.shape)
    )
    weighting = bl.IMTLG(TASKS, balance_norms=True).double()
    views = weighting.branch(model.trunk(x))
    weighting(_losses(model, views, y)).backward()
    for p, want in zip(model.trunk.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, want, rtol=1e-8, atol=1e-12)
    assert weighting.count.tolist() == [1, 1, 1]


def test_cosines_and_norms_are_logged() -> None:
    torch.manual_seed(0)
    model = _Model().double()
    x, y = _data(5)
    weighting = bl.IMTLG(TASKS).double()
    views = weighting.branch(model.trunk(x))
    losses = _losses(model, views, y)
    weighting(losses).backward()
    feats = model.trunk(x)
    plain = _losses(model, dict.fromkeys(TASKS, feats), y)
    rows = torch.stack(
        [torch.autograd.grad(plain[t], feats, retain_graph=True)[0].reshape(-1) for t in TASKS]
    )
    unit = rows / rows.norm(dim=1, keepdim=True)
    torch.testing.assert_close(weighting.cosines.double(), unit @ unit.T, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weighting.grad_norms.double(), rows.norm(dim=1), rtol=1e-5, atol=0)


WEIGHT_FUNCTIONS = {
    "UPGrad": lambda g: aggregation.upgrad_weights(g),
    "MGDA": lambda g: aggregation.mgda_weights(g),
    "CAGrad": lambda g: aggregation.cagrad_weights(g),
    "IMTLG": lambda g: aggregation.imtlg_weights(g),
    "AlignedMTL": lambda g: aggregation.aligned_mtl_weights(g),
    "NashMTL": lambda g: aggregation.nash_mtl_weights(g),
    "FairGrad": lambda g: aggregation.fairgrad_weights(g, 2.0),
}


@pytest.mark.parametrize("name", sorted(WEIGHT_FUNCTIONS))
def test_cpu_shortcuts_give_the_weights_of_the_fixed_budget_path(name, monkeypatch) -> None:
    # On the CPU the solvers stop once converged and call LAPACK; on an accelerator they run
    # their fixed budget without a sync. Both must give the same weights.
    fn = WEIGHT_FUNCTIONS[name]
    g = torch.Generator().manual_seed(7)
    for k, rank in [(2, 2), (3, 3), (5, 3), (10, 10), (16, 6)]:
        j = torch.randn(k, rank, generator=g, dtype=torch.float64) @ torch.randn(
            rank, 40, generator=g, dtype=torch.float64
        )
        j[0] *= 1e3  # very different scales
        gram = j @ j.T
        fast = fn(gram)
        monkeypatch.setattr(_numerics, "HOST_SHORTCUTS", False)
        slow = fn(gram)
        monkeypatch.setattr(_numerics, "HOST_SHORTCUTS", True)
        torch.testing.assert_close(fast @ j, slow @ j, rtol=1e-7, atol=1e-9 * j.norm().item())
