"""State declared once in the base: checkpoints by task name, precision, when statistics move.

Each test here failed before the base owned the state: checkpoints were loaded by position,
``model.half()`` rounded the statistics through float16, and four classes updated their
statistics in training mode under ``torch.no_grad()``.
"""

from __future__ import annotations

import copy
import io
import warnings

import pytest
import torch
from registry import CASES, Case, Driver
from torch import Tensor, nn

import balanced_losses as bl

TASKS = ["pointer", "countdown"]


def _losses(step: int) -> dict[str, Tensor]:
    # Different values per task and per step, so per-task statistics differ.
    return {
        "pointer": torch.tensor(0.2 + 0.05 * step, requires_grad=True),
        "countdown": torch.tensor(15.7 / (step + 1), requires_grad=True),
    }


def _trained(case: Case, steps: int = 4) -> Driver:
    """A weighting after ``steps`` real training steps, per-task statistics apart."""
    driver = Driver(case, TASKS)
    for step in range(steps):
        driver.step(step)
    return driver


def _per_task_tensors(weighting: bl.Weighting) -> dict[str, tuple[Tensor, int]]:
    """Every declared per-task tensor that a checkpoint carries, with its task axis."""
    out = {}
    for module_name, module in weighting.named_modules():
        if not isinstance(module, bl.Weighting):
            continue
        for name, (kind, _, axis) in module._declared.items():
            if axis is not None and kind in ("statistic", "parameter"):
                key = f"{module_name}.{name}" if module_name else name
                out[key] = (getattr(module, name).detach(), axis)
    return out


def _tensor_state(weighting: nn.Module) -> dict[str, Tensor]:
    return {k: v for k, v in weighting.state_dict().items() if isinstance(v, Tensor)}


# ------------------------------------------------------------ checkpoints map tasks by name


@pytest.mark.parametrize("case", CASES, ids=str)
def test_checkpoint_saved_in_another_task_order_is_mapped_by_name(case: Case) -> None:
    driver = _trained(case)
    saved = driver.weighting
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    shared = driver.model.trunk.parameters()
    swapped = case.make(list(reversed(TASKS)), shared=shared)
    swapped.load_state_dict(torch.load(buffer, weights_only=True))
    original, loaded = _per_task_tensors(saved), _per_task_tensors(swapped)
    assert original.keys() == loaded.keys()
    moved = False
    for key, (value, axis) in original.items():
        got = loaded[key][0]
        torch.testing.assert_close(got, value.flip(axis), rtol=0, atol=0, msg=key)
        moved |= not torch.equal(value, value.flip(axis))
    if original:
        # The statistics differ between the tasks, so a positional load would have failed.
        assert moved, "training left every per-task entry equal across tasks: the test is vacuous"
    else:
        # Stateless, or state shared by all tasks (RLW's and PCGrad's random stream).
        assert case.stateless or case.name in ("RLW", "PCGrad"), case.name
    assert swapped.state_dict()["_extra_state"]["tasks"] == list(reversed(TASKS))


@pytest.mark.parametrize("case", CASES, ids=str)
def test_checkpoint_of_other_tasks_is_refused_naming_both_lists(case: Case) -> None:
    driver = Driver(case, TASKS)
    other = case.make(["pointer", "countdwn"], shared=driver.model.trunk.parameters())
    both = r"\['pointer', 'countdown'\].*\['pointer', 'countdwn'\]"
    with pytest.raises(RuntimeError, match=both):
        other.load_state_dict(driver.weighting.state_dict())


def test_checkpoint_without_task_names_loads_in_order_as_before() -> None:
    # A version-2 LossNormalizer checkpoint: no `_extra_state`, the layout of that version.
    fresh = bl.LossNormalizer({"a": 2, "b": 105})
    state = {
        "ema": torch.tensor([1.0, 2.0]),
        "count": torch.tensor([3, 3]),
        "pending_sum": torch.zeros(2),
        "pending_count": torch.zeros(2, dtype=torch.long),
        "micro_step": torch.zeros((), dtype=torch.long),
    }
    state = type(fresh.state_dict())(state)
    state._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    fresh.load_state_dict(state)
    assert fresh.ema.tolist() == [1.0, 2.0]
    assert fresh.state_dict()["_extra_state"] == {"tasks": ["a", "b"]}


# ------------------------------------------------------------- precision under model.half()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_half_precision_conversion_keeps_state_bit_identical(case: Case, dtype) -> None:
    weighting = _trained(case).weighting
    before = copy.deepcopy(_tensor_state(weighting))
    params_before = [p.detach().clone() for p in weighting.parameters()]
    weighting.to(dtype)
    weighting.half() if dtype == torch.float16 else weighting.bfloat16()
    weighting.float()
    after = _tensor_state(weighting)
    for key, value in before.items():
        assert after[key].dtype == value.dtype, key
        assert torch.equal(after[key], value), key
    for p, q in zip(params_before, weighting.parameters(), strict=True):
        assert q.dtype == p.dtype
        assert torch.equal(q.detach(), p)


