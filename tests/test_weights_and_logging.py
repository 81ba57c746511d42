"""The user's factors (``weights=``), the warning about factors inside the losses, ``log_dict``.

Run for every registered configuration: a factor multiplies its task's gradient after the
method has balanced, and nothing else (statistics, the total's value); ``log_dict`` reports the
step that was trained, with gradient shares that match an independent computation.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import pytest
import torch
from torch import Tensor

import balanced_losses as bl
from tests.asserts import by_task
from tests.registry import CASES, CATALOG, FEATURES, Case, Driver, params

TASKS = ("a", "b", "c")
FACTORS = {"a": 0.5, "b": 2.0}  # c keeps 1
FACTOR_VECTOR = torch.tensor([0.5, 2.0, 1.0])


def trained_step(driver: Driver, step: int = 0) -> tuple[Tensor, dict[str, Tensor]]:
    """Forward and backward of one step (no optimizer step); the total and the losses."""
    driver.optimizer.zero_grad()
    losses = driver.losses(step)
    total = driver.weighting(losses)
    total.backward()
    return total, losses


def trunk_terms(driver: Driver, step: int = 0) -> tuple[Tensor, list[Tensor], Tensor]:
    """Shared features computed again without ``branch``, each task's term of the trunk gradient,
    and the multiplier the weighting applied to it (its recorded effective weight).

    The trunk's gradient must equal ``sum_k multiplier_k * d term_k / d trunk``.
    """
    x, targets, _ = driver.data(step)
    feats = driver.model.trunk(x)
    losses = [
        bl.functional.huber_loss(driver.model.heads[t](feats), targets[t]) for t in driver.tasks
    ]
    weighting: Any = driver.weighting
    if isinstance(weighting, bl.DBMTL):
        # The gradient half balances the gradients of log(L_k + eps).
        terms = [torch.log(loss + weighting.eps) for loss in losses]
        return feats, terms, weighting.balancer.last_weights.clone()
    return feats, losses, weighting.last_weights.clone()


@pytest.mark.parametrize("case", params())
def test_weights_scale_each_tasks_gradient_after_balancing(case: Case) -> None:
    plain = Driver(case, TASKS, weights={})  # {}: all 1, even where the registry sets some
    weighted = Driver(case, TASKS, weights=FACTORS)
    plain_total, _ = trained_step(plain)
    total, _ = trained_step(weighted)
    # The method's statistics and the total's value never see the factors.
    torch.testing.assert_close(total, plain_total, rtol=0, atol=0)
    for key, value in plain.weighting.state_dict().items():
        if isinstance(value, Tensor):
            torch.testing.assert_close(weighted.weighting.state_dict()[key], value, rtol=0, atol=0)
    # The effective weights and each head's gradient carry the factor.
    torch.testing.assert_close(
        weighted.weighting.last_weights, FACTOR_VECTOR * plain.weighting.last_weights
    )
    for k, task in enumerate(TASKS):
        for p, q in zip(
            weighted.model.heads[task].parameters(),
            plain.model.heads[task].parameters(),
            strict=True,
        ):
            torch.testing.assert_close(p.grad, FACTOR_VECTOR[k] * q.grad)
    # The trunk receives sum_k multiplier_k * grad term_k, the multipliers including the factors.
    _feats, terms, multipliers = trunk_terms(weighted)
    trunk = list(weighted.model.trunk.parameters())
    expected = torch.autograd.grad(
        sum(m * term for m, term in zip(multipliers, terms, strict=True)), trunk
    )
    for p, g in zip(trunk, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


def test_a_factor_of_zero_silences_a_task_without_a_warning() -> None:
    case = next(c for c in CASES if c.name == "GradientBalancer")
    driver = Driver(case, TASKS, weights={"a": 0.0})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained_step(driver)
    assert driver.weighting.last_weights[0] == 0
    assert all(p.grad.abs().max() == 0 for p in driver.model.heads["a"].parameters())
    _feats, terms, multipliers = trunk_terms(driver)
    trunk = list(driver.model.trunk.parameters())
    expected = torch.autograd.grad(multipliers[1] * terms[1] + multipliers[2] * terms[2], trunk)
    for p, g in zip(trunk, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", params())
def test_a_constant_factor_in_a_loss_warns_where_the_method_cancels_it(case: Case) -> None:
    driver = Driver(case, TASKS)
    losses = driver.losses(0)
    losses["b"] = 0.1 * losses["b"]
    losses["c"] = losses["c"] * 3
    cancels = driver.weighting._cancels_factors
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        driver.weighting(losses)
        driver.weighting(losses)  # once per module
    messages = [str(w.message) for w in caught if "multiplied by a constant" in str(w.message)]
    if not cancels:
        assert messages == []
        return
    assert len(messages) == 1
    assert "`b` (x0.1), `c` (x3)" in messages[0]
    assert "weights={'b': 0.1, 'c': 3}" in messages[0]


def _trunk_direction(case: Case, scale: float) -> Tensor:
    """The unit trunk gradient of a fresh model's first step with task `b`'s loss x ``scale``."""
    driver = Driver(case, TASKS)
    driver.optimizer.zero_grad()
    losses = driver.losses(0)
    losses["b"] = scale * losses["b"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the warning under test: a factor it cancels
        driver.weighting(losses).backward()
    grad = torch.cat([p.grad.flatten() for p in driver.model.trunk.parameters()])
    return grad / grad.norm()


@pytest.mark.parametrize("case", params(CATALOG))
def test_a_method_that_cancels_a_constant_factor_says_so(case: Case) -> None:
    """Measured, not listed: if a loss x7 leaves the first step's trunk direction unchanged,
    the method cancels such factors and must warn about them (``_cancels_factors``).

    Methods that learn to cancel over many steps (uncertainty, GradNorm, IMTL-L) declare it
    without showing it at the first step; the converse is what a user relies on. Run on the
    package's configurations: a user's own rule (``GramianWeighting``) is the user's to know.
    """
    invariant = torch.allclose(_trunk_direction(case, 1.0), _trunk_direction(case, 7.0), atol=1e-5)
    if invariant:
        assert Driver(case, TASKS).weighting._cancels_factors, case.name


def test_a_computed_factor_is_not_reported() -> None:
    """``loss * (1 / count)`` (a tensor the user computed) is not a hand-tuned factor."""
    x = torch.randn(4, requires_grad=True)
    count = torch.tensor(4.0)
    losses = {"a": x.square().sum() * (1 / count), "b": x.abs().mean()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bl.LossNormalizer(["a", "b"])(losses)


# --------------------------------------------------------------------------------- log_dict


@pytest.mark.parametrize("case", params())
def test_log_dict_reports_the_trained_step(case: Case) -> None:
    driver = Driver(case, TASKS, weights=FACTORS)
    total, losses = trained_step(driver)
    weighting: Any = driver.weighting
    # A validation pass in between must not change what is logged.
    with torch.no_grad():
        weighting(driver.losses(5))
    logged = weighting.log_dict(prefix="train/")
    raw = [losses[t].item() for t in TASKS]
    for task, value in zip(TASKS, raw, strict=True):
        assert logged[f"train/loss/{task}"] == pytest.approx(value, rel=1e-6)
    assert logged["train/loss/sum"] == pytest.approx(sum(raw), rel=1e-6)
    assert logged["train/loss/total"] == pytest.approx(total.item(), rel=1e-6)
    for task, value in by_task(weighting).items():
        assert logged[f"train/weight/{task}"] == pytest.approx(value.item(), rel=1e-6)
    shares = {key: v for key, v in logged.items() if "grad_share" in key}
    if isinstance(weighting, bl.CalibratedWeighting):
        # Loss-level, but it measures each task's gradient at the shared parameters while it
        # calibrates (tests/test_calibrated_weighting.py checks those norms by hand).
        sent = (weighting.last_weights * weighting.grad_norms).abs().tolist()
        for task, value in zip(TASKS, sent, strict=True):
            assert shares[f"train/grad_share/{task}"] == pytest.approx(value / sum(sent), rel=1e-5)
        return
    if case.level != FEATURES:
        assert shares == {}
        return
    feats, terms, multipliers = trunk_terms(driver)
    sent = [
        abs(m.item()) * torch.autograd.grad(term, feats, retain_graph=True)[0].norm().item()
        for m, term in zip(multipliers, terms, strict=True)
    ]
    for task, value in zip(TASKS, sent, strict=True):
        assert shares[f"train/grad_share/{task}"] == pytest.approx(value / sum(sent), rel=1e-4)


def test_log_dict_every_n_calls_and_nothing_on_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    driver = Driver(next(c for c in CASES if c.name == "DBMTL"), TASKS)
    got = []
    for step in range(7):
        trained_step(driver, step)
        if step % 3:
            # The calls in between read no tensor: no host-device sync.
            with monkeypatch.context() as patch:
                patch.setattr(Tensor, "tolist", lambda self: pytest.fail("tolist called"))
                got.append(driver.weighting.log_dict(every=3))
        else:
            got.append(driver.weighting.log_dict(every=3))
    assert [bool(d) for d in got] == [True, False, False, True, False, False, True]
    assert math.isfinite(got[-1]["loss/sum"])
    with pytest.raises(ValueError, match="`every` must be an integer >= 1, got 0"):
        driver.weighting.log_dict(every=0)


def test_log_dict_before_any_step_and_for_an_absent_task() -> None:
    normalizer = bl.LossNormalizer(["a", "b"], allow_missing=True)
    assert math.isnan(normalizer.log_dict()["loss/a"])
    x = torch.tensor(2.0, requires_grad=True)
    normalizer({"a": x * x})
    logged = normalizer.log_dict()
    assert logged["loss/a"] == 4.0
    assert math.isnan(logged["loss/b"])
    assert logged["loss/sum"] == 4.0
    assert logged["weight/b"] == 0.0


# ------------------------------------------------------------------- list form, diagnostics


def test_loss_normalizer_takes_a_list_of_task_names() -> None:
    normalizer = bl.LossNormalizer(["a", "b"], momentum=0.0)
    assert normalizer.tasks == ("a", "b")
    assert normalizer.output_sizes is None
    assert "tasks=['a', 'b']" in repr(normalizer)
    total = normalizer({"a": torch.tensor(4.0), "b": torch.tensor(0.5)})
    torch.testing.assert_close(total, torch.tensor(2.0))  # each loss divided by itself
    with pytest.raises(TypeError, match="got the string 'ab'"):
        bl.LossNormalizer("ab")  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [[torch.tensor(1.0)], (torch.tensor(1.0),), torch.tensor(1.0)])
def test_diagnostics_raise_type_error_for_a_non_mapping_like_the_weightings(bad: Any) -> None:
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(TypeError, match="`losses` must be a mapping"):
        bl.diagnostics.gradient_report(bad, [w])
    with pytest.raises(TypeError, match="`losses` must be a mapping"):
        bl.LossNormalizer(["a"])(bad)
