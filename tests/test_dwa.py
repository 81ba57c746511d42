"""DWA: Eq. 3 of Liu, Johns & Davison 2019 by hand, epoch bookkeeping, call order."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from balanced_losses import DWA
from tests.asserts import by_task
from tests.registry import effective_weights

TASKS = ("a", "b")


def run_epoch(dwa: DWA, batches: list[tuple[float, float]]) -> list[torch.Tensor]:
    """Feed one epoch of batches and close it; return each batch's effective weights."""
    seen = []
    for pair in batches:
        losses = {
            t: torch.tensor(v, dtype=torch.float64, requires_grad=True)
            for t, v in zip(TASKS, pair, strict=True)
        }
        seen.append(effective_weights(dwa(losses), losses))
    dwa.step()
    return seen


def test_first_two_epochs_are_the_plain_sum_then_eq3() -> None:
    dwa = DWA(TASKS, temperature=2.0).double()
    for weights in run_epoch(dwa, [(4.0, 1.0), (2.0, 3.0)]) + run_epoch(dwa, [(1.0, 2.0)] * 3):
        torch.testing.assert_close(weights, torch.ones(2, dtype=torch.float64), rtol=0, atol=0)
    # Epoch means: (3, 2) then (1, 2): r = (1/3, 1); lambda_k = 2 exp(r_k/2) / sum_i exp(r_i/2).
    r = [1.0 / 3.0, 1.0]
    expected = [2 * math.exp(x / 2) / sum(math.exp(y / 2) for y in r) for x in r]
    losses = {
        t: torch.tensor(v, dtype=torch.float64, requires_grad=True)
        for t, v in zip(TASKS, (5.0, 7.0), strict=True)
    }
    total = dwa(losses)
    torch.testing.assert_close(
        effective_weights(total, losses), torch.tensor(expected, dtype=torch.float64)
    )
    torch.testing.assert_close(
        total, torch.tensor(5.0 * expected[0] + 7.0 * expected[1], dtype=torch.float64)
    )
    torch.testing.assert_close(dwa.rates, torch.tensor(r, dtype=torch.float64))


def test_history_keeps_only_the_last_two_epochs() -> None:
    dwa = DWA(TASKS, temperature=0.5).double()
    for pair in [(8.0, 1.0), (4.0, 1.0), (1.0, 1.0), (1.0, 4.0)]:
        run_epoch(dwa, [pair])
    # Uses epochs 3 and 4 only: r = (1/1, 4/1).
    torch.testing.assert_close(dwa.rates, torch.tensor([1.0, 4.0], dtype=torch.float64))
    e = math.exp(2.0) / (math.exp(2.0) + math.exp(8.0))
    losses = {t: torch.tensor(1.0, dtype=torch.float64) for t in TASKS}
    dwa(losses)
    torch.testing.assert_close(by_task(dwa)["a"], torch.tensor(2 * e, dtype=torch.float64))


def test_eval_mode_applies_weights_without_accumulating() -> None:
    dwa = DWA(TASKS)
    run_epoch(dwa, [(2.0, 2.0)])
    dwa.eval()
    state = copy.deepcopy(dwa.state_dict())
    dwa({"a": torch.tensor(100.0), "b": torch.tensor(1.0)})
    after = dwa.state_dict()
    assert after["_extra_state"] == state.pop("_extra_state")
    for key, value in state.items():
        assert torch.equal(after[key], value), key


def test_non_finite_loss_stays_out_of_the_epoch_mean() -> None:
    dwa = DWA(TASKS).double()
    run_epoch(dwa, [(2.0, 1.0), (float("nan"), 3.0)])
    torch.testing.assert_close(dwa.means[1], torch.tensor([2.0, 2.0], dtype=torch.float64))


def test_step_before_any_forward_raises_with_the_expected_order() -> None:
    with pytest.raises(RuntimeError, match=r"expected order: call the module on each training"):
        DWA(TASKS).step()


def test_step_twice_in_a_row_raises() -> None:
    dwa = DWA(TASKS)
    run_epoch(dwa, [(1.0, 1.0)])
    with pytest.raises(RuntimeError, match=r"no training-mode forward since the last step\(\)"):
        dwa.step()


def test_step_after_eval_only_forwards_raises() -> None:
    dwa = DWA(TASKS).eval()
    dwa({"a": torch.tensor(1.0), "b": torch.tensor(1.0)})
    with pytest.raises(RuntimeError, match=r"DWA\.step"):
        dwa.step()


def test_task_missing_for_a_whole_epoch_keeps_its_history() -> None:
    dwa = DWA(TASKS, allow_missing=True).double()
    run_epoch(dwa, [(4.0, 2.0)])
    run_epoch(dwa, [(2.0, 2.0)])
    dwa({"a": torch.tensor(1.0, dtype=torch.float64), "b": None})
    dwa.step()
    assert dwa.epochs.tolist() == [3, 2]
    torch.testing.assert_close(dwa.rates, torch.tensor([0.5, 1.0], dtype=torch.float64))


@settings(deadline=None, max_examples=50)
@given(
    first=st.lists(st.floats(1e-12, 1e12), min_size=2, max_size=2),
    ratios=st.lists(st.floats(1e-6, 100.0), min_size=2, max_size=2),
)
def test_weights_positive_for_bounded_rates(first: list[float], ratios: list[float]) -> None:
    # Rates below 100 with T = 2 keep exp(-(r_i - r_j) / T) far from float32 underflow.
    dwa = DWA(TASKS)
    for epoch in (first, [f * r for f, r in zip(first, ratios, strict=True)]):
        dwa({t: torch.tensor(v) for t, v in zip(TASKS, epoch, strict=True)})
        dwa.step()
    dwa({t: torch.tensor(1.0) for t in TASKS})
    weights = torch.stack(list(by_task(dwa).values()))
    assert torch.isfinite(weights).all()
    assert (weights > 0).all(), weights
    torch.testing.assert_close(weights.sum(), torch.tensor(2.0))
