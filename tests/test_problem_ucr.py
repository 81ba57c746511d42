"""The UCR ArrowHead benchmark problem: fixed data, disjoint series, a model that trains."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("aeon", reason="the ucr problem reads the ArrowHead files aeon ships")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if not (BENCHMARKS / "problems").is_dir():  # the release check copies tests/ out of the tree
    pytest.skip("benchmarks/ is not here (tests copied out of the tree)", allow_module_level=True)
sys.path.insert(0, str(BENCHMARKS))
from problems import Problem, Split  # noqa: E402
from problems.ucr import _DATA_SEED, PROBLEM, _load_series, _stratified_split  # noqa: E402


def _assert_same(a: Split, b: Split) -> None:
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert a.targets.keys() == b.targets.keys()
    for task in a.targets:
        torch.testing.assert_close(a.targets[task], b.targets[task], rtol=0, atol=0)


def test_satisfies_the_protocol():
    problem: Problem = PROBLEM
    assert problem.tasks == ("forecast", "label", "stat")
    assert set(problem.output_sizes) == set(problem.tasks) == set(problem.metrics)


def test_shapes_and_targets():
    train, val = PROBLEM.data()
    horizon = PROBLEM.output_sizes["forecast"]
    for split in (train, val):
        n = len(split)
        assert split.x.shape[:2] == (n, 1)
        assert split.targets["forecast"].shape == (n, horizon)
        assert split.targets["label"].shape == (n,)
        assert set(split.targets["label"].tolist()) == {0, 1, 2}
        future = split.targets["forecast"]
        stat = torch.stack([future.mean(1), future.std(1)], dim=1)
        torch.testing.assert_close(split.targets["stat"], stat)
    assert len(train) > len(val) > 500
    small_train, small_val = PROBLEM.data(smoke=True)
    assert 10 <= len(small_train) <= 100
    assert 10 <= len(small_val) <= 100


def test_data_is_fixed_whatever_the_global_rng():
    torch.manual_seed(1)
    first = PROBLEM.data()
    torch.manual_seed(2)
    second = PROBLEM.data()
    _assert_same(first[0], second[0])
    _assert_same(first[1], second[1])


def test_train_and_validation_series_are_disjoint_and_stratified():
    _, labels = _load_series()
    train, val = _stratified_split(labels, torch.Generator().manual_seed(_DATA_SEED))
    assert set(train.tolist()).isdisjoint(val.tolist())
    assert len(train) + len(val) == len(labels) == 211
    shares = torch.bincount(labels[train]) / torch.bincount(labels)
    assert torch.all((shares > 0.6) & (shares < 0.72))


def test_plain_sum_trains_and_evaluates():
    train, val = PROBLEM.data(smoke=True)
    model = PROBLEM.model()
    optimizer = torch.optim.Adam(model.parameters(), lr=PROBLEM.budget.lr)
    for _ in range(3):
        losses = PROBLEM.losses(model(train.x), train)
        assert set(losses) == set(PROBLEM.tasks)
        assert all(loss.ndim == 0 and torch.isfinite(loss) for loss in losses.values())
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    metrics = PROBLEM.evaluate(model, val)
    assert set(metrics) == set(PROBLEM.tasks)
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
    assert model.training
