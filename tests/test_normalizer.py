from __future__ import annotations

import copy
import io
import math
import pickle

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from balanced_losses import LossNormalizer
from balanced_losses.functional import huber_loss
from tests.asserts import by_task, effective_weights


def _losses(**values: float) -> dict[str, torch.Tensor]:
    return {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}


# --------------------------------------------------------------------------- the formula itself


def test_first_step_is_normalized_by_its_own_value():
    norm = LossNormalizer({"pointer": 2, "countdown": 98}, weights={"pointer": 0.7}).double()
    losses = _losses(pointer=0.2, countdown=15.7)
    total = norm(losses)
    # c = sqrt(N) / mean(sqrt(N)) = (0.25, 1.75); w = (0.7, 1); m = L at step 1
    w = effective_weights(total, losses)
    torch.testing.assert_close(w["pointer"], torch.tensor(0.7 * 0.25 / 0.2, dtype=torch.float64))
    torch.testing.assert_close(w["countdown"], torch.tensor(1.75 / 15.7, dtype=torch.float64))
    # The user's factor scales the gradient, not the value: L_k / m_k = 1 at the first step.
    torch.testing.assert_close(total, torch.tensor(0.25 + 1.75, dtype=torch.float64))
    torch.testing.assert_close(by_task(norm)["countdown"], torch.tensor(1.75 / 15.7).double())


def test_bias_corrected_ema_matches_hand_computation():
    beta = 0.8
    norm = LossNormalizer({"a": 1}, momentum=beta, correction="none").double()
    sequence = [4.0, 2.0, 10.0]
    for loss in sequence:
        norm(_losses(a=loss))
    ema = 0.0
    for loss in sequence:
        ema = beta * ema + (1 - beta) * loss
    expected = ema / (1 - beta ** len(sequence))
    torch.testing.assert_close(norm.running_mean, torch.tensor([expected], dtype=torch.float64))
    assert norm.count.tolist() == [3]
    torch.testing.assert_close(by_task(norm)["a"], torch.tensor(1 / expected, dtype=torch.float64))


def test_momentum_zero_normalizes_every_step_by_itself():
    norm = LossNormalizer({"a": 3, "b": 12}, momentum=0.0).double()
    for a, b in [(1.0, 50.0), (0.01, 3.0), (7.0, 1e-3)]:
        total = norm(_losses(a=a, b=b))
        torch.testing.assert_close(total, torch.tensor(2.0, dtype=torch.float64))


@pytest.mark.parametrize(
    ("correction", "ratio"),
    [("none", 1.0), ("sqrt", 5.0), ("linear", 25.0)],
    ids=["none", "sqrt", "linear"],
)
def test_correction_sets_the_ratio_of_factors(correction, ratio):
    norm = LossNormalizer({"small": 1, "large": 25}, correction=correction)
    assert norm.factors[1].item() / norm.factors[0].item() == pytest.approx(ratio)
    assert norm.factors.mean().item() == pytest.approx(1.0)


def test_write_up_gradient_ratio_is_reproduced():
    # The write-up's setup at initialization: equal per-element gradient magnitudes, sizes 2/105.
    preds = {"pointer": torch.zeros(2, requires_grad=True), "countdown": torch.zeros(105)}
    preds["countdown"].requires_grad_(True)
    targets = {"pointer": torch.full((2,), 3.0), "countdown": torch.full((105,), 3.0)}
    losses = {k: huber_loss(preds[k], targets[k]) for k in preds}
    for correction, expected in [("none", math.sqrt(2 / 105)), ("sqrt", 1.0)]:
        norm = LossNormalizer({"pointer": 2, "countdown": 105}, correction=correction)
        grads = torch.autograd.grad(norm(losses), list(preds.values()), retain_graph=True)
        ratio = grads[1].norm() / grads[0].norm()
        assert ratio.item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------- property tests


