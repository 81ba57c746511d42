"""RLW: K * softmax(z), z ~ N(0, I) from the module's own seeded generator."""

from __future__ import annotations

import torch
from weighting_helpers import TASKS, leaf_losses, losses_at

from balanced_losses import RLW


def test_weights_are_k_softmax_of_the_seeded_normal_draws() -> None:
    rlw = RLW(TASKS, seed=7).double()
    reference = torch.Generator().manual_seed(7)
    for step in range(4):
        z = torch.randn(3, generator=reference).double()
        expected = 3 * torch.exp(z) / torch.exp(z).sum()
        values = losses_at(step)
        total = rlw(leaf_losses(values))
        torch.testing.assert_close(torch.stack(list(rlw.weights.values())), expected)
        torch.testing.assert_close(total, (expected * torch.tensor(values).double()).sum())


def test_global_rng_is_neither_used_nor_advanced() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    rlw = RLW(TASKS, seed=5)
    rlw(leaf_losses(losses_at(0)))
    assert torch.equal(torch.rand(3), expected)


def test_same_seed_same_draws_and_seed_none_follows_manual_seed() -> None:
    def draws(module: RLW) -> list[torch.Tensor]:
        out = []
        for step in range(3):
            module(leaf_losses(losses_at(step)))
            out.append(torch.stack(list(module.weights.values())))
        return out

    for a, b in zip(draws(RLW(TASKS, seed=3)), draws(RLW(TASKS, seed=3)), strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(11)
    first = draws(RLW(TASKS))
    torch.manual_seed(11)
    for a, b in zip(first, draws(RLW(TASKS)), strict=True):
        assert torch.equal(a, b)


def test_eval_mode_is_the_plain_sum_and_draws_nothing() -> None:
    trained = RLW(TASKS, seed=1)
    probe = RLW(TASKS, seed=1)
    probe.eval()
    total = probe(leaf_losses([1.0, 2.0, 3.0]))
    torch.testing.assert_close(total, torch.tensor(6.0, dtype=torch.float64))
    assert all(w.item() == 1.0 for w in probe.weights.values())
    probe.train()
    trained(leaf_losses([1.0, 2.0, 3.0]))
    probe(leaf_losses([1.0, 2.0, 3.0]))
    assert torch.equal(trained.last_weights, probe.last_weights)


def test_weights_sum_to_k() -> None:
    rlw = RLW(TASKS, seed=0).double()
    for step in range(5):
        rlw(leaf_losses(losses_at(step)))
        torch.testing.assert_close(rlw.last_weights.sum(), torch.tensor(3.0, dtype=torch.float64))
