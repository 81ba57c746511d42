"""Every weighting where users train: compile, resume, AMP, partial labels, hostile input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import Tensor, nn

import balanced_losses as bl
from tests.registry import CASES, Case, learnable

TASKS = ("pointer", "countdown", "aux")


class TwoHeads(nn.Module):
    """A shared trunk and one head per task, each head with its own output size."""

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(16, 1 + 13 * i) for i, t in enumerate(TASKS)})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.trunk(x)
        return {t: head(feats) for t, head in self.heads.items()}


def _batch(step: int) -> tuple[Tensor, dict[str, Tensor]]:
    gen = torch.Generator().manual_seed(step)
    x = torch.randn(8, 4, generator=gen)
    targets = {t: 3 * torch.randn(8, 1 + 13 * i, generator=gen) for i, t in enumerate(TASKS)}
    return x, targets


def _losses(model: TwoHeads, step: int) -> dict[str, Tensor]:
    x, targets = _batch(step)
    out = model(x)
    return {t: bl.functional.huber_loss(out[t], targets[t]) for t in TASKS}


def _train(
    case: Case,
    model: TwoHeads,
    weighting: bl.Weighting,
    opt: torch.optim.Optimizer,
    steps: range,
) -> list[Tensor]:
    totals = []
    for step in steps:
        opt.zero_grad()
        losses = _losses(model, step)
        total = weighting(losses)
        total.backward()
        opt.step()
        totals.append(total.detach())
        if case.after_step is not None:
            case.after_step(weighting, {t: v.detach() for t, v in _losses(model, step).items()})
        if case.epoch_end is not None and (step + 1) % case.epoch_length == 0:
            case.epoch_end(weighting)
    return totals


def _fresh(case: Case) -> tuple[TwoHeads, bl.Weighting, torch.optim.Optimizer]:
    torch.manual_seed(1)
    model = TwoHeads()
    weighting = case.build(TASKS, False)
    opt = torch.optim.Adam([*model.parameters(), *learnable(weighting)], lr=1e-2)
    return model, weighting, opt


@pytest.mark.parametrize("case", CASES, ids=str)
def test_resume_from_checkpoint_is_bit_identical(case):
    model_ref, weighting_ref, opt_ref = _fresh(case)
    expected = _train(case, model_ref, weighting_ref, opt_ref, range(8))

    model, weighting, opt = _fresh(case)
    _train(case, model, weighting, opt, range(4))
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "w": weighting.state_dict()}, buffer
    )
    buffer.seek(0)
    state = torch.load(buffer)
    model2, weighting2, opt2 = _fresh(case)
    model2.load_state_dict(state["model"])
    weighting2.load_state_dict(state["w"])
    opt2.load_state_dict(state["opt"])
    resumed = _train(case, model2, weighting2, opt2, range(4, 8))

    for got, want in zip(resumed, expected[4:], strict=True):
        assert torch.equal(got, want)
    for p, q in zip(model_ref.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)
    for key, value in weighting_ref.state_dict().items():
        assert _same(weighting2.state_dict()[key], value), key


def _assert_state_close(got: dict, want: dict) -> None:
    """Tensors close (assert_close's default tolerances), everything else equal."""
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, Tensor):
            torch.testing.assert_close(got[key], value, msg=key)
        else:
            assert got[key] == value, key


def _same(a: object, b: object) -> bool:
    """Bitwise equality of tensors, recursively through dicts, lists and tuples."""
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("case", CASES, ids=str)
def test_compile_fullgraph_equals_eager(case):
    eager = case.build(TASKS, True)
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    steps = [
        {"pointer": 0.5, "countdown": 12.0, "aux": 3.0},
        {"pointer": 0.4, "countdown": 11.0, "aux": 2.5},
        {"pointer": 0.3, "aux": 2.0},
    ]
    for values in steps:
        losses = {t: torch.tensor(v, requires_grad=True) for t, v in values.items()}
        got, want = compiled(losses), eager(losses)
        torch.testing.assert_close(got, want)
        (g_got,) = torch.autograd.grad(got, losses["pointer"])
        (g_want,) = torch.autograd.grad(want, losses["pointer"])
        torch.testing.assert_close(g_got, g_want)
    _assert_state_close(compiled_module.state_dict(), eager.state_dict())


