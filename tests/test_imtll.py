"""IMTL-L: e^s L - s, its gradients, and its fixed point e^s = 1/L."""

from __future__ import annotations

import math

import torch

from balanced_losses import IMTLL, UncertaintyWeighting
from tests.registry import TASKS, effective_weights, leaf_losses


def test_total_weights_and_scale_gradient_by_hand() -> None:
    imtl = IMTLL(TASKS).double()
    with torch.no_grad():
        imtl.log_scales.copy_(torch.tensor([0.5, -1.0, 0.0]))
    values = [2.0, 3.0, 0.25]
    losses = leaf_losses(values)
    total = imtl(losses)
    s = [0.5, -1.0, 0.0]
    expected = sum(math.exp(si) * v - si for si, v in zip(s, values, strict=True))
    torch.testing.assert_close(total, torch.tensor(expected, dtype=torch.float64))
    weights = effective_weights(total, losses)
    torch.testing.assert_close(weights, torch.tensor([math.exp(x) for x in s]).double())
    (grad_s,) = torch.autograd.grad(total, imtl.log_scales)
    expected_grad = [math.exp(si) * v - 1.0 for si, v in zip(s, values, strict=True)]
    torch.testing.assert_close(grad_s, torch.tensor(expected_grad, dtype=torch.float64))


def test_gradient_descent_on_s_converges_to_one_over_the_loss() -> None:
    imtl = IMTLL(TASKS).double()
    values = [4.0, 0.5, 1.0]
    optimizer = torch.optim.SGD(imtl.parameters(), lr=0.1)
    for _ in range(500):
        optimizer.zero_grad()
        imtl(leaf_losses(values)).backward()
        optimizer.step()
    torch.testing.assert_close(
        torch.exp(imtl.log_scales.detach()),
        torch.tensor([1 / v for v in values], dtype=torch.float64),
        rtol=1e-6,
        atol=0,
    )


def test_equals_twice_kendall_uncertainty_weighting_at_minus_s() -> None:
    imtl = IMTLL(TASKS).double()
    uw = UncertaintyWeighting(TASKS).double()
    s = torch.tensor([0.3, -0.7, 1.1], dtype=torch.float64)
    with torch.no_grad():
        imtl.log_scales.copy_(s)
        uw.log_vars.copy_(-s)
    losses = leaf_losses([1.5, 0.2, 9.0])
    torch.testing.assert_close(imtl(losses), 2 * uw(losses))
