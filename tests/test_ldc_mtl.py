"""LDC-MTL against the objective of its authors' QM9 code, step by step, and its lifecycle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from balanced_losses import LDCMTL

TASKS5 = ("a", "b", "c", "d", "e")


def _reference(theta: Tensor, losses: Tensor, first: Tensor, lamb: float) -> Tensor:
    """The total of the authors' QM9 trainer (OptMN-Lab/LDC-MTL, experiments/quantum_chemistry/
    trainer.py), written out: weights sigmoid(relu(theta)), log-losses against the epoch's
    first losses, the weighted mean and the penalty on neighbours' gaps."""
    weights = torch.sigmoid(F.relu(theta))
    logs = torch.log(losses / first)
    weighted = weights * logs
    return (
        weights @ logs / weights.sum().detach() + lamb * (weighted[:-1] - weighted[1:]).abs().sum()
    )


def _losses(values: list[float]) -> dict[str, Tensor]:
    return {
        t: torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for t, v in zip(TASKS5, values, strict=True)
    }


def test_the_initial_weights_are_the_authors_draw() -> None:
    ldc = LDCMTL(TASKS5, seed=7)
    generator = torch.Generator().manual_seed(7)
    expected = 0.2 + 0.8 * torch.rand(5, generator=generator, dtype=torch.float64)
    # Declared state is kept in float32 (see TaskState).
    torch.testing.assert_close(ldc.scores.detach(), expected.float(), rtol=0, atol=0)
    assert ldc.scores.requires_grad


@pytest.mark.parametrize("lamb", [0.0, 0.05, 1.0])
def test_total_and_gradients_match_the_authors_objective(lamb: float) -> None:
    ldc = LDCMTL(TASKS5, penalty=lamb, seed=3)
    first = [2.0, 0.5, 3.0, 1.0, 0.25]
    start = ldc(_losses(first))
    assert float(start.detach()) == 0.0  # every loss at its reference
    later = [1.0, 0.6, 2.0, 1.5, 0.1]
    losses = _losses(later)
    total = ldc(losses)
    theta = ldc.scores.detach().double().requires_grad_(True)
    values = torch.stack([losses[t].detach() for t in TASKS5]).requires_grad_(True)
    # The references are kept in float32, like every declared statistic.
    reference = _reference(theta, values, torch.tensor(first).double(), lamb)
    torch.testing.assert_close(total, reference)
    ours = torch.autograd.grad(total, [losses[t] for t in TASKS5] + [ldc.scores])
    theirs = torch.autograd.grad(reference, [values, theta])
    torch.testing.assert_close(torch.stack(ours[:5]), theirs[0])
    torch.testing.assert_close(ours[5], theirs[1].float())
    # The logged weights are d total / d L_k.
    torch.testing.assert_close(ldc.last_weights, theirs[0].float())


def test_each_epoch_takes_a_new_reference() -> None:
    ldc = LDCMTL(TASKS5)
    ldc(_losses([2.0, 0.5, 3.0, 1.0, 0.2]))
    assert float(ldc(_losses([1.0, 0.5, 3.0, 1.0, 0.2])).detach()) != 0.0
    ldc.epoch_end()
    assert float(ldc(_losses([1.0, 0.375, 2.0, 1.0, 0.25])).detach()) == 0.0
    torch.testing.assert_close(ldc.reference, torch.tensor([1.0, 0.375, 2.0, 1.0, 0.25]))
    # Evaluation neither moves the reference nor ends an epoch.
    ldc.eval()
    ldc(_losses([9.0, 9.0, 9.0, 9.0, 9.0]))
    ldc.epoch_end()
    assert bool(ldc.has_reference.all())


def test_a_constant_factor_of_a_loss_cancels() -> None:
    first, later = [2.0, 0.5, 3.0, 1.0, 0.2], [1.0, 0.6, 2.0, 1.5, 0.1]
    plain, scaled = LDCMTL(TASKS5), LDCMTL(TASKS5)
    plain(_losses(first))
    scaled(_losses([7.0 * first[0], *first[1:]]))
    a = plain(_losses(later))
    b = scaled(_losses([7.0 * later[0], *later[1:]]))
    torch.testing.assert_close(a, b)


def test_an_absent_task_leaves_its_pairs_and_takes_its_reference_later() -> None:
    ldc = LDCMTL(TASKS5, allow_missing=True)
    present = {t: v for t, v in _losses([2.0, 0.5, 3.0, 1.0, 0.2]).items() if t != "c"}
    ldc(present)
    assert ldc.has_reference.tolist() == [True, True, False, True, True]
    losses = {t: v for t, v in _losses([1.0, 0.6, 2.0, 1.5, 0.1]).items() if t != "c"}
    total = ldc(losses)
    theta = ldc.scores.detach()
    w = torch.sigmoid(F.relu(theta))
    keep = torch.tensor([0, 1, 3, 4])
    logs = torch.log(
        torch.tensor([1.0, 0.6, 1.5, 0.1], dtype=torch.float64)
        / torch.tensor([2.0, 0.5, 1.0, 0.2], dtype=torch.float64)
    )
    weighted = w[keep] * logs
    pairs = (weighted[0] - weighted[1]).abs() + (weighted[2] - weighted[3]).abs()  # (a, b), (d, e)
    torch.testing.assert_close(
        total, (weighted.sum() / w[keep].sum() + 0.05 * pairs).to(total.dtype)
    )
    assert float(ldc.last_weights[2]) == 0.0
    ldc(_losses([1.0, 0.6, 2.0, 1.5, 0.1]))
    assert float(ldc.reference[2]) == 2.0