@pytest.mark.parametrize("case", CASES, ids=str)
def test_autocast_bf16_keeps_statistics_in_float32(case):
    torch.manual_seed(1)
    model = TwoHeads()
    reference = case.build(TASKS, False)
    weighting = copy.deepcopy(reference)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, targets = _batch(0)
        out = model(x)
        assert out["pointer"].dtype == torch.bfloat16
        losses = {t: bl.functional.huber_loss(out[t], targets[t]) for t in TASKS}
        total = weighting(losses)
    assert total.dtype == torch.float32
    for name, buf in weighting.named_buffers():
        assert buf.dtype in (torch.float32, torch.long, torch.bool, torch.uint8), name
    total.backward()
    expected = reference({t: v.detach().float() for t, v in losses.items()})
    torch.testing.assert_close(total.detach(), expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- hostile input

loss_values = st.one_of(
    st.floats(1e-30, 1e30),
    st.just(0.0),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.none(),
)


@pytest.mark.parametrize("case", CASES, ids=str)
@given(
    steps=st.lists(
        st.fixed_dictionaries(dict.fromkeys(TASKS, loss_values)), min_size=1, max_size=5
    ),
    drop=st.lists(st.sampled_from(TASKS), max_size=3),
)
def test_fuzz_never_corrupts_statistics(case, steps, drop):
    weighting = case.build(TASKS, True)
    for values in steps:
        losses = {t: torch.tensor(v) for t, v in values.items() if v is not None and t not in drop}
        if case.positive:
            losses = {t: v for t, v in losses.items() if not (v == 0).item()}
        total = weighting(losses)
        finite_input = all(math.isfinite(v.item()) for v in losses.values())
        if finite_input:
            assert torch.isfinite(total), (values, total)
            # A logged weight may overflow where the true derivative does (GeometricMean's
            # G / (K L_k) at L_k = 1e-30), but it is never NaN or negative.
            assert not bool(torch.isnan(weighting.last_weights).any())
            assert bool((weighting.last_weights >= 0).all())
        for name, tensor in [*weighting.named_buffers(), *weighting.named_parameters()]:
            if tensor.is_floating_point() and name != "last_weights":
                assert bool(torch.isfinite(tensor).all()), name
        if case.after_step is not None and losses:
            case.after_step(weighting, losses)
        if case.epoch_end is not None:
            case.epoch_end(weighting)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_one_task_and_unknown_task(case):
    weighting = case.build(["only"], False)
    assert torch.isfinite(weighting({"only": torch.tensor(2.0)}))
    with pytest.raises(KeyError, match=r"unknown task `other`; expected one of \['only'\]"):
        weighting({"only": torch.tensor(2.0), "other": torch.tensor(1.0)})
    with pytest.raises(KeyError, match=r"missing loss for task\(s\) \['only'\]"):
        weighting({})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("case", CASES, ids=str)
def test_no_host_device_sync_on_cuda(case):
    model = TwoHeads().cuda()
    weighting = case.build(TASKS, True).cuda()
    x, targets = _batch(0)
    x, targets = x.cuda(), {t: v.cuda() for t, v in targets.items()}
    for _ in range(2):  # the second step runs with statistics present
        out = model(x)
        losses = {t: bl.functional.huber_loss(out[t], targets[t]) for t in TASKS}
        torch.cuda.set_sync_debug_mode("error")
        try:
            total = weighting(losses)
            total.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_grad_scaler_overflow_steps_leave_gradient_statistics_finite():
    """Norms that overflow never enter; the multipliers stay finite through skipped steps.

    GradScaler skips a step when any parameter gradient overflows. Where the gradient at the
    shared features, or its norm in the float32 statistics, overflowed, the balancer records
    nothing (at absurd scales such as this test's 2^127 the scaler may not skip such a step);
    where only the trunk's
    parameter gradients overflowed, the finite feature norms of that step do enter the EMA
    (documented: the multipliers are ratios of norms that carry the same scale).
    """

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.trunk = nn.Linear(4, 8)
            self.heads = nn.ModuleDict({"a": nn.Linear(8, 2), "b": nn.Linear(8, 30)})

    torch.manual_seed(0)
    net = Net()
    balancer = bl.GradientBalancer(["a", "b"])
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127, growth_interval=1000)
    x = torch.randn(16, 4)
    targets = {"a": torch.randn(16, 2), "b": 10 * torch.randn(16, 30)}
    overflowed_at_features = skipped_steps = 0
    for _ in range(30):
        opt.zero_grad()
        views = balancer.branch(net.trunk(x))
        losses = {t: bl.functional.huber_loss(net.heads[t](views[t]), targets[t]) for t in "ab"}
        ema, count = balancer.ema.clone(), balancer.count.clone()
        # x1e4 makes the first steps' gradients overflow at the huge initial scale.
        scaler.scale(1e4 * balancer(losses)).backward()
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        skipped_steps += scaler.get_scale() < scale
        bad = ~torch.isfinite(balancer.grad_norms)
        overflowed_at_features += int(bad.any())
        assert torch.equal(balancer.ema[bad], ema[bad])
        assert torch.equal(balancer.count[bad], count[bad])
        assert bool(torch.isfinite(balancer.ema).all())
        assert bool(torch.isfinite(balancer.multipliers()).all())
    assert overflowed_at_features > 0
    assert skipped_steps > 0