@given(
    sizes=st.lists(st.integers(1, 3000), min_size=2, max_size=5),
    magnitude=st.floats(1e-3, 1e3),
    delta=st.floats(0.1, 10.0),
    data=st.data(),
)
def test_sqrt_correction_equalizes_gradient_norms_at_equal_per_element_magnitude(
    sizes, magnitude, delta, data
):
    tasks = {f"task{i}": n for i, n in enumerate(sizes)}
    preds, losses = {}, {}
    for name, n in tasks.items():
        signs = data.draw(st.lists(st.sampled_from([-1.0, 1.0]), min_size=n, max_size=n))
        preds[name] = torch.zeros(n, dtype=torch.float64, requires_grad=True)
        target = torch.tensor(signs, dtype=torch.float64) * magnitude
        losses[name] = huber_loss(preds[name], target, delta=delta)
    norms = {}
    for correction in ("sqrt", "none"):
        norm = LossNormalizer(tasks, correction=correction).to(torch.float64)
        total = norm(losses)
        grads = torch.autograd.grad(total, list(preds.values()), retain_graph=True)
        norms[correction] = [g.norm().item() for g in grads]
    ref = norms["sqrt"][0]
    for value in norms["sqrt"]:
        assert value == pytest.approx(ref, rel=1e-5)
    # Without the correction the gap is exactly sqrt(N_i / N_j).
    for i, n_i in enumerate(sizes):
        gap = norms["none"][0] / norms["none"][i]
        assert gap == pytest.approx(math.sqrt(n_i / sizes[0]), rel=1e-5)


@given(
    scale=st.floats(1e-6, 1e6),
    sequence=st.lists(
        st.tuples(st.floats(0.01, 100), st.floats(0.01, 100)), min_size=1, max_size=8
    ),
    momentum=st.floats(0.0, 0.99),
)
def test_total_is_invariant_to_scaling_a_loss(scale, sequence, momentum):
    plain = LossNormalizer({"a": 2, "b": 50}, momentum=momentum).to(torch.float64)
    scaled = LossNormalizer({"a": 2, "b": 50}, momentum=momentum).to(torch.float64)
    for a, b in sequence:
        t_plain = plain(_losses(a=a, b=b))
        t_scaled = scaled(_losses(a=a, b=b * scale))
        torch.testing.assert_close(t_scaled, t_plain, rtol=1e-9, atol=0)


@given(
    losses=st.lists(st.floats(1e-12, 1e12), min_size=1, max_size=6),
    steps=st.integers(1, 4),
    correction=st.sampled_from(["none", "sqrt", "linear"]),
)
def test_outputs_finite_and_weights_positive_for_any_positive_losses(losses, steps, correction):
    sizes = {f"t{i}": 1 + 7 * i for i in range(len(losses))}
    norm = LossNormalizer(sizes, correction=correction)
    for _ in range(steps):
        total = norm({f"t{i}": torch.tensor(v) for i, v in enumerate(losses)})
        assert torch.isfinite(total)
        assert bool((norm.last_weights > 0).all())
        assert bool(torch.isfinite(norm.last_weights).all())
        assert bool(torch.isfinite(norm.running_mean).all())


def test_permuting_task_order_permutes_nothing_else():
    a = LossNormalizer({"x": 2, "y": 9, "z": 40})
    b = LossNormalizer({"z": 40, "x": 2, "y": 9})
    for step in range(4):
        values = {"x": 0.5 + step, "y": 3.0 / (step + 1), "z": 12.0}
        ta, tb = a(_losses(**values)), b(_losses(**values))
        torch.testing.assert_close(ta, tb)
        for task in values:
            torch.testing.assert_close(by_task(a)[task], by_task(b)[task])


# --------------------------------------------------------------- statistics: when they move


def test_non_finite_loss_never_enters_statistics():
    dirty = LossNormalizer({"a": 2, "b": 7})
    reference = LossNormalizer({"b": 7})  # sees only the finite values of `b`
    dirty(_losses(a=1.0, b=2.0))
    reference(_losses(b=2.0))
    for bad in (float("nan"), float("inf"), float("-inf")):
        total = dirty(_losses(a=3.0, b=bad))
        assert not torch.isfinite(total)  # the problem stays visible in the total
        assert bool(torch.isfinite(dirty.ema).all())
    assert dirty.count.tolist() == [4, 1]
    assert torch.equal(dirty.ema[1], reference.ema[0])
    # The next finite step behaves as if the bad steps had not happened for `b`.
    dirty(_losses(a=3.0, b=5.0))
    reference(_losses(b=5.0))
    assert torch.equal(dirty.running_mean[1], reference.running_mean[0])
    torch.testing.assert_close(by_task(dirty)["b"] / dirty.factors[1], by_task(reference)["b"])


