"""The digits benchmark problem: fixed data, disjoint source images, a model that trains."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn", reason="the digits problem reads scikit-learn's bundled digits")

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if not (BENCHMARKS / "problems").is_dir():  # the release check copies tests/ out of the tree
    pytest.skip("benchmarks/ is not here (tests copied out of the tree)", allow_module_level=True)
sys.path.insert(0, str(BENCHMARKS))
from problems import Problem, Split  # noqa: E402
from problems.digits import PROBLEM  # noqa: E402


def _assert_same(a: Split, b: Split) -> None:
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert a.targets.keys() == b.targets.keys()
    for task in a.targets:
        torch.testing.assert_close(a.targets[task], b.targets[task], rtol=0, atol=0)


def _halves(split: Split) -> torch.Tensor:
    """The clean 8x8 source images of every pair, one flattened image per row."""
    clean = split.targets["pixels"].reshape(-1, 8, 16)
    return torch.cat([clean[:, :, :8], clean[:, :, 8:]]).flatten(1)


def test_satisfies_the_protocol():
    problem: Problem = PROBLEM
    assert problem.tasks == ("left", "right", "pixels")
    assert set(problem.output_sizes) == set(problem.tasks) == set(problem.metrics)


def test_shapes_and_sizes():
    train, val = PROBLEM.data()
    assert (len(train), len(val)) == (3000, 1000)
    for split in (train, val):
        assert split.x.shape == (len(split), 1, 8, 16)
        assert split.targets["left"].shape == split.targets["right"].shape == (len(split),)
        assert split.targets["pixels"].shape == (len(split), 128)
        assert 0 <= int(split.targets["left"].min()) <= int(split.targets["left"].max()) <= 9
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


def test_validation_pairs_use_no_training_image():
    train, val = PROBLEM.data()
    # load_digits has no two identical images, so equal pixels mean the same source image.
    seen = {tuple(row.tolist()) for row in _halves(train)}
    assert not any(tuple(row.tolist()) in seen for row in _halves(val))


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
