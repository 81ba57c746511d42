from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from balanced_losses.functional import huber_loss, reduction_factor, reduction_factors

# ------------------------------------------------------------------------------ reduction factors


@pytest.mark.parametrize(
    ("correction", "expected"),
    [("none", 1.0), ("sqrt", 3.0), ("linear", 9.0)],
    ids=["none", "sqrt", "linear"],
)
def test_reduction_factor_absolute(correction, expected):
    assert reduction_factor(9, correction) == expected


def test_reduction_factors_are_relative_to_their_mean():
    factors = reduction_factors({"pointer": 1, "countdown": 9}, "sqrt")
    # absolute 1 and 3, mean 2
    assert factors == {"pointer": 0.5, "countdown": 1.5}
    assert reduction_factors({"a": 2, "b": 105}, "none") == {"a": 1.0, "b": 1.0}
    linear = reduction_factors({"a": 2, "b": 6}, "linear")
    assert linear == {"a": 0.5, "b": 1.5}


@pytest.mark.parametrize("size", [0, -3, 2.5, True, "4"], ids=repr)
def test_reduction_factors_reject_bad_sizes_naming_the_task(size):
    with pytest.raises(ValueError, match=r"task `countdown`.*got"):
        reduction_factors({"pointer": 2, "countdown": size})


def test_reduction_factors_reject_unknown_correction_and_empty_mapping():
    with pytest.raises(ValueError, match="`correction` must be one of"):
        reduction_factors({"a": 2}, "cube")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one task"):
        reduction_factors({})


# ------------------------------------------------------------------------------------- Huber


def test_huber_equals_torch_without_mask_or_clip():
    pred = torch.randn(4, 7, dtype=torch.float64) * 3
    target = torch.randn(4, 7, dtype=torch.float64) * 3
    for delta in (0.5, 1.0, 2.5):
        torch.testing.assert_close(
            huber_loss(pred, target, delta=delta), F.huber_loss(pred, target, delta=delta)
        )


def test_huber_hand_computed_with_mask_and_clip():
    pred = torch.zeros(2, 3, dtype=torch.float64)
    target = torch.tensor([[0.5, 30.0, 7.0], [-2.0, 1.0, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # valid residuals: 0.5 -> 0.125; 30 clipped to 20 -> 19.5; -2 -> 1.5; mean = 21.125 / 3
    loss = huber_loss(pred, target, mask=mask, target_clip=(-20.0, 20.0))
    torch.testing.assert_close(loss, torch.tensor(21.125 / 3, dtype=torch.float64))


def test_huber_mask_ignores_nan_padding_in_value_and_gradient():
    pred = torch.zeros(5, requires_grad=True)
    target = torch.tensor([1.0, 2.0, float("nan"), float("inf"), float("-inf")])
    mask = torch.tensor([True, True, False, False, False])
    loss = huber_loss(pred, target, mask=mask)
    loss.backward()
    torch.testing.assert_close(loss, torch.tensor((0.5 + 1.5) / 2))
    torch.testing.assert_close(pred.grad, torch.tensor([-0.5, -0.5, 0.0, 0.0, 0.0]))


def test_huber_no_valid_element_gives_zero_and_zero_gradient():
    pred = torch.randn(3, 4, requires_grad=True)
    target = torch.full((3, 4), float("nan"))
    loss = huber_loss(pred, target, mask=torch.zeros(3, 4, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert pred.grad is not None
    assert torch.equal(pred.grad, torch.zeros(3, 4))


def test_huber_mask_broadcasts_over_trailing_dims():
    pred = torch.randn(2, 5, 3, dtype=torch.float64)
    target = torch.randn(2, 5, 3, dtype=torch.float64)
    steps = torch.tensor([[True] * 3 + [False] * 2, [True] * 5])  # (batch, time)
    loss = huber_loss(pred, target, mask=steps.unsqueeze(-1))
    expected = F.huber_loss(pred[steps], target[steps])
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"delta": 0.0}, "`delta` must be"),
        ({"delta": -1.0}, r"`delta` must be a finite number > 0, got -1.0"),
        ({"delta": float("nan")}, "`delta` must be"),
        ({"target_clip": (3.0, -3.0)}, "`target_clip` must be"),
        ({"mask": torch.ones(3)}, "`mask` must be a boolean tensor"),
    ],
    ids=["zero-delta", "negative-delta", "nan-delta", "inverted-clip", "float-mask"],
)
def test_huber_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        huber_loss(torch.zeros(3), torch.zeros(3), **kwargs)


def test_huber_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"same shape, got \(3,\) and \(3, 1\)"):
        huber_loss(torch.zeros(3), torch.zeros(3, 1))


def test_huber_gradcheck_off_the_kink():
    pred = torch.tensor([0.1, -0.3, 2.0, -4.0, 0.7, 1.5], dtype=torch.float64, requires_grad=True)
    target = torch.zeros(6, dtype=torch.float64)
    mask = torch.tensor([True, True, True, True, False, True])
    assert torch.autograd.gradcheck(lambda p: huber_loss(p, target, mask=mask), (pred,))
    assert torch.autograd.gradcheck(lambda p: huber_loss(p, target, delta=0.5), (pred,))


finite = st.floats(-50, 50, allow_nan=False)


@given(
    residual=st.floats(1e-3, 50.0),
    delta=st.floats(0.05, 10.0),
)
def test_huber_quadratic_inside_linear_outside(residual, delta):
    pred = torch.tensor([residual], dtype=torch.float64, requires_grad=True)
    loss = huber_loss(pred, torch.zeros(1, dtype=torch.float64), delta=delta)
    (grad,) = torch.autograd.grad(loss, pred)
    if residual <= delta:
        expected_value, expected_grad = 0.5 * residual**2, residual
    else:
        expected_value, expected_grad = delta * (residual - 0.5 * delta), delta
    assert math.isclose(loss.item(), expected_value, rel_tol=1e-12)
    assert math.isclose(grad.item(), expected_grad, rel_tol=1e-12)


@given(
    values=st.lists(st.tuples(finite, finite, st.booleans()), min_size=1, max_size=40),
    delta=st.floats(0.1, 5.0),
)
def test_huber_masked_mean_is_mean_over_selected(values, delta):
    pred = torch.tensor([v[0] for v in values], dtype=torch.float64)
    target = torch.tensor([v[1] for v in values], dtype=torch.float64)
    mask = torch.tensor([v[2] for v in values])
    loss = huber_loss(pred, target, delta=delta, mask=mask)
    if mask.any():
        expected = F.huber_loss(pred[mask], target[mask], delta=delta)
    else:
        expected = torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=1e-12)
