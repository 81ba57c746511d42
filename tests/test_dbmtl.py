"""DBMTL (loss-scale half): sum log(L + eps), weights 1 / (L + eps)."""

from __future__ import annotations

import math

import pytest
import torch

from balanced_losses import DBMTL
from tests.registry import TASKS, effective_weights, leaf_losses

# These tests scale losses by constants on purpose (to show a method's invariance).
pytestmark = pytest.mark.filterwarnings("ignore:.*multiplied by a constant:UserWarning")


def test_total_and_weights_by_hand() -> None:
    values = [0.5, 2.0, 1e-9]
    losses = leaf_losses(values)
    total = DBMTL(TASKS, balance_features=False)(losses)
    torch.testing.assert_close(
        total, torch.tensor(sum(math.log(v + 1e-8) for v in values), dtype=torch.float64)
    )
    expected = torch.tensor([1 / (v + 1e-8) for v in values], dtype=torch.float64)
    torch.testing.assert_close(effective_weights(total, losses), expected)


def test_transform_gives_the_per_task_logs_that_sum_to_the_total() -> None:
    dbmtl = DBMTL(TASKS, eps=0.0, allow_missing=True, balance_features=False)
    losses = leaf_losses([0.5, 2.0, 4.0])
    logs = dbmtl.transform(losses)
    assert list(logs) == list(TASKS)
    torch.testing.assert_close(logs["normals"], torch.tensor(math.log(4.0), dtype=torch.float64))
    torch.testing.assert_close(sum(logs.values()), dbmtl(losses))
    assert list(dbmtl.transform({"depth": losses["depth"], "normals": None})) == ["depth"]


def test_gradient_is_scale_free() -> None:
    # d log(c L) / d theta = d log L / d theta: the per-task gradient ignores the loss's units.
    theta = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    dbmtl = DBMTL(["x"], eps=0.0, balance_features=False)
    grads = [
        torch.autograd.grad(dbmtl({"x": scale * (theta**2 + 1)}), theta)[0]
        for scale in (1e-4, 1.0, 1e4)
    ]
    for g in grads[1:]:
        torch.testing.assert_close(g, grads[0])


def test_both_halves_scale_each_log_loss_gradient_to_the_largest_norm() -> None:
    torch.manual_seed(0)
    feats = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    heads = {
        "a": torch.randn(5, 2, dtype=torch.float64),
        "b": torch.randn(5, 40, dtype=torch.float64),
    }
    targets = {
        "a": torch.randn(6, 2, dtype=torch.float64),
        "b": 9 * torch.randn(6, 40, dtype=torch.float64),
    }

    def losses(views: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {t: (views[t] @ heads[t] - targets[t]).square().mean() for t in heads}

    # Reference: per-task gradients of log L_k at the features, scaled to the largest norm.
    plain = losses({"a": feats, "b": feats})
    grads = {t: torch.autograd.grad(torch.log(plain[t] + 1e-8), feats)[0] for t in heads}
    largest = max(g.norm() for g in grads.values())
    expected = sum(g * (largest / g.norm()) for g in grads.values())

    dbmtl = DBMTL(["a", "b"], momentum=0.0).double()
    total = dbmtl(losses(dbmtl.branch(feats)))
    (got,) = torch.autograd.grad(total, feats)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(total, sum(torch.log(v + 1e-8) for v in plain.values()))
    assert set(dbmtl.state_dict()) == {
        "balancer.ema",
        "balancer.count",
        "_extra_state",
        "balancer._extra_state",
    }