def test_famo_adam_second_moment_survives_half() -> None:
    famo = bl.FAMO(TASKS)
    famo(_losses(0))
    famo.update({"pointer": torch.tensor(0.19999), "countdown": torch.tensor(15.69999)})
    small = famo.exp_avg_sq.clone()
    assert 0 < small.max() < 1e-6  # below float16's smallest subnormal, 6e-8, times a few
    famo.half()
    assert torch.equal(famo.exp_avg_sq, small)


def test_running_mean_survives_half_exactly() -> None:
    normalizer = bl.LossNormalizer({"a": 1}, momentum=0.0)
    normalizer({"a": torch.tensor(15.71234)})
    normalizer.half()
    assert normalizer.running_mean.item() == torch.tensor(15.71234).item()


def test_double_still_widens() -> None:
    uw = bl.UncertaintyWeighting(TASKS).double()
    assert uw.log_vars.dtype == torch.float64


# ------------------------------------------------------- statistics move only with grad mode


# Loss-level weightings whose state moves elsewhere than in forward: learned parameters (the
# optimizer moves them), FAMO's logits (in update()), LDC-MTL's (its reference losses move in
# forward only at an epoch's first step).
NOT_MOVED_BY_FORWARD = {
    "UncertaintyWeighting",
    "UncertaintyWeighting-positive",
    "IMTLL",
    "FAMO",
    "LDCMTL",
}


@pytest.mark.parametrize("context", ["no_grad", "inference_mode"])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_validation_in_training_mode_without_grad_leaves_state_untouched(
    case: Case, context: str
) -> None:
    driver = _trained(case, steps=2)
    weighting = driver.weighting
    assert weighting.training
    before = copy.deepcopy(weighting.state_dict())
    guard = torch.no_grad() if context == "no_grad" else torch.inference_mode()
    with guard:
        total = weighting(driver.losses(5))
    assert torch.isfinite(total)
    after = weighting.state_dict()
    assert after.keys() == before.keys()
    for key, value in before.items():
        if isinstance(value, Tensor):
            assert torch.equal(after[key], value), key
        else:
            assert after[key] == value, key
    # The same call with gradients enabled does move a loss-level weighting's statistics.
    if not case.stateless and case.level == "loss" and case.name not in NOT_MOVED_BY_FORWARD:
        weighting(driver.losses(5))
        moved = weighting.state_dict()
        assert any(
            isinstance(v, Tensor) and not torch.equal(moved[k], v) for k, v in before.items()
        ), "a forward with gradients did not move the state: the test above is vacuous"