def test_eval_mode_uses_but_does_not_update_statistics():
    norm = LossNormalizer({"a": 1, "b": 1}, correction="none").double()
    norm(_losses(a=2.0, b=4.0))
    ema, count = norm.ema.clone(), norm.count.clone()
    norm.eval()
    total = norm(_losses(a=1.0, b=1.0))
    assert torch.equal(norm.ema, ema)
    assert torch.equal(norm.count, count)
    torch.testing.assert_close(total, torch.tensor(1 / 2 + 1 / 4, dtype=torch.float64))


def test_eval_before_any_training_normalizes_by_current_value():
    norm = LossNormalizer({"a": 1, "b": 4}, correction="none").double().eval()
    total = norm(_losses(a=3.0, b=0.5))
    torch.testing.assert_close(total, torch.tensor(2.0, dtype=torch.float64))
    assert norm.count.tolist() == [0, 0]


def test_reset_running_stats_forgets_everything():
    norm = LossNormalizer({"a": 1})
    norm(_losses(a=5.0))
    norm.reset()
    assert norm.count.tolist() == [0]
    assert norm.ema.tolist() == [0.0]
    assert norm.last_weights.tolist() == [0.0]


# ---------------------------------------------------------------------- gradient accumulation


def test_accumulation_window_matches_one_step_on_the_full_batch():
    sizes = {"a": 2, "b": 50}
    full = LossNormalizer(sizes, momentum=0.7).double()
    micro = LossNormalizer(sizes, momentum=0.7, accumulation_steps=3).double()
    gen = torch.Generator().manual_seed(3)
    for _ in range(4):
        parts = 0.1 + torch.rand(3, 2, generator=gen, dtype=torch.float64) * 10
        for j in range(3):
            micro({"a": parts[j, 0], "b": parts[j, 1]})
            if j < 2:  # mid-window: the committed statistics have not moved yet
                assert micro.micro_step.item() == j + 1
        full({"a": parts[:, 0].mean(), "b": parts[:, 1].mean()})
        torch.testing.assert_close(micro.last_weights, full.last_weights, rtol=1e-12, atol=0)
        torch.testing.assert_close(micro.ema, full.ema, rtol=1e-12, atol=0)
        assert torch.equal(micro.count, full.count)
        assert micro.micro_step.item() == 0


def test_accumulation_first_micro_batch_uses_what_it_has_seen():
    micro = LossNormalizer({"a": 1}, accumulation_steps=2, correction="none").double()
    micro(_losses(a=4.0))
    torch.testing.assert_close(by_task(micro)["a"], torch.tensor(0.25, dtype=torch.float64))
    assert micro.count.tolist() == [0]
    micro(_losses(a=2.0))  # window mean 3.0 commits
    torch.testing.assert_close(micro.running_mean, torch.tensor([3.0], dtype=torch.float64))
    assert micro.count.tolist() == [1]


def test_accumulation_steps_must_be_a_positive_integer():
    with pytest.raises(ValueError, match=r"`accumulation_steps` must be an integer >= 1, got 0"):
        LossNormalizer({"a": 1}, accumulation_steps=0)


# ----------------------------------------------------------------------------- partial labels


def test_missing_task_is_skipped_when_allowed():
    norm = LossNormalizer({"a": 1, "b": 1}, correction="none", allow_missing=True).double()
    norm(_losses(a=2.0, b=4.0))
    for partial in ({"a": torch.tensor(6.0)}, {"a": torch.tensor(6.0), "b": None}):
        total = norm(partial)
        assert torch.isfinite(total)
        assert by_task(norm)["b"].item() == 0.0
    assert norm.count.tolist() == [3, 1]
    torch.testing.assert_close(norm.running_mean[1], torch.tensor(4.0, dtype=torch.float64))


