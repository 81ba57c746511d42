"""The registry covers every public weighting, so the cross-cutting suites cover them all."""

from __future__ import annotations

import pytest
import torch

import balanced_losses as bl
from tests.asserts import by_task
from tests.registry import CASES, FEATURES, Driver, public_weightings, unregistered


def test_every_public_weighting_is_registered():
    assert public_weightings(), "found no public weighting: the enumeration is broken"
    assert {"GradNorm", "GradientBalancer", "DBMTL"} <= set(public_weightings())
    assert unregistered() == [], "add a Case for each to tests/registry.py"


def test_a_public_weighting_without_a_case_is_reported(monkeypatch):
    class NewAggregator(bl.Weighting):
        def forward(self, losses):
            return sum(losses.values())

    monkeypatch.setattr(bl, "NewAggregator", NewAggregator, raising=False)
    monkeypatch.setattr(bl, "__all__", sorted([*bl.__all__, "NewAggregator"]))
    assert unregistered() == ["NewAggregator"]


def test_case_names_are_unique():
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("case", [c for c in CASES if c.level == FEATURES], ids=str)
def test_the_driver_routes_features_through_branch(case):
    driver = Driver(case, ("a", "b"))
    driver.step(0)
    weights = by_task(driver.weighting)
    # Weights of a feature-level method are recorded in backward, at the branch: they are set.
    assert all(bool(w > 0) for w in weights.values()), weights
    assert torch.isfinite(torch.stack(list(weights.values()))).all()
