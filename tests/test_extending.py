"""The public extension points, end to end: a user's rule of the Gramian through
``GramianWeighting``, a user's loss-level ``combine``, and the docs page that shows both."""

from __future__ import annotations

import copy
import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import balanced_losses as bl
from balanced_losses import aggregation

EXTENDING = Path(__file__).resolve().parents[1] / "docs" / "extending.md"
TASKS = ["a", "b"]


def plain_sum(gramian: Tensor) -> Tensor:
    """Every weight 1: the plain sum's gradient."""
    return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)


def inverse_diagonal(gramian: Tensor) -> Tensor:
    """c_k = 1 / ||g_k||^2."""
    return 1.0 / torch.diagonal(gramian)


class _Net(nn.Module):
    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 6, dtype=dtype)
        self.a = nn.Linear(6, 2, dtype=dtype)
        self.b = nn.Linear(6, 7, dtype=dtype)

    def losses(self, feats: dict[str, Tensor] | Tensor, target: Tensor) -> dict[str, Tensor]:
        views = feats if isinstance(feats, dict) else {"a": feats, "b": feats}
        return {
            "a": (self.a(views["a"]) - target[:, :2]).square().mean(),
            "b": (self.b(views["b"]) - 3.0 * target[:, :7]).square().sum(),
        }


def _batch(dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    return torch.randn(10, 3, dtype=dtype), torch.randn(10, 7, dtype=dtype)


def test_an_equal_weights_rule_reproduces_the_plain_sum_gradient_exactly() -> None:
    net = _Net()
    reference = copy.deepcopy(net)
    x, y = _batch()
    method = bl.GramianWeighting(TASKS, plain_sum)
    method(net.losses(method.branch(net.trunk(x)), y)).backward()
    sum(reference.losses(reference.trunk(x), y).values()).backward()
    for ours, theirs in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)
    torch.testing.assert_close(method.last_weights, torch.ones(2), rtol=0, atol=0)


def test_a_users_rule_matches_the_hand_computed_trunk_gradient() -> None:
    net = _Net(torch.float64)
    x, y = _batch(torch.float64)
    # By hand: each task's gradient at the features, g_k, and the trunk's gradient of
    # sum_k g_k / ||g_k||^2 pulled back through the trunk.
    feats = net.trunk(x)
    losses = net.losses(feats, y)
    grads = [torch.autograd.grad(losses[t], feats, retain_graph=True)[0] for t in TASKS]
    combined = sum(g / g.square().sum() for g in grads)
    expected = torch.autograd.grad(feats, net.trunk.weight, grad_outputs=combined)[0]

    method = bl.GramianWeighting(TASKS, inverse_diagonal)
    net.zero_grad()
    method(net.losses(method.branch(net.trunk(x)), y)).backward()
    # The weights are applied as the module's float32 buffer holds them: float32's precision.
    torch.testing.assert_close(net.trunk.weight.grad, expected, rtol=1e-6, atol=1e-9)
    by_hand = torch.stack([1.0 / g.square().sum() for g in grads]).float()
    torch.testing.assert_close(method.last_weights, by_hand, rtol=1e-6, atol=0)


def test_attach_runs_a_users_rule_as_branch_does() -> None:
    net = _Net()
    attached_net = copy.deepcopy(net)
    x, y = _batch()
    method = bl.GramianWeighting(TASKS, inverse_diagonal)
    method(net.losses(method.branch(net.trunk(x)), y)).backward()
    other = bl.GramianWeighting(TASKS, inverse_diagonal)
    with other.attach(attached_net, "trunk", {"a": "a", "b": "b"}):
        other(attached_net.losses(attached_net.trunk(x), y)).backward()
    for ours, theirs in zip(net.parameters(), attached_net.parameters(), strict=True):
        torch.testing.assert_close(ours.grad, theirs.grad, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("cls", "rule"),
    [
        (bl.UPGrad, aggregation.upgrad_weights),
        (bl.MGDA, aggregation.mgda_weights),
        (bl.IMTLG, aggregation.imtlg_weights),
        (bl.AlignedMTL, aggregation.aligned_mtl_weights),
        (bl.CAGrad, aggregation.cagrad_weights),
        (bl.NashMTL, aggregation.nash_mtl_weights),
        (bl.FairGrad, aggregation.fairgrad_weights),
    ],
    ids=lambda v: getattr(v, "__name__", ""),
)
def test_a_named_aggregator_is_gramian_weighting_with_its_public_rule(cls, rule) -> None:
    net = _Net()
    other_net = copy.deepcopy(net)
    x, y = _batch()
    named = cls(TASKS)
    assert isinstance(named, bl.GramianWeighting)
    named(net.losses(named.branch(net.trunk(x)), y)).backward()
    generic = bl.GramianWeighting(TASKS, rule)
    generic(other_net.losses(generic.branch(other_net.trunk(x)), y)).backward()
    torch.testing.assert_close(named.last_weights, generic.last_weights, rtol=0, atol=0)
    torch.testing.assert_close(net.trunk.weight.grad, other_net.trunk.weight.grad, rtol=0, atol=0)


def test_pcgrad_is_a_gramian_weighting_too() -> None:
    assert isinstance(bl.PCGrad(TASKS, seed=0), bl.GramianWeighting)