def test_empty_mapping_with_allow_missing_gives_zero():
    norm = LossNormalizer({"a": 1}, allow_missing=True)
    assert norm({}).item() == 0.0
    assert norm.count.tolist() == [0]


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("losses", "error", "match"),
    [
        ({"pointer": 1.0, "countdwn": 1.0}, KeyError, r"unknown task `countdwn`; expected one of"),
        ({"pointer": 1.0}, KeyError, r"missing loss for task\(s\) \['countdown'\]"),
    ],
    ids=["misspelled", "missing"],
)
def test_bad_task_names_raise_naming_the_task(losses, error, match):
    norm = LossNormalizer({"pointer": 2, "countdown": 105})
    with pytest.raises(error, match=match):
        norm({k: torch.tensor(v) for k, v in losses.items()})


def test_non_scalar_loss_raises_with_shape():
    norm = LossNormalizer({"pointer": 2, "countdown": 105})
    with pytest.raises(
        ValueError, match=r"task `countdown` must be a scalar.*got shape \(4, 105\)"
    ):
        norm({"pointer": torch.tensor(1.0), "countdown": torch.ones(4, 105)})


def test_non_tensor_loss_raises_type_error():
    norm = LossNormalizer({"a": 1})
    with pytest.raises(TypeError, match="loss of task `a` must be a Tensor"):
        norm({"a": 1.0})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"output_sizes": {"a": 0}}, ValueError, r"output size of task `a` must be .*got 0"),
        ({"output_sizes": {}}, ValueError, "at least one task"),
        ({"momentum": 1.0}, ValueError, r"`momentum` must be in \[0, 1\), got 1.0"),
        ({"eps": 0.0}, ValueError, r"`eps` must be a finite number > 0.0, got 0.0"),
        (
            {"weights": {"b": 1.0}},
            KeyError,
            r"unknown task\(s\) `b` in `weights`; expected one of \['a'\]",
        ),
        ({"weights": {"a": -1.0}}, ValueError, r"`weights` of task `a` must be >= 0, got -1.0"),
        ({"correction": "cubic"}, ValueError, "`correction` must be one of"),
    ],
    ids=["size", "empty", "momentum", "eps", "weight-task", "weight-value", "correction"],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    arguments = {"output_sizes": {"a": 1}} | kwargs
    with pytest.raises(error, match=match):
        LossNormalizer(**arguments)


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (-0.5, r"loss of task `b` must be >= 0, got -0.5"),
        (float("nan"), r"loss of task `b` must be finite, got nan"),
        (float("inf"), r"loss of task `b` must be finite, got inf"),
    ],
    ids=["negative", "nan", "inf"],
)
def test_check_inputs_raises_on_bad_values(value, match):
    norm = LossNormalizer({"a": 1, "b": 1}, check_inputs=True)
    with pytest.raises(ValueError, match=match):
        norm({"a": torch.tensor(1.0), "b": torch.tensor(value)})
    assert norm.count.tolist() == [0, 0]  # nothing was recorded on the failed call


# ---------------------------------------------------------------------- state and round trips


def _run(norm: LossNormalizer, steps: range) -> list[torch.Tensor]:
    return [norm(_losses(a=1.0 + 0.3 * t, b=20.0 / (t + 1))) for t in steps]


def test_state_dict_resume_is_identical():
    reference = LossNormalizer({"a": 2, "b": 105}, momentum=0.95)
    expected = _run(reference, range(10))
    first = LossNormalizer({"a": 2, "b": 105}, momentum=0.95)
    _run(first, range(4))
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = LossNormalizer({"a": 2, "b": 105}, momentum=0.95)
    resumed.load_state_dict(torch.load(buffer))
    for got, want in zip(_run(resumed, range(4, 10)), expected[4:], strict=True):
        assert torch.equal(got, want)
    assert set(first.state_dict()) == {
        "ema",
        "count",
        "pending_sum",
        "pending_count",
        "micro_step",
        "_extra_state",
    }


