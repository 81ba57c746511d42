"""GeometricMean (GLS): (prod L)^(1/K) and its weights total / (K L_k)."""

from __future__ import annotations

import pytest
import torch

from balanced_losses import GeometricMean
from tests.registry import TASKS, effective_weights, leaf_losses


def test_total_and_weights_by_hand() -> None:
    losses = leaf_losses([2.0, 4.0, 8.0])
    total = GeometricMean(TASKS)(losses)
    torch.testing.assert_close(total, torch.tensor(4.0, dtype=torch.float64))
    expected = torch.tensor([4 / (3 * 2), 4 / (3 * 4), 4 / (3 * 8)], dtype=torch.float64)
    torch.testing.assert_close(effective_weights(total, losses), expected)


@pytest.mark.parametrize("scale", [1e-6, 3.0, 1e6])
def test_scaling_one_loss_scales_the_total_and_keeps_the_direction(scale: float) -> None:
    gls = GeometricMean(TASKS)
    base = leaf_losses([0.5, 2.0, 7.0])
    scaled = leaf_losses([0.5 * scale, 2.0, 7.0])
    torch.testing.assert_close(gls(scaled), gls(base) * scale ** (1 / 3))
    # d total / d log L_k = total / K for every task, whatever the scale.
    total = gls(scaled)
    logs = effective_weights(total, scaled) * torch.tensor([0.5 * scale, 2.0, 7.0]).double()
    torch.testing.assert_close(logs, (total / 3).detach().expand(3))


def test_extreme_losses_do_not_overflow_in_float32() -> None:
    total = GeometricMean(TASKS)({t: torch.tensor(1e30) for t in TASKS})
    torch.testing.assert_close(total, torch.tensor(1e30))


def test_missing_task_means_over_the_present_ones() -> None:
    gls = GeometricMean(TASKS, allow_missing=True)
    total = gls({"depth": torch.tensor(2.0), "segmentation": torch.tensor(8.0)})
    torch.testing.assert_close(total, torch.tensor(4.0))
    assert gls({"depth": None}).item() == 0.0