def test_a_rule_that_is_not_callable_or_returns_the_wrong_shape_is_named() -> None:
    with pytest.raises(TypeError, match="`rule` must be a function"):
        bl.GramianWeighting(TASKS, "upgrad")  # type: ignore[arg-type]
    net = _Net()
    x, y = _batch()
    method = bl.GramianWeighting(TASKS, lambda g: torch.ones(3, dtype=g.dtype))
    total = method(net.losses(method.branch(net.trunk(x)), y))
    with pytest.raises(ValueError, match=re.escape("shape (2,) for a (2, 2) Gramian, got (3,)")):
        total.backward()


def test_a_users_rule_round_trips_and_shows_in_the_repr() -> None:
    method = bl.GramianWeighting(TASKS, inverse_diagonal, balance_norms=True)
    assert repr(method) == (
        "GramianWeighting(tasks=['a', 'b'], rule=inverse_diagonal, balance_norms=True, "
        "momentum=0.9)"
    )
    net = _Net()
    x, y = _batch()
    method(net.losses(method.branch(net.trunk(x)), y)).backward()
    restored = pickle.loads(pickle.dumps(method))
    assert restored.rule is inverse_diagonal
    fresh = bl.GramianWeighting(TASKS, inverse_diagonal, balance_norms=True)
    fresh.load_state_dict(method.state_dict())
    torch.testing.assert_close(fresh.running_norm, method.running_norm, rtol=0, atol=0)


def test_a_named_aggregator_with_hyperparameters_copies_with_them() -> None:
    cagrad = bl.CAGrad(TASKS, c=0.7)
    clone = copy.deepcopy(cagrad)
    clone.c = 0.1
    gram = torch.tensor([[1.0, -0.5], [-0.5, 2.0]], dtype=torch.float64)
    torch.testing.assert_close(
        cagrad.weights_from_gramian(gram), aggregation.cagrad_weights(gram, 0.7)
    )
    torch.testing.assert_close(
        clone.weights_from_gramian(gram), aggregation.cagrad_weights(gram, 0.1)
    )
    assert pickle.loads(pickle.dumps(cagrad)).c == 0.7


class _InverseLoss(bl.Weighting):
    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        scale = values.detach().clamp_min(1e-8)
        weights = torch.where(present, 1.0 / scale, torch.zeros_like(scale))
        return (weights * values).sum(), weights


def test_a_users_combine_runs_through_the_template_forward() -> None:
    method = _InverseLoss(["a", "b", "c"], allow_missing=True, weights={"b": 3.0})
    a = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    total = method({"a": a, "b": b})
    total.backward()
    torch.testing.assert_close(total, torch.tensor(2.0, dtype=torch.float64))
    # The user's factor acts on the gradient only: d total / d b = 3 / 0.5.
    torch.testing.assert_close(a.grad, torch.tensor(0.25, dtype=torch.float64))
    torch.testing.assert_close(b.grad, torch.tensor(6.0, dtype=torch.float64))
    torch.testing.assert_close(method.last_weights, torch.tensor([0.25, 6.0, 0.0]))
    logged = method.log_dict()
    assert logged["weight/b"] == 6.0
    assert logged["loss/total"] == 2.0
    assert logged["loss/sum"] == 4.5
    with pytest.raises(KeyError, match="unknown task `d`"):
        method({"d": a})


def test_a_weighting_without_combine_says_what_to_implement() -> None:
    with pytest.raises(NotImplementedError, match="must implement `combine`"):
        bl.Weighting(TASKS)({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})


def _python_blocks(page: Path) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", page.read_text(), flags=re.MULTILINE | re.DOTALL)


@pytest.mark.skipif(not EXTENDING.is_file(), reason="docs/ is not here")
def test_the_extending_page_runs(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = _python_blocks(EXTENDING)
    assert len(blocks) >= 4
    namespace: dict[str, object] = {"__name__": "extending_md"}
    for number, block in enumerate(blocks):
        exec(compile(block, f"docs/extending.md python block {number}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "tensor([0.2500, 0.0000])" in printed
    assert "tensor(0.2500)" in printed  # the factor halved at two epoch ends
    assert "`GradientBalancer` features" in printed
    assert "'loss-normalizer'" in printed


def test_the_lifecycle_calls_are_no_ops_for_a_method_that_does_not_need_them() -> None:
    """A generic loop's after_step never computes the losses of a method that ignores them."""
    method = bl.GradientBalancer(TASKS)
    method.after_step(lambda: pytest.fail("the losses were computed"))
    method.epoch_end()
    assert torch.equal(method.ema, bl.GradientBalancer(TASKS).ema)


def test_famo_after_step_is_its_update() -> None:
    """``after_step`` with a function gives FAMO exactly what ``update`` with the losses does."""
    before = {"a": torch.tensor(2.0), "b": torch.tensor(0.5)}
    after = {"a": torch.tensor(1.0), "b": torch.tensor(0.45)}
    by_update, by_lifecycle = bl.FAMO(TASKS), bl.FAMO(TASKS)
    by_update(before)
    by_update.update(after)
    by_lifecycle(before)
    by_lifecycle.after_step(lambda: after)
    assert torch.equal(by_update.logits, by_lifecycle.logits)
    assert not torch.equal(by_update.logits, bl.FAMO(TASKS).logits)


def test_dwa_epoch_end_is_its_step() -> None:
    by_step, by_lifecycle = bl.DWA(TASKS), bl.DWA(TASKS)
    for losses in ({"a": torch.tensor(2.0), "b": torch.tensor(1.0)},) * 2:
        by_step(losses)
        by_step.step()
        by_lifecycle(losses)
        by_lifecycle.epoch_end()
    assert torch.equal(by_step.means, by_lifecycle.means)
    with pytest.raises(RuntimeError, match="no training-mode forward"):
        by_lifecycle.epoch_end()
