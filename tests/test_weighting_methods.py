"""Properties every weighting method shares: logged weights, resume, pickling, inputs, repr."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from weighting_helpers import (
    FACTORIES,
    METHODS,
    TASKS,
    effective_weights,
    leaf_losses,
    losses_at,
    reload,
    train_step,
)

import balanced_losses
from balanced_losses import DWA, FAMO, IMTLL, RLW, Weighting

NEW_METHODS = [m for m in METHODS if m != "UncertaintyWeighting"]
POSITIVE_ONLY = ["DBMTL", "FAMO", "GeometricMean"]


def test_public_names_are_exported_and_sorted() -> None:
    for name in ["DBMTL", "DWA", "FAMO", "GeometricMean", "IMTLL", "RLW"]:
        assert name in balanced_losses.__all__
        assert issubclass(getattr(balanced_losses, name), Weighting)


@pytest.mark.parametrize("method", METHODS)
def test_logged_weights_are_the_autograd_derivative(method: str) -> None:
    module = FACTORIES[method](TASKS).double()
    for step in range(8):
        _, weights = train_step(module, step)
        logged = torch.stack([module.weights[t] for t in TASKS])
        torch.testing.assert_close(logged, weights, rtol=1e-12, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_state_dict_round_trip_resumes_bit_for_bit(method: str) -> None:
    original = FACTORIES[method](TASKS)
    for step in range(5):  # mid-epoch for DWA (epochs close at steps 2, 5, ...)
        train_step(original, step, dtype=torch.float32)
    fresh = RLW(TASKS, seed=999) if method == "RLW" else FACTORIES[method](TASKS)
    resumed = reload(original, fresh)
    for step in range(5, 11):
        total_a, weights_a = train_step(original, step, dtype=torch.float32)
        total_b, weights_b = train_step(resumed, step, dtype=torch.float32)
        assert torch.equal(total_a, total_b), (step, total_a, total_b)
        assert torch.equal(weights_a, weights_b), (step, weights_a, weights_b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_pickle_and_deepcopy_resume_identically(method: str, how: str) -> None:
    original = FACTORIES[method](TASKS)
    for step in range(4):
        train_step(original, step, dtype=torch.float32)
    clone = pickle.loads(pickle.dumps(original)) if how == "pickle" else copy.deepcopy(original)
    for step in range(4, 8):
        total_a, weights_a = train_step(original, step, dtype=torch.float32)
        total_b, weights_b = train_step(clone, step, dtype=torch.float32)
        assert torch.equal(total_a, total_b)
        assert torch.equal(weights_a, weights_b)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_reset_returns_to_a_fresh_module(method: str) -> None:
    used = FACTORIES[method](TASKS)
    for step in range(7):
        train_step(used, step, dtype=torch.float32)
    used.reset()
    fresh = FACTORIES[method](TASKS)
    for step in range(4):
        total_a, weights_a = train_step(used, step, dtype=torch.float32)
        total_b, weights_b = train_step(fresh, step, dtype=torch.float32)
        assert torch.equal(total_a, total_b)
        assert torch.equal(weights_a, weights_b)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_state_dict_keys_are_stable(method: str) -> None:
    expected = {
        "DBMTL": {"balancer.ema", "balancer.count", "balancer._extra_state", "_extra_state"},
        "DWA": {"epoch_sum", "epoch_count", "batches", "means", "epochs", "_extra_state"},
        "FAMO": {
            "logits",
            "exp_avg",
            "exp_avg_sq",
            "adam_step",
            "prev_losses",
            "prev_valid",
            "_extra_state",
        },
        "GeometricMean": {"_extra_state"},
        "IMTLL": {"log_scales", "_extra_state"},
        "RLW": {"seed", "num_steps", "_extra_state"},
    }[method]
    assert set(FACTORIES[method](TASKS).state_dict()) == expected


@pytest.mark.parametrize("method", NEW_METHODS)
def test_unknown_and_missing_tasks_are_named(method: str) -> None:
    module = FACTORIES[method](TASKS)
    losses = {t: torch.tensor(1.0) for t in TASKS}
    with pytest.raises(KeyError, match="`dpeth`"):
        module({**losses, "dpeth": torch.tensor(1.0)})
    del losses["normals"]
    with pytest.raises(KeyError, match="normals"):
        module(losses)


@pytest.mark.parametrize("method", NEW_METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_check_inputs_rejects_bad_losses_naming_the_task(method: str, bad: float) -> None:
    module = FACTORIES[method](TASKS)
    module.check_inputs = True
    losses = {t: torch.tensor(1.0) for t in TASKS}
    losses["segmentation"] = torch.tensor(bad)
    with pytest.raises(ValueError, match="`segmentation`"):
        module(losses)


@pytest.mark.parametrize("method", POSITIVE_ONLY)
def test_methods_taking_logs_reject_a_zero_loss(method: str) -> None:
    module = FACTORIES[method](TASKS)
    module.check_inputs = True
    losses = {t: torch.tensor(1.0) for t in TASKS}
    losses["normals"] = torch.tensor(0.0)
    with pytest.raises(ValueError, match=r"loss of task `normals` must be > 0, got 0.0"):
        module(losses)


@pytest.mark.parametrize("method", sorted(set(NEW_METHODS) - set(POSITIVE_ONLY)))
def test_methods_without_logs_accept_a_zero_loss(method: str) -> None:
    module = FACTORIES[method](TASKS)
    module.check_inputs = True
    losses = {t: torch.tensor(1.0) for t in TASKS}
    losses["normals"] = torch.tensor(0.0)
    assert torch.isfinite(module(losses))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_allow_missing_gives_absent_tasks_weight_zero(method: str) -> None:
    module = FACTORIES[method](TASKS)
    module.allow_missing = True
    values = leaf_losses(losses_at(0))
    present = {t: values[t] for t in TASKS[:2]}
    total = module({**present, "normals": None})
    assert torch.isfinite(total)
    assert module.weights["normals"].item() == 0.0
    grads = effective_weights(total, present)
    logged = torch.stack([module.weights[t] for t in TASKS[:2]]).to(grads)
    torch.testing.assert_close(logged, grads, rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", NEW_METHODS)
def test_extra_repr_shows_tasks(method: str) -> None:
    assert "tasks=['depth', 'segmentation', 'normals']" in repr(FACTORIES[method](TASKS))


@pytest.mark.parametrize("method", NEW_METHODS)
def test_a_string_is_not_a_task_list(method: str) -> None:
    with pytest.raises(TypeError, match="sequence of task names"):
        FACTORIES[method]("depth")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: DWA(TASKS, temperature=0.0), "`temperature` must be a finite number > 0"),
        (lambda: FAMO(TASKS, lr=-1.0), "`lr` must be a finite number >= 0"),
        (lambda: FAMO(TASKS, weight_decay=float("nan")), "`weight_decay`"),
        (lambda: FAMO(TASKS, betas=(0.9, 1.0)), "`betas`"),
        (lambda: FAMO(TASKS, min_losses={"dpeth": 0.0}), "`dpeth`"),
        (lambda: IMTLL(TASKS, init=float("inf")), "`init`"),
        (lambda: RLW(TASKS, seed=-3), "`seed` must be an integer >= 0"),
        (lambda: balanced_losses.DBMTL(TASKS, eps=-1e-8), "`eps` must be a finite number >= 0"),
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
    method=st.sampled_from(METHODS),
    dtype=st.sampled_from([torch.float32, torch.float64]),
)
def test_weights_finite_positive_for_any_positive_losses(
    before: list[float], after: list[float], now: list[float], method: str, dtype: torch.dtype
) -> None:
    module = FACTORIES[method](TASKS).to(dtype)
    if isinstance(module, DWA):
        # Epoch means spanning 24 decades make rates r of up to 1e24: softmax(r / T) then
        # underflows to exact zeros, so DWA's positivity is checked on bounded rates in
        # test_dwa.py; here the weights must be finite, >= 0 and sum to K.
        for epoch in (before, after):
            module(leaf_losses(epoch, dtype=dtype))
            module.step()
    elif isinstance(module, FAMO):
        module(leaf_losses(before, dtype=dtype))
        module.update(leaf_losses(after, dtype=dtype))
    elif list(module.parameters()):
        losses = leaf_losses(before, dtype=dtype)
        total = module(losses)
        grads = torch.autograd.grad(total, list(module.parameters()))
        with torch.no_grad():
            for p, g in zip(module.parameters(), grads, strict=True):
                p.sub_(1e-3 * g.clamp(-1e3, 1e3))
    losses = leaf_losses(now, dtype=dtype)
    total = module(losses)
    weights = effective_weights(total, losses)
    assert torch.isfinite(total)
    assert torch.isfinite(weights).all(), weights
    if isinstance(module, DWA):
        assert (weights >= 0).all()
        torch.testing.assert_close(weights.sum(), torch.tensor(3.0, dtype=dtype))
    else:
        assert (weights > 0).all(), weights