def test_training_mode_with_grad_does_move_the_statistics() -> None:
    # The counterpart of the test above: the same call with grad enabled moves them.
    normalizer = bl.LossNormalizer({"a": 1, "b": 1})
    before = normalizer.count.clone()
    normalizer({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    assert not torch.equal(normalizer.count, before)


# ------------------------------------------------------------------- silent no-ops now warn


def _model() -> tuple[nn.Module, nn.Module, nn.Module]:
    return nn.Linear(3, 4), nn.Linear(4, 2), nn.Linear(4, 5)


@pytest.mark.parametrize("method", [bl.GradientBalancer, bl.DBMTL], ids=lambda m: m.__name__)
def test_forgotten_branch_warns_naming_the_fix(method) -> None:
    trunk, head_a, head_b = _model()
    weighting = method(["a", "b"])
    feats = trunk(torch.randn(8, 3))
    losses = {"a": head_a(feats).square().mean(), "b": head_b(feats).square().mean()}
    with pytest.warns(
        UserWarning, match=r"weighting\.attach\(model, \"trunk\"\).*views = weighting\.branch"
    ):
        weighting(losses).backward()


@pytest.mark.parametrize("method", [bl.GradientBalancer, bl.DBMTL], ids=lambda m: m.__name__)
def test_views_that_get_no_gradient_warn_at_the_next_branch(method) -> None:
    trunk, head_a, head_b = _model()
    weighting = method(["a", "b"])
    feats = trunk(torch.randn(8, 3))
    weighting.branch(feats)  # views ignored: the heads get the original features
    losses = {"a": head_a(feats).square().mean(), "b": head_b(feats).square().mean()}
    weighting(losses).backward()
    with pytest.warns(UserWarning, match=r"received no gradient.*views\[task\]"):
        weighting.branch(trunk(torch.randn(8, 3)))


def test_a_correct_training_loop_does_not_warn() -> None:
    trunk, head_a, head_b = _model()
    weighting = bl.GradientBalancer(["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            views = weighting.branch(trunk(torch.randn(8, 3)))
            losses = {
                "a": head_a(views["a"]).square().mean(),
                "b": head_b(views["b"]).square().mean(),
            }
            weighting(losses).backward()


@pytest.mark.parametrize("method", [bl.UncertaintyWeighting, bl.IMTLL], ids=lambda m: m.__name__)
def test_parameters_left_out_of_the_optimizer_warn_once(method) -> None:
    weighting = method(TASKS)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(60):
            weighting(_losses(step)).backward()
    messages = [str(w.message) for w in record]
    assert len(messages) == 1, messages
    assert "no optimizer stepped them" in messages[0]
    assert "weighting.parameters()" in messages[0]


@pytest.mark.parametrize("method", [bl.UncertaintyWeighting, bl.IMTLL], ids=lambda m: m.__name__)
def test_parameters_in_the_optimizer_with_accumulation_do_not_warn(method) -> None:
    weighting = method(TASKS)
    opt = torch.optim.SGD(weighting.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(120):
            weighting(_losses(step % 7)).backward()
            if step % 8 == 7:  # accumulate 8 micro-batches per optimizer step
                opt.step()
                opt.zero_grad(set_to_none=False)


def test_dbmtl_nonpositive_loss_raises_under_check_inputs_naming_task_and_value() -> None:
    dbmtl = bl.DBMTL(["a", "b"], check_inputs=True, balance_features=False)
    with pytest.raises(ValueError, match=r"task `b` must be > 0, got -0\.5"):
        dbmtl({"a": torch.tensor(1.0), "b": torch.tensor(-0.5)})


def test_dbmtl_negative_loss_without_checks_gives_a_visible_nan_and_clean_statistics() -> None:
    trunk, head_a, head_b = _model()
    dbmtl = bl.DBMTL(["a", "b"])
    views = dbmtl.branch(trunk(torch.randn(8, 3)))
    losses = {"a": head_a(views["a"]).square().mean(), "b": -head_b(views["b"]).square().mean()}
    total = dbmtl(losses)
    assert torch.isnan(total)
    total.backward()
    # The NaN gradient of `b` never enters the statistics; `a`'s finite one does.
    assert dbmtl.balancer.count.tolist() == [1, 0]
    assert torch.isfinite(dbmtl.balancer.ema).all()


def test_fused_optimizer_stepping_the_parameters_does_not_warn() -> None:
    # A fused optimizer does not bump the parameters' version counters; the step hook sees it.
    weighting = bl.UncertaintyWeighting(TASKS)
    opt = torch.optim.Adam(weighting.parameters(), lr=0.01, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(60):
            weighting(_losses(step)).backward()
            opt.step()
            opt.zero_grad(set_to_none=False)


def test_failed_load_of_other_tasks_leaves_the_module_untouched() -> None:
    saved = bl.UncertaintyWeighting(["x", "y", "w"])
    with torch.no_grad():
        saved.log_vars.copy_(torch.tensor([5.0, 6.0, 7.0]))
    other = bl.UncertaintyWeighting(["x", "y", "z"])
    with pytest.raises(RuntimeError, match="saved for tasks"):
        other.load_state_dict(saved.state_dict(), strict=False)
    assert other.log_vars.tolist() == [0.0, 0.0, 0.0]
    assert other.state_dict()["_extra_state"]["tasks"] == ["x", "y", "z"]


def test_frozen_trunk_through_branch_does_not_warn() -> None:
    trunk, head_a, head_b = _model()
    trunk.requires_grad_(False)
    weighting = bl.GradientBalancer(["a", "b"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            views = weighting.branch(trunk(torch.randn(8, 3)))
            losses = {
                "a": head_a(views["a"]).square().mean(),
                "b": head_b(views["b"]).square().mean(),
            }
            weighting(losses).backward()


def test_activation_checkpointing_around_branch_does_not_warn() -> None:
    from torch.utils.checkpoint import checkpoint

    trunk, head_a, head_b = _model()
    weighting = bl.GradientBalancer(["a", "b"])

    def shared(x: Tensor) -> tuple[Tensor, Tensor]:
        views = weighting.branch(trunk(x))
        return views["a"], views["b"]

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            view_a, view_b = checkpoint(shared, torch.randn(8, 3), use_reentrant=False)
            losses = {"a": head_a(view_a).square().mean(), "b": head_b(view_b).square().mean()}
            weighting(losses).backward()
    assert weighting.count.tolist() == [3, 3]


@pytest.mark.filterwarnings("ignore:.*multiplied by a constant:UserWarning")
def test_fp16_features_take_a_multiplier_beyond_fp16_range() -> None:
    trunk, head_a, head_b = _model()
    weighting = bl.GradientBalancer(["a", "b"])
    feats = trunk(torch.randn(8, 3)).half().detach().requires_grad_(True)
    views = weighting.branch(feats)
    losses = {
        "a": head_a(views["a"].float()).square().mean(),
        "b": 1e-6 * head_b(views["b"].float()).square().mean(),
    }
    weighting(losses).backward()
    assert weighting.last_weights.max() > 65504  # b is scaled up beyond fp16's range
    assert feats.grad.dtype == torch.float16
    assert bool(torch.isfinite(feats.grad).all())


def test_diagnostics_through_an_aggregator_before_any_step_show_raw_gradients() -> None:
    trunk, head_a, head_b = _model()
    mgda = bl.MGDA(["a", "b"])
    views = mgda.branch(trunk(torch.randn(8, 3)))
    losses = {"a": head_a(views["a"]).square().mean(), "b": head_b(views["b"]).square().mean()}
    norms = bl.diagnostics.task_gradient_norms(losses, trunk)
    assert all(float(n) > 0 for n in norms.values()), norms
