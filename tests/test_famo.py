"""FAMO: Algorithm 1 of Liu et al. 2023 by hand, its Adam update of the logits, call order."""

from __future__ import annotations

import io
import math

import pytest
import torch

from balanced_losses import FAMO
from tests.registry import TASKS, effective_weights, leaf_losses


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


class ReferenceFAMO:
    """Algorithm 1 in plain Python floats, with the logits stepped by Adam (authors' code)."""

    def __init__(self, k: int, lr: float = 0.025, wd: float = 1e-3, eps: float = 1e-8) -> None:
        self.xi = [0.0] * k
        self.m = [0.0] * k
        self.v = [0.0] * k
        self.t = 0
        self.lr, self.wd, self.eps = lr, wd, eps
        self.before: list[float] = []

    def weights_and_total(self, losses: list[float]) -> tuple[list[float], float]:
        self.before = losses
        z = softmax(self.xi)
        shifted = [x + self.eps for x in losses]
        c = 1.0 / sum(zk / lk for zk, lk in zip(z, shifted, strict=True))
        weights = [c * zk / lk for zk, lk in zip(z, shifted, strict=True)]
        total = c * sum(zk * math.log(lk) for zk, lk in zip(z, shifted, strict=True))
        return weights, total

    def update(self, after: list[float]) -> None:
        z = softmax(self.xi)
        delta = [
            math.log(b + self.eps) - math.log(a + self.eps)
            for b, a in zip(self.before, after, strict=True)
        ]
        zd = sum(zk * dk for zk, dk in zip(z, delta, strict=True))
        grad = [zk * (dk - zd) + self.wd * x for zk, dk, x in zip(z, delta, self.xi, strict=True)]
        self.t += 1
        for i, g in enumerate(grad):
            self.m[i] = 0.9 * self.m[i] + 0.1 * g
            self.v[i] = 0.999 * self.v[i] + 0.001 * g * g
            m_hat = self.m[i] / (1 - 0.9**self.t)
            v_hat = self.v[i] / (1 - 0.999**self.t)
            self.xi[i] -= self.lr * m_hat / (math.sqrt(v_hat) + 1e-8)


def test_first_step_by_hand() -> None:
    famo = FAMO(TASKS).double()
    losses = leaf_losses([1.0, 2.0, 4.0])
    total = famo(losses)
    # z = 1/3 each; 1/c = (1 + 1/2 + 1/4) / 3 = 7/12; w_k = c z_k / L_k = (4/7, 2/7, 1/7).
    torch.testing.assert_close(
        effective_weights(total, losses), torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64)
    )
    expected = (12 / 7) * (1 / 3) * (math.log(1) + math.log(2) + math.log(4))
    torch.testing.assert_close(
        total, torch.tensor(expected, dtype=torch.float64), rtol=1e-7, atol=0
    )  # eps = 1e-8 inside the logs
    famo.update(leaf_losses([0.5, 1.9, 4.0]))
    # delta = (log 2, log(2/1.9), 0) and z = 1/3: the gradient z (delta - z.delta) is
    # (+, -, -). First Adam step: m_hat / sqrt(v_hat) = sign(g), so each logit moves by
    # lr = 0.025 against it: depth, which improved most, loses weight.
    torch.testing.assert_close(
        famo.logits, torch.tensor([-0.025, 0.025, 0.025], dtype=torch.float64), rtol=1e-6, atol=0
    )


def test_a_sequence_matches_the_reference_algorithm() -> None:
    famo = FAMO(TASKS).double()
    reference = ReferenceFAMO(3)
    for step in range(12):
        values = [1.0 + 0.1 * step, 3.0 / (1 + step), 0.2 + 0.05 * math.sin(step)]
        after = [v * (0.95 - 0.02 * k * (step % 3)) for k, v in enumerate(values)]
        losses = leaf_losses(values)
        total = famo(losses)
        weights, expected_total = reference.weights_and_total(values)
        torch.testing.assert_close(
            effective_weights(total, losses), torch.tensor(weights, dtype=torch.float64)
        )
        torch.testing.assert_close(total, torch.tensor(expected_total, dtype=torch.float64))
        famo.update(leaf_losses(after))
        reference.update(after)
        torch.testing.assert_close(famo.logits, torch.tensor(reference.xi, dtype=torch.float64))
    assert not list(famo.parameters())


def test_softmax_gradient_matches_autograd() -> None:
    famo = FAMO(TASKS).double()
    with torch.no_grad():
        famo.logits.copy_(torch.tensor([0.3, -0.2, 0.1]))
    famo(leaf_losses([1.0, 2.0, 3.0]))
    xi = famo.logits.clone().requires_grad_(True)
    delta = torch.log(torch.tensor([1.0, 2.0, 3.0]).double() + 1e-8) - torch.log(
        torch.tensor([0.8, 2.1, 2.0]).double() + 1e-8
    )
    (expected,) = torch.autograd.grad(torch.softmax(xi, 0) @ delta, xi)
    # One Adam step from zero moments moves xi by -lr g / (|g| + eps), g = grad + wd * xi.
    famo.update(leaf_losses([0.8, 2.1, 2.0]))
    g = expected + 1e-3 * xi.detach()
    torch.testing.assert_close(famo.logits - xi.detach(), -0.025 * g / (g.abs() + 1e-8))


def test_min_losses_shift_the_logs_and_bound_the_inputs() -> None:
    famo = FAMO(TASKS, min_losses={"depth": 1.0}, eps=0.0, check_inputs=True).double()
    losses = leaf_losses([3.0, 2.0, 2.0])
    total = famo(losses)
    torch.testing.assert_close(
        effective_weights(total, losses), torch.tensor([1 / 3, 1 / 3, 1 / 3], dtype=torch.float64)
    )
    with pytest.raises(ValueError, match=r"task `depth` must be > its bound `min_losses` = 1.0"):
        famo(leaf_losses([0.5, 2.0, 2.0]))
    assert "min_losses={'depth': 1.0" in repr(famo)


def test_update_before_any_forward_raises_with_the_expected_order() -> None:
    with pytest.raises(RuntimeError, match=r"expected order: total = famo\(losses\)"):
        FAMO(TASKS).update(leaf_losses([1.0, 1.0, 1.0]))


def test_update_twice_in_a_row_raises() -> None:
    famo = FAMO(TASKS)
    famo(leaf_losses([1.0, 1.0, 1.0]))
    famo.update(leaf_losses([0.9, 0.9, 0.9]))
    with pytest.raises(RuntimeError, match=r"no training-mode forward since the last update"):
        famo.update(leaf_losses([0.8, 0.8, 0.8]))


def test_eval_forward_does_not_arm_update() -> None:
    famo = FAMO(TASKS).eval()
    famo(leaf_losses([1.0, 1.0, 1.0]))
    with pytest.raises(RuntimeError, match=r"FAMO\.update"):
        famo.update(leaf_losses([0.9, 0.9, 0.9]))


def test_pending_forward_survives_a_checkpoint() -> None:
    famo = FAMO(TASKS)
    famo(leaf_losses([1.0, 2.0, 3.0], dtype=torch.float32))
    buffer = io.BytesIO()
    torch.save(famo.state_dict(), buffer)
    buffer.seek(0)
    resumed = FAMO(TASKS)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    famo.update(leaf_losses([0.5, 2.0, 3.0], dtype=torch.float32))
    resumed.update(leaf_losses([0.5, 2.0, 3.0], dtype=torch.float32))
    assert famo.logits.abs().max() > 0.02  # the update moved the logits: not 0 == 0
    assert torch.equal(famo.logits, resumed.logits)
