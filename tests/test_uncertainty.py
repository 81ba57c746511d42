from __future__ import annotations

import io
import math
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from balanced_losses import UncertaintyWeighting
from tests.asserts import by_task, effective_weights


def _losses(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}


def _uw(*args, **kwargs) -> UncertaintyWeighting:
    uw = UncertaintyWeighting(*args, **kwargs).double()
    uw.reset_parameters()  # refill `init` at float64 precision
    return uw


def test_kendall_total_and_gradients_by_hand():
    uw = _uw(["depth", "seg"], kinds={"seg": "classification"})
    with torch.no_grad():
        uw.log_vars.copy_(torch.tensor([0.4, -1.2], dtype=torch.float64))
    losses = _losses(depth=3.0, seg=0.25)
    total = uw(losses)
    # Eq. 7 / Eq. 10: 0.5 e^{-s} L + s/2 and e^{-s} L + s/2
    expected = 0.5 * math.exp(-0.4) * 3.0 + 0.2 + math.exp(1.2) * 0.25 - 0.6
    assert total.item() == pytest.approx(expected, rel=1e-12)
    (grad_s,) = torch.autograd.grad(total, uw.log_vars, retain_graph=True)
    expected_grad = [-0.5 * math.exp(-0.4) * 3.0 + 0.5, -math.exp(1.2) * 0.25 + 0.5]
    torch.testing.assert_close(grad_s, torch.tensor(expected_grad, dtype=torch.float64))
    w = effective_weights(total, losses)
    assert w["depth"].item() == pytest.approx(0.5 * math.exp(-0.4), rel=1e-12)
    assert w["seg"].item() == pytest.approx(math.exp(1.2), rel=1e-12)
    assert by_task(uw)["seg"].item() == pytest.approx(math.exp(1.2), rel=1e-12)


def test_positive_regularizer_by_hand():
    uw = _uw(["a"], regularizer="positive", init=0.3)
    total = uw(_losses(a=2.0))
    expected = 0.5 * math.exp(-0.3) * 2.0 + math.log(1 + math.exp(0.3))
    assert total.item() == pytest.approx(expected, rel=1e-12)


def test_kendall_total_goes_negative_for_small_losses_and_positive_does_not():
    losses = _losses(a=1e-3, b=1e-4)
    kendall = _uw(["a", "b"], init=math.log(1e-3))
    positive = _uw(["a", "b"], regularizer="positive", init=math.log(1e-3))
    assert kendall(losses).item() < 0
    assert positive(losses).item() > 0


@given(loss=st.floats(1e-6, 1e6), kind=st.sampled_from(["regression", "classification"]))
def test_gradient_wrt_s_vanishes_at_the_closed_form_optimum(loss, kind):
    uw = _uw(["t"], kinds={"t": kind})
    optimum = math.log(loss) if kind == "regression" else math.log(2 * loss)
    with torch.no_grad():
        uw.log_vars.fill_(optimum)
    (grad_s,) = torch.autograd.grad(uw(_losses(t=loss)), uw.log_vars)
    assert abs(grad_s.item()) < 1e-12
    # ... and the weight there is 1/(2L) for both kinds: a loss-value normalization.
    assert by_task(uw)["t"].item() == pytest.approx(1 / (2 * loss), rel=1e-9)


@given(
    losses=st.lists(st.floats(1e-12, 1e12), min_size=1, max_size=6),
    init=st.floats(-5, 5),
    regularizer=st.sampled_from(["kendall", "positive"]),
)
def test_finite_total_and_positive_weights_for_positive_losses(losses, init, regularizer):
    uw = UncertaintyWeighting(
        [f"t{i}" for i in range(len(losses))], init=init, regularizer=regularizer
    )
    total = uw({f"t{i}": torch.tensor(v) for i, v in enumerate(losses)})
    assert torch.isfinite(total)
    assert bool((uw.last_weights > 0).all())
    if regularizer == "positive":
        assert total.item() > 0


def test_reduction_factor_correction_multiplies_each_loss():
    uw = _uw(
        ["pointer", "countdown"], output_sizes={"pointer": 1, "countdown": 9}, correction="sqrt"
    )
    losses = _losses(pointer=1.0, countdown=1.0)
    w = effective_weights(uw(losses), losses)
    # relative factors sqrt(1), sqrt(9) over their mean 2: 0.5 and 1.5, times 1/2 (regression)
    assert w["pointer"].item() == pytest.approx(0.25, rel=1e-12)
    assert w["countdown"].item() == pytest.approx(0.75, rel=1e-12)
    torch.testing.assert_close(
        uw.last_weights, torch.tensor([0.5 * 0.5, 0.5 * 1.5], dtype=torch.float64)
    )