def test_pickle_deepcopy_and_float64():
    reference = LossNormalizer({"a": 2, "b": 105})
    expected = _run(reference, range(5))  # uninterrupted: what every copy must continue with
    norm = LossNormalizer({"a": 2, "b": 105})
    _run(norm, range(3))
    for clone in (pickle.loads(pickle.dumps(norm)), copy.deepcopy(norm)):
        assert clone is not norm
        assert clone.ema.data_ptr() != norm.ema.data_ptr()  # its own statistics
        got = _run(clone, range(3, 5))
        for g, want in zip(got, expected[3:], strict=True):
            assert torch.equal(g, want)
    assert norm.count.tolist() == [3, 3]  # the copies' steps did not reach the original
    wide = copy.deepcopy(norm).to(torch.float64)
    assert wide.ema.dtype == torch.float64
    torch.testing.assert_close(
        _run(wide, range(3, 5)), expected[3:], rtol=1e-6, atol=0, check_dtype=False
    )


def test_version_1_checkpoint_without_accumulation_window_loads():
    norm = LossNormalizer({"a": 1, "b": 3})
    _run(norm, range(3))
    old = norm.state_dict()
    for key in ("pending_sum", "pending_count", "micro_step"):
        del old[key]
    old._metadata[""]["version"] = 1  # type: ignore[attr-defined]
    resumed = LossNormalizer({"a": 1, "b": 3})
    resumed.load_state_dict(old)  # strict: the upgrade supplies the missing window
    assert torch.equal(resumed.ema, norm.ema)
    assert resumed.micro_step.item() == 0
    torch.testing.assert_close(_run(resumed, range(3, 5)), _run(norm, range(3, 5)))


def test_state_dict_without_version_metadata_loads():
    norm = LossNormalizer({"a": 1, "b": 3})
    _run(norm, range(3))
    state = norm.state_dict()
    del state._metadata[""]["version"]  # type: ignore[attr-defined]
    resumed = LossNormalizer({"a": 1, "b": 3})
    resumed.load_state_dict(state)  # strict: no key may be missing or unexpected
    for key, value in norm.state_dict().items():
        got = resumed.state_dict()[key]
        assert torch.equal(got, value) if isinstance(value, torch.Tensor) else got == value, key
    assert resumed.count.tolist() == [3, 3]
    for got, want in zip(_run(resumed, range(3, 5)), _run(norm, range(3, 5)), strict=True):
        assert torch.equal(got, want)


def test_repr_shows_hyperparameters():
    norm = LossNormalizer({"a": 2}, momentum=0.5, correction="none")
    assert repr(norm) == (
        "LossNormalizer(tasks=['a'], output_sizes={'a': 2}, momentum=0.5, correction='none', "
        "eps=1e-08)"
    )


def test_tasks_first_with_sizes_by_keyword_is_the_mapping_form():
    # The form every other class takes (tasks first), and the earlier mapping form, agree.
    losses = {"a": torch.tensor(0.2), "b": torch.tensor(15.7)}
    by_keyword = LossNormalizer(["a", "b"], output_sizes={"a": 2, "b": 98})
    by_mapping = LossNormalizer({"a": 2, "b": 98})
    by_sizes_alone = LossNormalizer(output_sizes={"a": 2, "b": 98})
    totals = [m(losses) for m in (by_keyword, by_mapping, by_sizes_alone)]
    assert totals[0] == totals[1] == totals[2]
    assert torch.equal(by_keyword.factors, by_mapping.factors)


def test_sizes_that_do_not_name_the_tasks_are_an_error():
    with pytest.raises(
        KeyError, match=r"exactly the tasks \['a', 'b'\], in that order, got \['b', 'a'\]"
    ):
        LossNormalizer(["a", "b"], output_sizes={"b": 2, "a": 98})
    with pytest.raises(TypeError, match="give the output sizes once"):
        LossNormalizer({"a": 2}, output_sizes={"a": 2})
    with pytest.raises(TypeError, match="needs `tasks`"):
        LossNormalizer()


def test_compile_fullgraph_equals_eager():
    eager = LossNormalizer({"a": 2, "b": 105}, allow_missing=True)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    for t in range(3):
        losses = {"a": torch.tensor(1.0 + t), "b": torch.tensor(30.0 / (t + 1))}
        torch.testing.assert_close(compiled(losses), eager(losses))
    torch.testing.assert_close(compiled_module.ema, eager.ema)
    assert torch.equal(compiled_module.count, eager.count)
