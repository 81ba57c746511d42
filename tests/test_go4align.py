"""GO4Align against its authors' update step, with the exact 1-D k-means checked by brute force."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import Tensor

from balanced_losses import GO4Align
from balanced_losses.weighting._go4align import group_means

TASKS5 = ("a", "b", "c", "d", "e")


def _brute_force(values: list[float], groups: int) -> list[float]:
    """Each value's group mean under the best split of the sorted values into at most
    ``groups`` runs, by trying every split (optimal 1-D k-means groups are runs)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    xs = [values[i] for i in order]
    best: tuple[float, list[float]] | None = None
    for cuts in itertools.chain.from_iterable(
        itertools.combinations(range(1, len(xs)), c) for c in range(min(groups, len(xs)))
    ):
        bounds = [0, *cuts, len(xs)]
        means, cost = [], 0.0
        for lo, hi in itertools.pairwise(bounds):
            run = xs[lo:hi]
            mean = sum(run) / len(run)
            cost += sum((x - mean) ** 2 for x in run)
            means += [mean] * len(run)
        if best is None or cost < best[0] - 1e-12:
            best = (cost, means)
    assert best is not None
    out = [0.0] * len(values)
    for position, index in enumerate(order):
        out[index] = best[1][position]
    return out


@pytest.mark.parametrize("groups", [1, 2, 3, 4, 6])
@pytest.mark.parametrize("seed", range(6))
def test_group_means_is_the_optimal_one_dimensional_k_means(groups: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(6, generator=gen, dtype=torch.float64) * torch.tensor([1, 1, 5, 5, 20, 20])
    if seed == 5:
        values[1] = values[0]  # ties
    ours = group_means(values, torch.ones(6, dtype=torch.bool), groups)
    torch.testing.assert_close(
        ours, torch.tensor(_brute_force(values.tolist(), groups), dtype=torch.float64)
    )


def test_group_means_leaves_absent_entries_out() -> None:
    values = torch.tensor([1.0, 9.0, 1.2, 100.0, 8.0], dtype=torch.float64)
    present = torch.tensor([True, True, True, False, True])
    ours = group_means(values, present, 2)
    torch.testing.assert_close(ours, torch.tensor([1.1, 8.5, 1.1, 0.0, 8.5], dtype=torch.float64))


def _authors(steps: list[list[float]], groups: int, eta: float) -> list[Tensor]:
    """The weights of the authors' GO4ALIGN.get_weighted_loss (autumn9999/GO4Align,
    methods/cluster_methods.py) step by step, with the exact k-means for theirs."""
    p = torch.full((5,), 0.2, dtype=torch.float64)
    out = []
    for losses in steps:
        loss = torch.tensor(losses, dtype=torch.float64)
        scale = loss.sum() / loss
        p = p * torch.exp(-eta * loss)
        p = p / p.sum()
        weight = scale * p
        if groups == 1:
            out.append(torch.full((5,), float(weight.mean()), dtype=torch.float64))
        else:
            out.append(torch.tensor(_brute_force(weight.tolist(), groups), dtype=torch.float64))
    return out


@pytest.mark.parametrize("groups", [1, 2, 3, 5])
@pytest.mark.parametrize("eta", [1e-4, 0.5])
def test_weights_follow_the_authors_update(groups: int, eta: float) -> None:
    steps = [[2.0, 0.5, 3.0, 1.0, 0.2], [1.0, 0.6, 2.0, 1.5, 0.1], [0.9, 0.3, 2.5, 1.2, 0.1]]
    go = GO4Align(TASKS5, num_groups=groups, step_size=eta)
    for losses, expected in zip(steps, _authors(steps, groups, eta), strict=True):
        leaves = {
            t: torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for t, v in zip(TASKS5, losses, strict=True)
        }
        total = go(leaves)
        torch.testing.assert_close(
            total, (expected * torch.tensor(losses, dtype=torch.float64)).sum()
        )
        grads = torch.autograd.grad(total, list(leaves.values()))
        torch.testing.assert_close(torch.stack(grads), expected)
        torch.testing.assert_close(go.last_weights, expected.float())


def test_alone_in_its_group_a_task_contributes_its_share_of_the_summed_loss() -> None:
    go = GO4Align(TASKS5, num_groups=5, step_size=0.0)
    losses = [2.0, 0.5, 3.0, 1.0, 0.2]
    go({t: torch.tensor(v) for t, v in zip(TASKS5, losses, strict=True)})
    contributions = go.last_weights * torch.tensor(losses)
    torch.testing.assert_close(contributions, torch.full((5,), sum(losses) / 5))


def test_bad_arguments_name_the_argument() -> None:
    with pytest.raises(ValueError, match="num_groups"):
        GO4Align(TASKS5, num_groups=0)
    with pytest.raises(ValueError, match="step_size"):
        GO4Align(TASKS5, step_size=-1.0)


def test_large_losses_do_not_underflow_the_risk_distribution() -> None:
    """exp(-1e-4 * 7.4e6) is 0 in float64: the update is shifted by the least loss."""
    go = GO4Align(TASKS5, step_size=1e-4)
    total = go({t: torch.tensor(7440347.0) for t in TASKS5})
    assert torch.isfinite(total)
    torch.testing.assert_close(go.probs, torch.full((5,), 0.2))
    go({t: torch.tensor(v) for t, v in zip(TASKS5, [7e6, 8e6, 9e6, 1e7, 2e7], strict=True)})
    assert torch.isfinite(go.probs).all()
    assert float(go.probs[0]) == 1.0  # the others move by exp(-100) and less


def test_a_huge_loss_grouped_with_a_huge_indicator_keeps_the_total_finite() -> None:
    """Found by the fuzz suite: in float32, losses (1, 3.7e19, 0.5) put the huge loss in a group
    with an indicator of 1e19; the weights are capped so that the total stays finite."""
    go = GO4Align(("a", "b", "c"))
    total = go(
        {"a": torch.tensor(1.0), "b": torch.tensor(3.689394774327952e19), "c": torch.tensor(0.5)}
    )
    assert torch.isfinite(total)
    assert torch.isfinite(go.last_weights).all()


def test_a_task_whose_probability_underflows_keeps_a_positive_weight_and_recovers() -> None:
    """Found by the fuzz suite: losses (1, 1, 1032791) moved task c's probability by
    exp(-1e6), 0 in any dtype, and a probability of 0 never moves again: its weight would stay
    0 for the rest of training. It is floored at float32's least normal number instead."""
    go = GO4Align(("a", "b", "c"), step_size=1.0)
    go({"a": torch.tensor(1.0), "b": torch.tensor(1.0), "c": torch.tensor(1032791.0)})
    assert (go.last_weights > 0).all()
    assert float(go.probs[2]) == torch.finfo(torch.float32).tiny
    # Once c's loss is the least, the update lifts it back by exp(step_size * gap) against the
    # others: exp(99) from 1.2e-38 is above 1.
    go({"a": torch.tensor(100.0), "b": torch.tensor(100.0), "c": torch.tensor(1.0)})
    assert float(go.probs[2]) > 0.5
