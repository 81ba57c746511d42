"""CalibratedWeighting: norms at the shared parameters, averaged over the calibration, then frozen.

Every value is checked against a computation by hand: each task's gradient taken alone with
``torch.autograd.grad`` on the trunk's parameters, the plain mean of the norms over the steps,
and the multipliers mean_j n_j / n_k. The benchmark's candidate that chose this default
(``benchmarks/candidates.py``, ``ParamsFrozen``) is a second, independent reference.
"""

from __future__ import annotations

import contextlib
import copy
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import balanced_losses as bl

TASKS = ("a", "b", "c")


class _Net(nn.Module):
    """A trunk and three heads whose losses differ in size by their reduction."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        self.a = nn.Linear(5, 2)
        self.b = nn.Linear(5, 30)
        self.c = nn.Linear(5, 1)

    def losses(self, x: Tensor) -> dict[str, Tensor]:
        h = self.trunk(x)
        return {
            "a": self.a(h).square().mean(),
            "b": self.b(h).square().sum(1).mean(),  # a sum over 30 outputs: a large gradient
            "c": (self.c(h) - 3.0).abs().mean(),
        }


def _batches(n: int) -> list[Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(16, 4, generator=generator) for _ in range(n)]


def _norms_by_hand(net: _Net, x: Tensor) -> Tensor:
    losses = net.losses(x)
    params = list(net.trunk.parameters())
    norms = []
    for task in TASKS:
        grads = torch.autograd.grad(losses[task], params, retain_graph=True)
        norms.append(torch.sqrt(sum(g.double().square().sum() for g in grads)))
    return torch.stack(norms)


@contextlib.contextmanager
def _counting_grad() -> Iterator[list[int]]:
    """Count the calls to ``torch.autograd.grad`` inside the block (one entry per call)."""
    calls: list[int] = []
    original = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    torch.autograd.grad = counting  # type: ignore[assignment]
    try:
        yield calls
    finally:
        torch.autograd.grad = original


def _train(
    weighting: bl.Weighting, net: _Net, batches: list[Tensor], lr: float = 0.05
) -> list[Tensor]:
    """SGD steps; returns each step's applied multipliers."""
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    applied = []
    for x in batches:
        optimizer.zero_grad()
        weighting(net.losses(x)).backward()
        optimizer.step()
        applied.append(weighting.last_weights.clone())
    return applied


def _train_by_hand(reference: _Net, batches: list[Tensor], measured_on: set[int]) -> list[Tensor]:
    """The same SGD steps as ``_train``, with each step's multipliers mean_j n_j / n_k of the
    norms measured by hand on the steps ``measured_on`` so far; returns those multipliers."""
    optimizer = torch.optim.SGD(reference.parameters(), lr=0.05)
    measured, expected = [], []
    for step, x in enumerate(batches):
        if step in measured_on:
            measured.append(_norms_by_hand(reference, x))
        mean = torch.stack(measured).mean(0)
        expected.append(mean.mean() / mean)
        optimizer.zero_grad()
        losses = reference.losses(x)
        sum(float(expected[-1][i]) * losses[t] for i, t in enumerate(TASKS)).backward()
        optimizer.step()
    return expected


def test_multipliers_are_the_mean_norm_over_each_tasks_averaged_norm():
    torch.manual_seed(0)
    net = _Net()
    reference = copy.deepcopy(net)
    batches = _batches(6)
    weighting = bl.CalibratedWeighting(TASKS, steps=4)
    applied = _train(weighting, net, batches)

    # By hand: the same SGD steps with the multipliers of the norms averaged so far.
    by_hand = _train_by_hand(reference, batches, measured_on={0, 1, 2, 3})
    for got, expected in zip(applied, by_hand, strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    for mine, theirs in zip(net.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
    assert weighting.frozen
    torch.testing.assert_close(weighting.frozen_weights.double(), expected, rtol=1e-5, atol=0)
    # The small gradient (a) is lifted, the sum over 30 outputs (b) lowered.
    assert expected[0] > 1 > expected[1]


def test_value_is_the_plain_sum_and_gradient_the_weighted_sum():
    torch.manual_seed(1)
    net = _Net()
    x = _batches(1)[0]
    weighting = bl.CalibratedWeighting(TASKS, steps=3)
    losses = net.losses(x)
    total = weighting(losses)
    torch.testing.assert_close(total, sum(losses.values()))
    scale = weighting.last_weights
    params = list(net.parameters())
    got = torch.autograd.grad(total, params, retain_graph=True)
    want = torch.autograd.grad(
        sum(float(scale[i]) * losses[t] for i, t in enumerate(TASKS)), params
    )
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7)


def test_found_shared_parameters_are_the_trunk_and_match_naming_them():
    torch.manual_seed(2)
    net = _Net()
    other = copy.deepcopy(net)
    batches = _batches(5)
    found = bl.CalibratedWeighting(TASKS, steps=3)
    named = bl.CalibratedWeighting(TASKS, other.trunk, steps=3)
    a = _train(found, net, batches)
    b = _train(named, other, batches)
    assert {id(p) for p in found._found or []} == {id(p) for p in net.trunk.parameters()}
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=0)


