"""Properties every weighting shares: logged weights, resume, pickling, inputs, repr.

These feed hand-picked scalar losses (leaf tensors) straight to the weighting. Feature-level
and shared-parameter methods, whose work happens in a backward through the model, are marked
where that cannot apply; the suites of test_production.py run them through a real model.
"""

from __future__ import annotations

import copy
import inspect
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import balanced_losses as bl
from tests.asserts import by_task
from tests.registry import (
    CASES,
    FEATURES,
    TASKS,
    Case,
    Setup,
    effective_weights,
    leaf_losses,
    learnable,
    losses_at,
    params,
    reload,
    scalar_step,
)

_NO_SCALARS = {
    "GradNorm": "differentiates each loss through the model's shared parameters, which scalar "
    "leaf losses do not depend on (test_gradnorm.py and test_production.py drive it)",
    "GradientBalancer": "acts in backward at the shared features: with scalar losses nothing is "
    "measured and its weights are 0 (test_gradient.py and test_production.py drive it)",
    "CalibratedBalancer": "acts in backward at the shared features while calibrating: with "
    "scalar losses nothing is measured (test_calibrated.py and test_production.py drive it)",
}
_FEATURES = (
    "acts in backward at the shared features: with scalar losses nothing reaches it "
    "(test_production.py drives it through a model; test_aggregators.py, test_dbmtl.py and "
    "test_gradient.py check its values)"
)
_THROUGH_THE_MODEL = (
    "differentiates each loss through the model's shared parameters, which scalar leaf losses "
    "do not depend on (test_production.py drives it)"
)


def _no_scalars(case: Case) -> str | None:
    """Why scalar leaf losses cannot drive a case, from what its class is; None if they can."""
    cls = type(case.make(("a", "b"), shared=[torch.zeros(1, requires_grad=True)]))
    if case.level == FEATURES:
        return _NO_SCALARS.get(cls.__name__, _FEATURES)
    if "shared_parameters" in inspect.signature(cls).parameters:
        return _NO_SCALARS.get(cls.__name__, _THROUGH_THE_MODEL)
    return None


SCALAR = params(
    **{
        case.name.replace("-", "_"): pytest.mark.skip(reason=reason)
        for case in CASES
        if (reason := _no_scalars(case)) is not None
    }
)
SCALAR_CASES = [p.values[0] for p in SCALAR if not p.marks]


def _shared() -> list[torch.Tensor]:
    """A stand-in shared parameter: GradNorm needs one to be built."""
    return [torch.zeros(1, requires_grad=True)]


def _make(case: Case, *, allow_missing: bool = False) -> bl.Weighting:
    return case.make(TASKS, allow_missing=allow_missing, shared=_shared())


@pytest.mark.parametrize("case", SCALAR)
def test_logged_weights_are_the_autograd_derivative(case: Case) -> None:
    module = _make(case).double()
    changed = False
    for step in range(8):
        _, weights = scalar_step(case, module, step)
        logged = torch.stack([by_task(module)[t] for t in TASKS])
        torch.testing.assert_close(logged, weights, rtol=1e-12, atol=0)
        changed |= not torch.allclose(logged, torch.ones_like(logged))
    assert changed, "the weights were 1 at every step: the comparison cannot tell them apart"


@pytest.mark.parametrize("case", SCALAR)
def test_state_dict_round_trip_resumes_bit_for_bit(case: Case) -> None:
    original = _make(case)
    for step in range(5):  # mid-epoch for DWA (epochs close after steps 2, 5, ...)
        scalar_step(case, original, step, dtype=torch.float32)
    # RLW: a different constructor seed, which the checkpoint's must override.
    fresh = bl.RLW(TASKS, seed=999) if case.name == "RLW" else _make(case)
    resumed = reload(original, fresh)
    for step in range(5, 11):
        total_a, weights_a = scalar_step(case, original, step, dtype=torch.float32)
        total_b, weights_b = scalar_step(case, resumed, step, dtype=torch.float32)
        assert torch.equal(total_a, total_b), (step, total_a, total_b)
        assert torch.equal(weights_a, weights_b), (step, weights_a, weights_b)


@pytest.mark.parametrize("case", SCALAR)
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_resume_identically(case: Case, how: str) -> None:
    original = _make(case)
    for step in range(4):
        scalar_step(case, original, step, dtype=torch.float32)
    clone = pickle.loads(pickle.dumps(original)) if how == "pickle" else copy.deepcopy(original)
    for step in range(4, 8):
        total_a, weights_a = scalar_step(case, original, step, dtype=torch.float32)
        total_b, weights_b = scalar_step(case, clone, step, dtype=torch.float32)
        assert torch.equal(total_a, total_b)
        assert torch.equal(weights_a, weights_b)