def test_missing_task_adds_neither_loss_nor_regularizer():
    uw = _uw(["a", "b"], init=0.7, allow_missing=True)
    total = uw({"a": torch.tensor(2.0, dtype=torch.float64)})
    assert total.item() == pytest.approx(0.5 * math.exp(-0.7) * 2.0 + 0.35, rel=1e-12)
    total.backward()
    assert uw.log_vars.grad is not None
    assert uw.log_vars.grad[1].item() == 0.0
    assert by_task(uw)["b"].item() == 0.0


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"kinds": {"c": "regression"}},
            KeyError,
            r"unknown task `c`; expected one of \['a', 'b'\]",
        ),
        ({"kinds": {"a": "ranking"}}, ValueError, r"kind of task `a` must be .*got 'ranking'"),
        ({"regularizer": "l2"}, ValueError, r"`regularizer` must be .*got 'l2'"),
        ({"init": float("nan")}, ValueError, r"`init` must be a finite number, got nan"),
        ({"correction": "sqrt"}, ValueError, r"`correction='sqrt'` needs `output_sizes`"),
        ({"output_sizes": {"a": 2}}, KeyError, r"must name exactly the tasks"),
    ],
    ids=["kind-task", "kind-value", "regularizer", "init", "no-sizes", "sizes-tasks"],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        UncertaintyWeighting(["a", "b"], **kwargs)


def test_tasks_given_as_a_string_is_an_error():
    with pytest.raises(TypeError, match="sequence of task names"):
        UncertaintyWeighting("ab")


def test_unknown_task_in_forward_names_it():
    uw = UncertaintyWeighting(["pointer", "countdown"])
    with pytest.raises(KeyError, match=r"unknown task `countdwn`; expected one of"):
        uw({"pointer": torch.tensor(1.0), "countdwn": torch.tensor(1.0)})


def test_trains_s_towards_log_loss():
    uw = UncertaintyWeighting(["a", "b"])
    opt = torch.optim.SGD(uw.parameters(), lr=0.5)
    for _ in range(300):
        opt.zero_grad()
        uw({"a": torch.tensor(4.0), "b": torch.tensor(0.1)}).backward()
        opt.step()
    torch.testing.assert_close(uw.log_vars.detach(), torch.tensor([math.log(4.0), math.log(0.1)]))


def test_state_dict_round_trip_pickle_and_repr():
    uw = UncertaintyWeighting(["a", "b"], kinds={"b": "classification"}, init=0.5)
    with torch.no_grad():
        uw.log_vars.add_(torch.tensor([0.1, -0.2]))
    buffer = io.BytesIO()
    torch.save(uw.state_dict(), buffer)
    buffer.seek(0)
    loaded = UncertaintyWeighting(["a", "b"], kinds={"b": "classification"})
    loaded.load_state_dict(torch.load(buffer))
    assert torch.equal(loaded.log_vars, uw.log_vars)
    assert set(uw.state_dict()) == {"log_vars", "_extra_state"}
    clone = pickle.loads(pickle.dumps(uw))
    losses = {"a": torch.tensor(1.0), "b": torch.tensor(2.0)}
    assert torch.equal(clone(losses), uw(losses))
    assert repr(uw) == (
        "UncertaintyWeighting(tasks=['a', 'b'], regularizer='kendall', "
        "kinds={'b': 'classification'})"
    )
    uw.reset()
    assert uw.log_vars.tolist() == [0.5, 0.5]


def test_compile_fullgraph_equals_eager():
    uw = UncertaintyWeighting(["a", "b"], init=0.2, allow_missing=True)
    compiled = torch.compile(uw, fullgraph=True, backend="aot_eager")
    for losses in ({"a": torch.tensor(1.5), "b": torch.tensor(0.3)}, {"a": torch.tensor(2.0)}):
        torch.testing.assert_close(compiled(losses), uw(losses))


def test_correction_survives_training_because_it_multiplies_the_whole_term():
    uw = UncertaintyWeighting(
        ["p", "c"], output_sizes={"p": 2, "c": 98}, correction="sqrt", init=0.0
    )
    opt = torch.optim.SGD(uw.parameters(), lr=0.2)
    losses = {"p": torch.tensor(0.2), "c": torch.tensor(15.7)}
    for _ in range(1500):
        opt.zero_grad()
        uw(losses).backward()
        opt.step()
    # s -> log L whatever c_k is, so the weight -> c_k / (2 L_k), with c = (0.25, 1.75).
    torch.testing.assert_close(uw.log_vars.detach(), torch.log(torch.tensor([0.2, 15.7])))
    torch.testing.assert_close(
        uw.last_weights, torch.tensor([0.25 / 0.4, 1.75 / 31.4]), rtol=1e-4, atol=0
    )
