"""Names kept for one release with a ``DeprecationWarning``, and what replaced them."""

from __future__ import annotations

import pytest
import torch

import balanced_losses as bl


def test_weights_property_warns_and_returns_copies_of_last_weights() -> None:
    normalizer = bl.LossNormalizer(["a", "b"])
    normalizer({"a": torch.tensor(2.0), "b": torch.tensor(0.5)})
    with pytest.warns(
        DeprecationWarning, match="`LossNormalizer.weights` is deprecated.*last_weights"
    ):
        weights = normalizer.weights
    assert list(weights) == ["a", "b"]
    torch.testing.assert_close(torch.stack(list(weights.values())), normalizer.last_weights)
    normalizer({"a": torch.tensor(4.0), "b": torch.tensor(4.0)})
    assert not torch.equal(torch.stack(list(weights.values())), normalizer.last_weights)


def test_task_weights_warns_and_returns_the_fixed_factors() -> None:
    balancer = bl.GradientBalancer(["a", "b"], weights={"b": 3.0})
    with pytest.warns(DeprecationWarning, match="`GradientBalancer.task_weights` is deprecated"):
        factors = balancer.task_weights
    torch.testing.assert_close(factors, torch.tensor([1.0, 3.0]))