@pytest.mark.parametrize("case", SCALAR)
def test_reset_returns_to_a_fresh_module(case: Case) -> None:
    used = _make(case)
    for step in range(7):
        scalar_step(case, used, step, dtype=torch.float32)
    used.reset()
    fresh = _make(case)
    for step in range(4):
        total_a, weights_a = scalar_step(case, used, step, dtype=torch.float32)
        total_b, weights_b = scalar_step(case, fresh, step, dtype=torch.float32)
        assert torch.equal(total_a, total_b)
        assert torch.equal(weights_a, weights_b)


# Every state_dict also holds `_extra_state`: the task names (and FAMO's pending flag).
STATE_KEYS = {
    "LossNormalizer": {"ema", "count", "pending_sum", "pending_count", "micro_step"},
    "UncertaintyWeighting": {"log_vars"},
    "DBMTL": {"balancer.ema", "balancer.count", "balancer._extra_state"},
    "DWA": {"epoch_sum", "epoch_count", "batches", "means", "epochs"},
    "FAMO": {"logits", "exp_avg", "exp_avg_sq", "adam_step", "prev_losses", "prev_valid"},
    "GeometricMean": set(),
    "GradNorm": {
        "loss_weights",
        "initial_losses",
        "initialized",
        "num_steps",
        "exp_avg",
        "exp_avg_sq",
        "optimizer_steps",
    },
    "GradientBalancer": {"ema", "count"},
    "CalibratedBalancer": {"ema", "count", "steps_done", "frozen_scale"},
    "IMTLL": {"log_scales"},
    "RLW": {"seed", "num_steps"},
    # The aggregators keep norm statistics only with balance_norms, PCGrad its random stream.
    "UPGrad": set(),
    "UPGrad-balanced": {"ema", "count"},
    "MGDA": set(),
    "CAGrad": set(),
    "IMTLG": set(),
    "AlignedMTL": set(),
    "NashMTL": set(),
    "FairGrad": set(),
    "PCGrad": {"seed", "num_steps"},
    "GramianWeighting": set(),
}


def _declared_persistent(module: torch.nn.Module) -> set[str]:
    """The state a module and its submodules declared (``_add_state``/``_add_parameter``)
    that a checkpoint keeps: everything but logged outputs and constants."""
    keys = set()
    for prefix, sub in module.named_modules():
        declared = getattr(sub, "_declared", {})
        dot = f"{prefix}." if prefix else ""
        keys |= {
            dot + n for n, (kind, *_) in declared.items() if kind not in ("output", "constant")
        }
        if prefix and isinstance(sub, bl.Weighting):
            keys.add(f"{dot}_extra_state")
    return keys


@pytest.mark.parametrize("case", params())
def test_state_dict_keys_are_stable(case: Case) -> None:
    """The recorded checkpoint keys of each class; a class not recorded yet (a new method)
    keeps exactly its declared persistent state, so nothing undeclared reaches a checkpoint."""
    module = _make(case)
    keys = STATE_KEYS.get(case.name, STATE_KEYS.get(type(module).__name__))
    if keys is None:
        keys = _declared_persistent(module)
    assert set(module.state_dict()) == keys | {"_extra_state"}


@pytest.mark.parametrize("case", params())
def test_the_declared_state_is_what_a_checkpoint_holds(case: Case) -> None:
    module = _make(case)
    assert set(module.state_dict()) == _declared_persistent(module) | {"_extra_state"}


@pytest.mark.parametrize("case", params())
def test_unknown_and_missing_tasks_are_named(case: Case) -> None:
    module = _make(case)
    losses = {t: torch.tensor(1.0) for t in TASKS}
    with pytest.raises(KeyError, match="`dpeth`"):
        module({**losses, "dpeth": torch.tensor(1.0)})
    del losses["normals"]
    with pytest.raises(KeyError, match="normals"):
        module(losses)


@pytest.mark.parametrize(
    "case",
    params(
        **{
            case.name.replace("-", "_"): pytest.mark.skip(
                reason="takes no `check_inputs`: its forward is the plain sum of any losses"
            )
            for case in CASES
            if case.level == FEATURES and case.name != "DBMTL"
        }
    ),
)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_check_inputs_rejects_bad_losses_naming_the_task(case: Case, bad: float) -> None:
    module = _make(case)
    module.check_inputs = True
    losses = {t: torch.tensor(1.0) for t in TASKS}
    losses["segmentation"] = torch.tensor(bad)
    with pytest.raises(ValueError, match="`segmentation`"):
        module(losses)


@pytest.mark.parametrize("case", params([c for c in CASES if c.positive]))
def test_positive_methods_reject_a_zero_loss(case: Case) -> None:
    module = _make(case)
    module.check_inputs = True
    losses = {t: torch.tensor(1.0) for t in TASKS}
    losses["normals"] = torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"loss of task `normals` must be > 0, got 0.0"):
        module(losses)