class _Trunk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(4, 8)
        self.head_a = nn.Linear(8, 2)
        self.head_b = nn.Linear(8, 30)


def _two_tasks(seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(5, 4, generator=gen),
        torch.randn(5, 2, generator=gen),
        torch.randn(5, 30, generator=gen),
    )


# Dynamo itself instantiates autograd.Function subclasses while tracing and warns about it.
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
@pytest.mark.parametrize(
    ("method", "backend"), [("GradientBalancer", "aot_eager"), ("GradNorm", "eager")]
)
def test_compiled_training_step_equals_eager(method, backend):
    """The whole step compiles with fullgraph=True: model, weighting and its backward logic.

    GradNorm calls ``torch.autograd.grad`` through the model's graph, so it compiles as part of
    the training step (with ``trace_autograd_ops``), not as a module on its own; under
    AOTAutograd backends PyTorch 2.13 gets its gradients wrong (see GradNorm's docstring).
    """
    runs = []
    for compiled in (False, True):
        torch.manual_seed(0)
        net = _Trunk()
        weighting: bl.Weighting
        if method == "GradientBalancer":
            weighting = bl.GradientBalancer(["a", "b"], momentum=0.5)
        else:
            weighting = bl.GradNorm(["a", "b"], net.trunk.weight, lr=0.05)

        def step(x: Tensor, ya: Tensor, yb: Tensor, net: _Trunk = net, w=weighting) -> Tensor:
            feats = net.trunk(x)
            views = (
                w.branch(feats) if isinstance(w, bl.GradientBalancer) else {"a": feats, "b": feats}
            )
            return w(
                {
                    "a": bl.functional.huber_loss(net.head_a(views["a"]), ya),
                    "b": bl.functional.huber_loss(net.head_b(views["b"]), yb),
                }
            )

        fn = torch.compile(step, fullgraph=True, backend=backend) if compiled else step
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        totals = []
        with torch._dynamo.config.patch(trace_autograd_ops=True):
            for seed in range(3):
                opt.zero_grad()
                total = fn(*_two_tasks(seed))
                total.backward()
                opt.step()
                totals.append(total.detach())
        runs.append((totals, [p.detach() for p in net.parameters()], weighting.state_dict()))
    (t_eager, p_eager, s_eager), (t_comp, p_comp, s_comp) = runs
    torch.testing.assert_close(t_comp, t_eager)
    torch.testing.assert_close(p_comp, p_eager)
    _assert_state_close(s_comp, s_eager)


