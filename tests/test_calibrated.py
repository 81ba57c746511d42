"""CalibratedBalancer: a GradientBalancer for `steps` steps, then fixed weights at a plain cost."""

from __future__ import annotations

import io

import pytest
import torch
from torch import Tensor, nn

import balanced_losses as bl

TASKS = ["a", "b"]


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 105)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {"a": self.a(h), "b": self.b(h)}


def _losses(out: dict[str, Tensor]) -> dict[str, Tensor]:
    # Task b's loss is a sum: a gradient far larger than task a's mean.
    return {"a": out["a"].square().mean(), "b": out["b"].square().sum()}


def _step(net: Net, weighting: bl.Weighting, x: Tensor) -> dict[str, Tensor]:
    """One branched training step; the gradients of the trunk's and heads' weights."""
    net.zero_grad(set_to_none=True)
    views = weighting.branch(net.trunk(x))  # type: ignore[operator]
    out = {"a": net.a(views["a"]), "b": net.b(views["b"])}
    weighting(_losses(out)).backward()
    return {name: p.grad.clone() for name, p in net.named_parameters() if p.grad is not None}


def _inputs(n: int) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 3, generator=g) for _ in range(n)]


def test_calibration_is_a_gradient_balancer_with_averaged_norms() -> None:
    torch.manual_seed(0)
    net = Net()
    twin = Net()
    twin.load_state_dict(net.state_dict())
    ours = bl.CalibratedBalancer(TASKS, steps=4)
    reference = bl.GradientBalancer(TASKS, momentum=0.75)  # 1 - 1/steps
    for x in _inputs(4):
        got, want = _step(net, ours, x), _step(twin, reference, x)
        for name in want:
            torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)
    assert not ours.frozen


def test_frozen_weights_are_the_mean_norm_over_each_averaged_norm() -> None:
    # steps = 2: momentum 1/2, so the bias-corrected EMA after norms n1, n2 is
    # (0.25 n1 + 0.5 n2) / (1 - 0.25) = (n1 + 2 n2) / 3; s_k = mean_j m_j / m_k.
    torch.manual_seed(0)
    net, balancer = Net(), bl.CalibratedBalancer(TASKS, steps=2)
    norms = []
    for x in _inputs(2):
        _step(net, balancer, x)
        norms.append(balancer.grad_norms.double().clone())
    m = (norms[0] + 2 * norms[1]) / 3
    _step(net, balancer, _inputs(3)[2])
    assert balancer.frozen
    expected = (m.mean() / m).float()
    torch.testing.assert_close(balancer.frozen_weights, expected, rtol=1e-6, atol=0)
    assert balancer.frozen_weights[0] > 1 > balancer.frozen_weights[1]


def test_frozen_steps_are_a_fixed_weighted_sum_with_no_node_at_the_features() -> None:
    torch.manual_seed(0)
    net, balancer = Net(), bl.CalibratedBalancer(TASKS, steps=2)
    for x in _inputs(2):
        _step(net, balancer, x)
    twin = Net()
    twin.load_state_dict(net.state_dict())
    x = _inputs(3)[2]
    feats = net.trunk(x)
    views = balancer.branch(feats)
    assert all(view is feats for view in views.values())  # no autograd node, no views
    s = balancer.frozen_weights
    got = _step(net, balancer, x)
    twin.zero_grad()
    losses = _losses(twin(x))
    (s[0] * losses["a"] + s[1] * losses["b"]).backward()
    for name, p in twin.named_parameters():
        torch.testing.assert_close(got[name], p.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(balancer.last_weights, s)
    assert balancer.multipliers().tolist() == pytest.approx(s.tolist())


@pytest.mark.parametrize("heads", [True, False], ids=["heads-named", "heads-measured"])
def test_attached_model_trains_with_the_frozen_weights(heads: bool) -> None:
    torch.manual_seed(0)
    net = Net()
    balancer = bl.CalibratedBalancer(TASKS, steps=1)
    balancer.attach(net, "trunk", {"a": "a", "b": "b"} if heads else None)
    xs = _inputs(2)
    balancer(_losses(net(xs[0]))).backward()
    twin = Net()
    twin.load_state_dict(net.state_dict())
    net.zero_grad()
    total = balancer(_losses(net(xs[1])))
    assert balancer.frozen
    total.backward()
    s = balancer.frozen_weights
    losses = _losses(twin(xs[1]))
    (s[0] * losses["a"] + s[1] * losses["b"]).backward()
    # The value stays the plain sum's; the gradient above is the weighted sum's.
    torch.testing.assert_close(total, losses["a"] + losses["b"])
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


def test_a_checkpoint_between_calibration_and_freeze_resumes_with_the_frozen_weights() -> None:
    torch.manual_seed(0)
    net, balancer = Net(), bl.CalibratedBalancer(TASKS, steps=2)
    for x in _inputs(2):
        _step(net, balancer, x)
    assert not balancer.frozen  # two steps measured; the freeze comes with the next call
    buffer = io.BytesIO()
    torch.save(balancer.state_dict(), buffer)
    buffer.seek(0)
    resumed = bl.CalibratedBalancer(TASKS, steps=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    assert resumed.frozen
    _step(net, balancer, _inputs(3)[2])
    torch.testing.assert_close(resumed.frozen_weights, balancer.frozen_weights, rtol=0, atol=0)
    assert int(resumed.steps_done) == 2


def test_reset_running_stats_calibrates_again() -> None:
    torch.manual_seed(0)
    net, balancer = Net(), bl.CalibratedBalancer(TASKS, steps=1)
    for x in _inputs(2):
        _step(net, balancer, x)
    assert balancer.frozen
    balancer.reset_running_stats()
    assert not balancer.frozen
    assert int(balancer.steps_done) == 0
    torch.testing.assert_close(balancer.frozen_weights, torch.ones(2))


def test_evaluation_neither_counts_nor_freezes() -> None:
    torch.manual_seed(0)
    net, balancer = Net(), bl.CalibratedBalancer(TASKS, steps=1)
    with torch.no_grad():
        for x in _inputs(3):
            balancer.branch(net.trunk(x))
            balancer(_losses(net(x)))
    assert int(balancer.steps_done) == 0
    assert not balancer.frozen


@pytest.mark.parametrize("steps", [0, -3, 1.5, True])
def test_bad_steps_are_named(steps: object) -> None:
    with pytest.raises(ValueError, match=f"`steps` must be an integer >= 1, got {steps!r}"):
        bl.CalibratedBalancer(TASKS, steps=steps)  # type: ignore[arg-type]


def test_a_frozen_weight_on_a_large_loss_cannot_overflow_the_total() -> None:
    """Frozen weights of 1e29 (a task whose gradient was 1e-29 of the other's while
    calibrating) on a loss of 1e10 give a finite total: the weights act on the gradient."""
    balancer = bl.CalibratedBalancer(TASKS, steps=1)
    with torch.no_grad():
        balancer.steps_done.fill_(1)
    balancer.load_state_dict(balancer.state_dict())  # frozen from the restored count
    balancer.frozen_scale.copy_(torch.tensor([1e29, 1.0]))
    assert balancer.frozen
    a, b = torch.tensor(1e10, requires_grad=True), torch.tensor(2.0, requires_grad=True)
    total = balancer({"a": a, "b": b})
    assert torch.isfinite(total)
    assert total.item() == pytest.approx(1e10 + 2.0)
    total.backward()
    assert a.grad.item() == pytest.approx(1e29)
    assert b.grad.item() == pytest.approx(1.0)