def test_same_weights_as_the_benchmark_candidate_that_chose_it():
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    if not benchmarks.is_dir():
        pytest.skip("benchmarks/ is not here (tests copied out of the tree)")
    sys.path.insert(0, str(benchmarks))
    try:
        from candidates import ParamsFrozen
    finally:
        sys.path.remove(str(benchmarks))
    torch.manual_seed(3)
    net = _Net()
    other = copy.deepcopy(net)
    batches = _batches(7)
    ours = _train(bl.CalibratedWeighting(TASKS, steps=5), net, batches)
    candidate = ParamsFrozen(list(TASKS), steps=5).attach(other, "trunk")
    theirs = _train(candidate, other, batches)
    for x, y in zip(ours, theirs, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=0)


def test_nothing_is_measured_after_the_freeze_nor_outside_training():
    torch.manual_seed(4)
    net = _Net()
    weighting = bl.CalibratedWeighting(TASKS, steps=2)
    applied = _train(weighting, net, _batches(2))
    frozen = applied[-1]  # the last calibration step's multipliers are the ones frozen
    norms = weighting.running_norm.clone()
    with _counting_grad() as calls:
        _train(weighting, net, _batches(3))
        weighting.eval()
        weighting(net.losses(_batches(1)[0]))
    assert not calls
    torch.testing.assert_close(weighting.running_norm, norms)
    torch.testing.assert_close(weighting.frozen_weights.to(frozen.dtype), frozen)
    torch.testing.assert_close(weighting.last_weights, frozen)
    assert int(weighting.steps_done) == 5  # the eval call is not a training step


def test_resume_mid_calibration_and_after_the_freeze_continues_exactly():
    batches = _batches(8)
    for cut in (2, 5):
        torch.manual_seed(5)
        net = _Net()
        straight = bl.CalibratedWeighting(TASKS, steps=4)
        full = _train(straight, copy.deepcopy(net), batches)

        resumed_net = copy.deepcopy(net)
        first = bl.CalibratedWeighting(TASKS, steps=4)
        head = _train(first, resumed_net, batches[:cut])
        second = bl.CalibratedWeighting(TASKS, steps=4)
        second.load_state_dict(first.state_dict())
        assert second.frozen == (cut >= 4)
        tail = _train(second, resumed_net, batches[cut:])
        for x, y in zip(full, head + tail, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=0)


def test_a_missing_task_is_not_measured_and_keeps_its_average():
    torch.manual_seed(6)
    net = _Net()
    weighting = bl.CalibratedWeighting(TASKS, steps=3, allow_missing=True)
    x1, x2 = _batches(2)
    weighting(net.losses(x1)).backward()
    first = weighting.running_norm.clone()
    losses = net.losses(x2)
    losses["c"] = None  # type: ignore[assignment]
    weighting(losses).backward()
    assert weighting.norm_count.tolist() == [2, 2, 1]
    assert float(weighting.running_norm[2]) == float(first[2])
    assert float(weighting.last_weights[2]) == 0.0


def test_losses_that_share_nothing_warn_and_keep_weights_of_one():
    a = torch.tensor(2.0, requires_grad=True)
    b = torch.tensor(5.0, requires_grad=True)
    weighting = bl.CalibratedWeighting(["a", "b"], steps=2)
    with pytest.warns(UserWarning, match="share no parameter"):
        weighting({"a": a * a, "b": b * b})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        weighting({"a": a * a, "b": b * b})
    torch.testing.assert_close(weighting.last_weights, torch.ones(2))


@pytest.mark.parametrize("steps", [0, -1, 2.5, True, "100"])
def test_bad_steps_are_rejected_with_the_value(steps):
    with pytest.raises(ValueError, match=f"`steps` must be an integer >= 1, got {steps!r}"):
        bl.CalibratedWeighting(TASKS, steps=steps)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=f"`every` must be an integer >= 1, got {steps!r}"):
        bl.CalibratedWeighting(TASKS, every=steps)  # type: ignore[arg-type]


def test_every_measures_one_step_in_every_and_averages_those():
    """every=2, steps=5: steps 0, 2 and 4 measured (3 x 3 autograd.grad calls), then frozen."""
    torch.manual_seed(9)
    net = _Net()
    reference = copy.deepcopy(net)
    batches = _batches(7)
    weighting = bl.CalibratedWeighting(TASKS, steps=5, every=2)
    with _counting_grad() as calls:
        applied = _train(weighting, net, batches)
    assert len(calls) == 3 * len(TASKS)
    assert weighting.norm_count.tolist() == [3, 3, 3]
    by_hand = _train_by_hand(reference, batches, measured_on={0, 2, 4})
    for got, expected in zip(applied, by_hand, strict=True):
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)
    assert weighting.frozen


def test_repr_names_the_settings():
    text = repr(bl.CalibratedWeighting(TASKS, steps=7, every=3))
    assert "steps=7, every=3" in text
    assert "found in the graph" in text


def test_log_dict_gives_the_shares_at_the_shared_parameters_while_calibrating():
    torch.manual_seed(8)
    net = _Net()
    weighting = bl.CalibratedWeighting(TASKS, steps=2)
    x1, x2 = _batches(2)
    weighting(net.losses(x1)).backward()
    logs = weighting.log_dict()
    norms = _norms_by_hand(net, x1)
    scale = norms.mean() / norms
    shares = scale * norms / (scale * norms).sum()  # equalized: a third each
    for i, task in enumerate(TASKS):
        assert logs[f"grad_share/{task}"] == pytest.approx(float(shares[i]), rel=1e-5)
        assert logs[f"grad_share/{task}"] == pytest.approx(1 / 3, rel=1e-5)
    weighting(net.losses(x2)).backward()
    weighting(net.losses(x2))  # frozen from this call on
    assert not any(key.startswith("grad_share/") for key in weighting.log_dict())
