"""The many-tasks benchmark problem: data, model, losses on different scales, metric."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if not (BENCHMARKS / "problems").is_dir():  # the release check copies tests/ out of the tree
    pytest.skip("benchmarks/ is not here (tests copied out of the tree)", allow_module_level=True)
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from problems import Split, TaskModel  # noqa: E402
from problems import many_tasks as mt  # noqa: E402


def _expected_shape(spec: mt.TaskSpec, n: int) -> tuple[int, ...]:
    if spec.kind == "ce":
        return (n,)
    if spec.kind == "bce":
        return (n, 1)
    return (n, spec.size)


def test_table_and_problem_attributes() -> None:
    assert len(mt.KINDS) == mt.MAX_TASKS == 40
    assert [spec.name for spec in mt.KINDS] == [f"t{i:02d}" for i in range(40)]
    # The first ten tasks already hold every kind, vector size and unit.
    first = mt.KINDS[:10]
    assert {spec.kind for spec in first} == {"mse", "huber", "bce", "ce"}
    assert {spec.size for spec in first} == {1, 3, 8}
    assert {spec.scale for spec in first if spec.regression} >= {0.01, 1.0, 100.0}
    problem = mt.PROBLEM
    assert problem.name == "many_tasks"
    assert problem.tasks == tuple(f"t{i:02d}" for i in range(20))
    assert set(problem.output_sizes) == set(problem.metrics) == set(problem.tasks)
    assert problem.budget.epochs > 0
    assert problem.budget.batch_size > 0
    assert problem.budget.lr > 0


@pytest.mark.parametrize("k", [9, 41])
def test_make_rejects_k_out_of_range(k: int) -> None:
    with pytest.raises(ValueError, match="k must be"):
        mt.make(k)


@pytest.mark.parametrize("k", [10, 20, 40])
def test_shapes(k: int) -> None:
    problem = mt.make(k)
    train, val = problem.data()
    assert (len(train), len(val)) == (mt.N_TRAIN, mt.N_VAL)
    assert train.x.shape == (mt.N_TRAIN, mt.IN_FEATURES)
    assert set(train.targets) == set(val.targets) == set(problem.tasks)
    specs = {spec.name: spec for spec in mt.KINDS}
    for task in problem.tasks:
        assert train.targets[task].shape == _expected_shape(specs[task], mt.N_TRAIN)
        assert val.targets[task].shape == _expected_shape(specs[task], mt.N_VAL)

    model = problem.model()
    assert isinstance(model, TaskModel)
    batch = train.take(torch.arange(7))
    outputs = model(batch.x)
    assert set(outputs) == set(problem.tasks)
    for task in problem.tasks:
        assert outputs[task].shape == (7, specs[task].head_outputs)
    losses = problem.losses(outputs, batch)
    assert set(losses) == set(problem.tasks)
    assert all(loss.shape == () and torch.isfinite(loss) for loss in losses.values())
    assert problem.output_sizes == {t: specs[t].size for t in problem.tasks}


def test_smoke_data_is_a_few_dozen_samples() -> None:
    train, val = mt.PROBLEM.data(smoke=True)
    assert 16 <= len(train) <= 64
    assert 8 <= len(val) <= 64
    full_train, _ = mt.PROBLEM.data()
    torch.testing.assert_close(train.x, full_train.x[: len(train)])


def _assert_same(a: Split, b: Split) -> None:
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert a.targets.keys() == b.targets.keys()
    for task in a.targets:
        torch.testing.assert_close(a.targets[task], b.targets[task], rtol=0, atol=0)


def test_data_is_deterministic_and_seed_independent() -> None:
    train, val = mt.PROBLEM.data()
    again = mt.PROBLEM.data()
    _assert_same(train, again[0])
    _assert_same(val, again[1])
    # Regenerated from scratch under another global seed: the very same split.
    mt._generate.cache_clear()
    torch.manual_seed(12345)
    fresh_train, fresh_val = mt.PROBLEM.data()
    _assert_same(train, fresh_train)
    _assert_same(val, fresh_val)
    # Train and validation inputs are different samples.
    assert not torch.equal(train.x[: len(val)], val.x)


def test_fewer_tasks_are_a_prefix_of_more() -> None:
    small_train, small_val = mt.make(10).data()
    large_train, large_val = mt.make(40).data()
    for task in mt.make(10).tasks:
        torch.testing.assert_close(small_train.targets[task], large_train.targets[task])
        torch.testing.assert_close(small_val.targets[task], large_val.targets[task])


def test_classification_targets_are_balanced_enough() -> None:
    train, _ = mt.make(40).data()
    for spec in mt.KINDS:
        y = train.targets[spec.name]
        if spec.kind == "bce":
            assert 0.2 < float(y.mean()) < 0.8
        elif spec.kind == "ce":
            counts = torch.bincount(y, minlength=mt.N_CLASSES)
            assert int(counts.min()) > 0.05 * len(y)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_losses_differ_by_orders_of_magnitude_at_init(seed: int) -> None:
    """The point of the problem: under a plain sum, the losses span many decades at init."""
    problem = mt.PROBLEM
    train, _ = problem.data()
    batch = train.take(torch.arange(problem.budget.batch_size))
    torch.manual_seed(seed)
    model = problem.model()
    with torch.no_grad():
        losses = {t: float(v) for t, v in problem.losses(model(batch.x), batch).items()}
    decades = math.log10(max(losses.values()) / min(losses.values()))
    assert decades >= 6
    # The raw-scale MSEs sit near their unit squared.
    for spec in mt.KINDS[: problem.k]:
        if spec.kind == "mse":
            assert 0.1 < losses[spec.name] / spec.scale**2 < 10
    # So a plain sum's gradient is all but that of the largest-unit tasks.
    largest = sum(v for t, v in losses.items() if problem.specs[int(t[1:])].scale == 100.0)
    assert largest / sum(losses.values()) > 0.99


@pytest.mark.parametrize("k", [10, 40])
def test_evaluate_returns_k_finite_floats(k: int) -> None:
    problem = mt.make(k)
    _, val = problem.data()
    model = problem.model()
    model.train()
    metrics = problem.evaluate(model, val)
    assert list(metrics) == list(problem.tasks)
    assert all(isinstance(v, float) and math.isfinite(v) and v >= 0 for v in metrics.values())
    assert model.training  # evaluate leaves the mode as it found it


class _Oracle(TaskModel):
    """Predicts fixed tensors, whatever the input (to check the metric's normalization)."""

    def __init__(self, outputs: dict[str, Tensor]) -> None:
        super().__init__()
        self.trunk = torch.nn.Identity()
        self.outputs = outputs

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.outputs


def test_metric_is_zero_for_the_truth_and_one_for_the_median() -> None:
    problem = mt.make(10)
    _, val = problem.data()
    truth = {}
    median = {}
    for spec in problem.specs:
        y = val.targets[spec.name]
        if spec.kind == "ce":
            truth[spec.name] = torch.nn.functional.one_hot(y, mt.N_CLASSES).float()
        elif spec.kind == "bce":
            truth[spec.name] = 2 * y - 1
        else:
            truth[spec.name] = y
            median[spec.name] = y.median(0).values.expand_as(y)
    assert all(v == 0 for v in problem.evaluate(_Oracle(truth), val).values())
    constant = problem.evaluate(_Oracle({**truth, **median}), val)
    for spec in problem.specs:
        expected = 1.0 if spec.regression else 0.0
        assert constant[spec.name] == pytest.approx(expected, rel=1e-5)
