"""The registry covers every public weighting, so the cross-cutting suites cover them all."""

from __future__ import annotations

import gc

import pytest
import torch

import balanced_losses as bl
from tests.asserts import by_task
from tests.registry import (
    CASES,
    FEATURES,
    Driver,
    _catalog_case,
    public_weightings,
    unregistered,
)


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


def test_the_catalog_is_every_exported_method():
    """The catalog finds the methods from the class hierarchy; the package exports each."""
    found = {m.name for m in bl.catalog.methods()}
    assert found == set(public_weightings()) - {"GramianWeighting"}
    assert len({m.key for m in bl.catalog.methods()}) == len(bl.catalog.methods())


def test_a_new_method_reaches_the_catalog_and_the_suites_with_no_other_edit():
    """A class defined in a method folder is in the catalog, and its Case trains."""

    class NewMethod(bl.Weighting):
        def combine(self, values, present):
            weights = present.to(values.dtype) / 2
            return (weights * values).sum(), weights

    NewMethod.__module__ = "balanced_losses.weighting._new_method"
    try:
        method = bl.catalog.get("new-method")
        assert method.cls is NewMethod
        assert method.level == "loss"
        driver = Driver(_catalog_case(method), ("a", "b"))
        driver.step(0)
        assert torch.equal(driver.weighting.last_weights, torch.tensor([0.5, 0.5]))
    finally:
        del NewMethod, method, driver
        gc.collect()
    assert "new-method" not in {m.key for m in bl.catalog.methods()}


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


def test_the_catalog_names_what_a_build_lacks_and_an_unknown_key() -> None:
    with pytest.raises(TypeError, match="`GradNorm` needs `shared_parameters`"):
        bl.catalog.build("grad-norm", ["a", "b"])
    with pytest.raises(KeyError, match=r"no method `gradnrom`.*'grad-norm'"):
        bl.catalog.get("gradnrom")
    # Each argument reaches only a class that takes it: the seed makes RLW reproducible and
    # the output sizes reach LossNormalizer, while UPGrad takes neither.
    rlw = bl.catalog.build("rlw", ["a", "b"], seed=3)
    assert int(rlw.seed) == 3
    normalizer = bl.catalog.build("loss-normalizer", ["a", "b"], output_sizes={"a": 2, "b": 8})
    assert normalizer.correction == "sqrt"
    assert isinstance(bl.catalog.build("upgrad", ["a", "b"], seed=3, output_sizes={}), bl.UPGrad)