# ------------------------------------------------ regressions found in review (each failed before)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_batch_with_every_task_missing_still_backpropagates(case):
    weighting = case.build(TASKS, True)
    total = weighting({})
    total.backward()  # a training loop's unconditional backward must not raise
    assert total.item() == 0.0


@pytest.mark.parametrize("case", CASES, ids=str)
def test_kept_weights_are_not_overwritten_by_the_next_step(case):
    weighting = case.build(TASKS, False)
    weighting(
        {"pointer": torch.tensor(0.5), "countdown": torch.tensor(12.0), "aux": torch.tensor(3.0)}
    )
    kept = weighting.weights
    snapshot = {t: w.clone() for t, w in kept.items()}
    weighting(
        {"pointer": torch.tensor(0.1), "countdown": torch.tensor(40.0), "aux": torch.tensor(1.0)}
    )
    for task, value in snapshot.items():
        assert torch.equal(kept[task], value), task


@pytest.mark.parametrize("case", CASES, ids=str)
def test_finite_float64_loss_beyond_float32_range_never_enters_statistics(case):
    weighting = case.build(TASKS, False)
    losses = {
        t: torch.tensor(v, dtype=torch.float64)
        for t, v in zip(TASKS, (1e40, 2.0, 3.0), strict=True)
    }
    weighting(losses)
    if case.after_step is not None:
        case.after_step(weighting, losses)
    for name, tensor in [*weighting.named_buffers(), *weighting.named_parameters()]:
        if tensor.is_floating_point() and name != "last_weights":
            assert bool(torch.isfinite(tensor).all()), name


def test_famo_loss_at_its_bound_does_not_poison_the_logits():
    famo = bl.FAMO(["a", "b"])
    famo({"a": torch.tensor(1.0), "b": torch.tensor(2.0)})
    famo.update({"a": torch.tensor(-0.5), "b": torch.tensor(1.5)})  # below the bound 0
    assert bool(torch.isfinite(famo.logits).all())
    assert torch.isfinite(famo({"a": torch.tensor(1.0), "b": torch.tensor(2.0)}))


def test_dwa_low_temperature_with_overflowing_rate_stays_finite():
    dwa = bl.DWA(["a", "b"], temperature=0.5)
    for means in ((1e-30, 1.0), (1e30, 1.0)):
        dwa({"a": torch.tensor(means[0]), "b": torch.tensor(means[1])})
        dwa.step()
    assert torch.isfinite(dwa({"a": torch.tensor(1.0), "b": torch.tensor(1.0)}))
    assert not bool(torch.isnan(dwa.last_weights).any())


def test_geometric_mean_of_a_zero_loss_has_a_finite_gradient():
    losses = {
        "a": torch.tensor(0.0, requires_grad=True),
        "b": torch.tensor(2.0, requires_grad=True),
    }
    total = bl.GeometricMean(["a", "b"])(losses)
    total.backward()
    assert 0.0 <= total.item() < 1e-18  # sqrt(tiny * 2): the floor of the log, not 0 * inf
    assert all(torch.isfinite(v.grad) for v in losses.values())


def test_gradient_report_accepts_a_parameter_generator_with_cosines():
    net = nn.Linear(3, 2)
    x = torch.randn(4, 3)
    out = net(x)
    losses = {"a": out[:, 0].square().mean(), "b": out[:, 1].abs().mean()}
    report = bl.diagnostics.gradient_report(losses, net.parameters(), cosines=True)
    assert set(report.norms) == {"a", "b"}
    assert len(report.cosines) == 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_half_precision_model_keeps_statistics_in_float32(case, dtype):
    model = nn.Module()
    model.weighting = case.build(TASKS, False)
    model.to(dtype)
    for name, buffer in model.weighting.named_buffers():
        if buffer.is_floating_point():
            assert buffer.dtype == torch.float32, name
    assert model.weighting.double().last_weights.dtype == torch.float64  # widening still works