@pytest.mark.parametrize("case", params([c for c in SCALAR_CASES if not c.positive]))
def test_other_methods_accept_a_zero_loss(case: Case) -> None:
    module = _make(case)
    module.check_inputs = True
    losses = {t: torch.tensor(1.0) for t in TASKS}
    losses["normals"] = torch.tensor(0.0)
    assert torch.isfinite(module(losses))


@pytest.mark.parametrize("case", SCALAR)
def test_allow_missing_gives_absent_tasks_weight_zero(case: Case) -> None:
    module = _make(case, allow_missing=True)
    values = leaf_losses(losses_at(0))
    present = {t: values[t] for t in TASKS[:2]}
    total = module({**present, "normals": None})
    assert torch.isfinite(total)
    assert by_task(module)["normals"].item() == 0.0
    grads = effective_weights(total, present)
    assert (grads > 0).all()
    logged = torch.stack([by_task(module)[t] for t in TASKS[:2]]).to(grads)
    torch.testing.assert_close(logged, grads, rtol=1e-6, atol=0)


@pytest.mark.parametrize("case", params())
def test_extra_repr_shows_tasks(case: Case) -> None:
    text = repr(_make(case))
    assert "tasks=['depth', 'segmentation', 'normals']" in text


@pytest.mark.parametrize("case", params())
def test_a_string_is_not_a_task_list(case: Case) -> None:
    with pytest.raises(TypeError, match="sequence of task names"):
        case.build(Setup("depth", shared=_shared()))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: bl.DWA(TASKS, temperature=0.0), "`temperature` must be a finite number > 0"),
        (lambda: bl.FAMO(TASKS, lr=-1.0), "`lr` must be a finite number >= 0"),
        (lambda: bl.FAMO(TASKS, weight_decay=float("nan")), "`weight_decay`"),
        (lambda: bl.FAMO(TASKS, betas=(0.9, 1.0)), "`betas`"),
        (lambda: bl.FAMO(TASKS, min_losses={"dpeth": 0.0}), "`dpeth`"),
        (lambda: bl.IMTLL(TASKS, init=float("inf")), "`init`"),
        (lambda: bl.RLW(TASKS, seed=-3), "`seed` must be an integer >= 0"),
        (lambda: bl.DBMTL(TASKS, eps=-1e-8), "`eps` must be a finite number >= 0"),
    ],
    ids=[
        "dwa-T",
        "famo-lr",
        "famo-wd",
        "famo-betas",
        "famo-bounds",
        "imtl-init",
        "rlw-seed",
        "dbmtl-eps",
    ],
)
def test_bad_hyperparameters_are_rejected(factory, message: str) -> None:
    with pytest.raises((ValueError, KeyError), match=message):
        factory()


# ---------------------------------------------------------------------------- hypothesis

positive_losses = st.lists(
    st.floats(min_value=1e-12, max_value=1e12, allow_nan=False, allow_infinity=False),
    min_size=len(TASKS),
    max_size=len(TASKS),
)


@settings(deadline=None, max_examples=50)
@given(
    before=positive_losses,
    after=positive_losses,
    now=positive_losses,
    case=st.sampled_from(SCALAR_CASES),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_weights_finite_positive_for_any_positive_losses(
    before: list[float], after: list[float], now: list[float], case: Case, dtype: torch.dtype
) -> None:
    module = _make(case).to(dtype)
    if isinstance(module, bl.DWA):
        # Epoch means spanning 24 decades make rates r of up to 1e24: softmax(r / T) then
        # underflows to exact zeros, so DWA's positivity is checked on bounded rates in
        # test_dwa.py; here the weights must be finite, >= 0 and sum to K.
        for epoch in (before, after):
            module(leaf_losses(epoch, dtype=dtype))
            module.epoch_end()
    elif not learnable(module):
        # The loop's call after the optimizer step: FAMO learns from before -> after.
        module(leaf_losses(before, dtype=dtype))
        module.after_step(leaf_losses(after, dtype=dtype))
    else:
        losses = leaf_losses(before, dtype=dtype)
        total = module(losses)
        grads = torch.autograd.grad(total, learnable(module))
        with torch.no_grad():
            for p, g in zip(learnable(module), grads, strict=True):
                p.sub_(1e-3 * g.clamp(-1e3, 1e3))
    losses = leaf_losses(now, dtype=dtype)
    total = module(losses)
    weights = effective_weights(total, losses)
    assert torch.isfinite(total)
    assert torch.isfinite(weights).all(), weights
    if isinstance(module, bl.DWA):
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(), torch.tensor(3.0, dtype=dtype))
    else:
        assert (weights > 0).all(), weights
