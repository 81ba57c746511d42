"""GradientBalancer: equal norms at the shared features, by comparison with per-task autograd."""

from __future__ import annotations

import math
from collections import namedtuple

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from balanced_losses import GradientBalancer
from tests.asserts import by_task

# These tests scale losses by constants on purpose (to show a method's invariance).
pytestmark = pytest.mark.filterwarnings("ignore:.*multiplied by a constant:UserWarning")

DT = torch.float64


class TwoHeads(nn.Module):
    """A trunk and two heads of very different output sizes (2 and 105 by default)."""

    def __init__(self, out_a: int = 2, out_b: int = 105, hidden: int = 8) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, hidden), nn.Tanh())
        self.head_a = nn.Linear(hidden, out_a)
        self.head_b = nn.Linear(hidden, out_b)


def make(
    out_a: int = 2, out_b: int = 105, seed: int = 0
) -> tuple[TwoHeads, Tensor, Tensor, Tensor]:
    torch.manual_seed(seed)
    model = TwoHeads(out_a, out_b).to(DT)
    x = torch.randn(16, 4, dtype=DT)
    y_a = 0.1 * torch.randn(16, out_a, dtype=DT)  # small residuals: Huber's quadratic part
    y_b = 20 * torch.randn(16, out_b, dtype=DT)  # large residuals: Huber's linear part
    return model, x, y_a, y_b


LOSSES = {
    "huber": lambda out, y: F.huber_loss(out, y, delta=1.0),
    "mse": F.mse_loss,
}


def task_losses(model: TwoHeads, views: dict, y_a: Tensor, y_b: Tensor, kinds=("huber", "huber")):
    loss_a = LOSSES[kinds[0]](model.head_a(views["a"]), y_a)
    loss_b = LOSSES[kinds[1]](model.head_b(views["b"]), y_b)
    return {"a": loss_a, "b": loss_b}


class Reference:
    """The balancer's formula written out by hand: per-task autograd.grad, EMA, rescale, sum."""

    def __init__(self, momentum: float, target: str = "mean", weights=(1.0, 1.0)) -> None:
        self.m, self.target, self.w = momentum, target, list(weights)
        self.ema = [0.0, 0.0]
        self.count = [0, 0]

    def feature_grad(self, losses: dict[str, Tensor], feats: Tensor) -> tuple[Tensor, list]:
        grads = [torch.autograd.grad(losses[t], feats, retain_graph=True)[0] for t in ("a", "b")]
        norms = [g.norm().item() for g in grads]
        for k, n in enumerate(norms):
            if math.isfinite(n) and n > 0:
                self.ema[k] = self.m * self.ema[k] + (1 - self.m) * n
                self.count[k] += 1
        hats = [
            e / (1 - self.m**c) if c else 0.0 for e, c in zip(self.ema, self.count, strict=True)
        ]
        known = [h for h in hats if h > 0]
        t = sum(known) / len(known) if self.target == "mean" else max(known)
        scales = [w * t / h if h > 0 else w for w, h in zip(self.w, hats, strict=True)]
        return scales[0] * grads[0] + scales[1] * grads[1], [
            s * n for s, n in zip(scales, norms, strict=True)
        ]


def balanced_step(model, balancer, x, y_a, y_b, kinds=("huber", "huber")):
    feats = model.trunk(x)
    feats.retain_grad()
    views = balancer.branch(feats)
    losses = task_losses(model, views, y_a, y_b, kinds)
    balancer(losses).backward()
    return feats


@pytest.mark.parametrize(
    "kinds", [("huber", "huber"), ("mse", "huber"), ("huber", "mse")], ids="-".join
)
@pytest.mark.parametrize(("out_a", "out_b"), [(2, 105), (105, 2), (1, 30)], ids=str)
def test_equal_norms_at_features_first_step(kinds, out_a, out_b) -> None:
    model, x, y_a, y_b = make(out_a, out_b)
    feats = model.trunk(x)
    raw = task_losses(model, {"a": feats, "b": feats}, y_a, y_b, kinds)
    expected, sent = Reference(momentum=0.9).feature_grad(raw, feats)
    norms = [torch.autograd.grad(raw[t], feats, retain_graph=True)[0].norm() for t in "ab"]

    balancer = GradientBalancer(["a", "b"], momentum=0.9).to(DT)
    got = balanced_step(model, balancer, x, y_a, y_b, kinds)
    torch.testing.assert_close(sent[0], sent[1], rtol=1e-12, atol=0)  # reference sanity
    torch.testing.assert_close(got.grad, expected, rtol=1e-5, atol=1e-12)
    # What each task sends, by the module's own logs: s_k * n_k equal, and n_k measured right.
    torch.testing.assert_close(balancer.grad_norms, torch.stack(norms), rtol=1e-10, atol=0)
    sent_by_module = balancer.last_weights * balancer.grad_norms
    torch.testing.assert_close(sent_by_module[0], sent_by_module[1], rtol=1e-5, atol=0)


@pytest.mark.parametrize("target", ["mean", "max"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 0.25)], ids=str)
def test_matches_hand_reference_over_steps(target, weights) -> None:
    model, x, y_a, y_b = make()
    balancer = GradientBalancer(
        ["a", "b"], momentum=0.9, target=target, weights={"a": weights[0], "b": weights[1]}
    ).to(DT)
    reference = Reference(0.9, target, weights)
    feats = model.trunk(x)
    raw = task_losses(model, {"a": feats, "b": feats}, y_a, y_b)
    norms = [torch.autograd.grad(raw[t], feats, retain_graph=True)[0].norm() for t in "ab"]
    assert max(norms) / min(norms) > 2  # the problem is real: very different raw norms
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(4):
        xb = x + 0.3 * step  # the norms change from step to step
        feats = model.trunk(xb)
        raw = task_losses(model, {"a": feats, "b": feats}, y_a, y_b)
        expected, _ = reference.feature_grad(raw, feats)
        optimizer.zero_grad()
        got = balanced_step(model, balancer, xb, y_a, y_b)
        torch.testing.assert_close(got.grad, expected, rtol=1e-10, atol=1e-14)
        optimizer.step()
    assert balancer.count.tolist() == [4, 4]


def test_weights_give_requested_ratio_every_step_with_momentum_zero() -> None:
    model, x, y_a, y_b = make()
    balancer = GradientBalancer(["a", "b"], momentum=0.0, weights={"b": 0.25}).to(DT)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        xb = x * (1 + step)
        feats = model.trunk(xb)
        raw = task_losses(model, {"a": feats, "b": feats}, y_a, y_b)
        g = [torch.autograd.grad(raw[t], feats, retain_graph=True)[0] for t in "ab"]
        optimizer.zero_grad()
        balanced_step(model, balancer, xb, y_a, y_b)
        s = balancer.last_weights
        sent = [(s[k] * g[k]).norm() for k in range(2)]
        torch.testing.assert_close(
            sent[1] / sent[0], torch.tensor(0.25, dtype=DT), rtol=1e-5, atol=0
        )
        optimizer.step()


def test_forward_values_and_head_gradients_untouched() -> None:
    model, x, y_a, y_b = make()
    balancer = GradientBalancer(["a", "b"])
    feats = model.trunk(x)
    views = balancer.branch(feats)
    out_a, out_b = model.head_a(views["a"]), model.head_b(views["b"])
    torch.testing.assert_close(out_a, model.head_a(feats), rtol=0, atol=0)
    torch.testing.assert_close(out_b, model.head_b(feats), rtol=0, atol=0)
    assert views["a"].data_ptr() == feats.data_ptr()  # an alias, not a copy
    losses = task_losses(model, views, y_a, y_b)
    total = balancer(losses)
    torch.testing.assert_close(total, losses["a"] + losses["b"], rtol=0, atol=0)
    plain = torch.autograd.grad(
        losses["a"] + losses["b"], list(model.head_b.parameters()), retain_graph=True
    )
    total.backward()
    # The heads get their plain, unscaled gradients; only the trunk's are rebalanced.
    for p, g in zip(model.head_b.parameters(), plain, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)


def _split_trunk(model: TwoHeads, x: Tensor) -> tuple[Tensor, Tensor]:
    h = model.trunk(x)
    return h[:, :5] * 2, h[:, 3:].exp()


@pytest.mark.parametrize("kind", ["tuple", "list", "dict", "namedtuple"])
def test_structured_feats(kind) -> None:
    model, x, y_a, y_b = make()
    pair = namedtuple("Pair", ["first", "second"])

    def pack(u: Tensor, v: Tensor):
        return {
            "tuple": (u, v),
            "list": [u, v],
            "dict": {"u": u, "v": v},
            "namedtuple": pair(u, v),
        }[kind]

    def unpack(f):
        return (f["u"], f["v"]) if kind == "dict" else (f[0], f[1])

    def heads(fa, fb):
        ua, va = unpack(fa)
        ub, vb = unpack(fb)
        za = torch.cat([ua, va], dim=1)[:, :8]
        zb = torch.cat([vb, ub], dim=1)[:, :8]
        return {
            "a": F.huber_loss(model.head_a(za), y_a),
            "b": F.huber_loss(model.head_b(zb), y_b),
        }

    u, v = _split_trunk(model, x)
    raw = heads(pack(u, v), pack(u, v))
    grads = [torch.autograd.grad(raw[t], [u, v], retain_graph=True) for t in "ab"]
    norms = [torch.sqrt(g[0].square().sum() + g[1].square().sum()) for g in grads]
    t = (norms[0] + norms[1]) / 2
    expected = [t / norms[0] * grads[0][i] + t / norms[1] * grads[1][i] for i in range(2)]

    balancer = GradientBalancer(["a", "b"]).to(DT)
    u, v = _split_trunk(model, x)
    u.retain_grad()
    v.retain_grad()
    views = balancer.branch(pack(u, v))
    assert type(views["a"]) is (dict if kind == "dict" else type(pack(u, v)))
    balancer(heads(views["a"], views["b"])).backward()
    torch.testing.assert_close(u.grad, expected[0], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(v.grad, expected[1], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(balancer.grad_norms, torch.stack(norms), rtol=1e-10, atol=0)


def test_non_grad_tensors_pass_through() -> None:
    model, x, *_ = make()
    feats = model.trunk(x)
    mask = torch.ones(16, dtype=torch.bool)
    views = GradientBalancer(["a", "b"]).branch((feats, mask))
    assert views["a"][1] is mask
    assert views["b"][1] is mask
    assert views["a"][0] is not feats  # the float tensor is tracked


def test_heads_on_disjoint_slices() -> None:
    model, x, y_a, y_b = make()
    feats = model.trunk(x)
    raw = {
        "a": F.huber_loss(model.head_a(feats[:, :4].repeat(1, 2)), y_a),
        "b": F.mse_loss(model.head_b(feats[:, 4:].repeat(1, 2)), y_b),
    }
    expected, _sent = Reference(0.9).feature_grad(raw, feats)
    balancer = GradientBalancer(["a", "b"]).to(DT)
    feats = model.trunk(x)
    feats.retain_grad()
    views = balancer.branch(feats)
    balancer(
        {
            "a": F.huber_loss(model.head_a(views["a"][:, :4].repeat(1, 2)), y_a),
            "b": F.mse_loss(model.head_b(views["b"][:, 4:].repeat(1, 2)), y_b),
        }
    ).backward()
    torch.testing.assert_close(feats.grad, expected, rtol=1e-10, atol=1e-14)
    # Disjoint slices: each half of the features carries exactly one task, at equal norms.
    torch.testing.assert_close(
        feats.grad[:, :4].norm(), feats.grad[:, 4:].norm(), rtol=1e-10, atol=0
    )


def test_retain_graph_second_backward_updates_stats_again() -> None:
    model, x, y_a, y_b = make()
    feats = model.trunk(x)
    raw = task_losses(model, {"a": feats, "b": feats}, y_a, y_b)
    expected, _ = Reference(0.9).feature_grad(raw, feats)
    balancer = GradientBalancer(["a", "b"]).to(DT)
    feats = model.trunk(x)
    feats.retain_grad()
    total = balancer(task_losses(model, balancer.branch(feats), y_a, y_b))
    total.backward(retain_graph=True)
    total.backward()
    assert balancer.count.tolist() == [2, 2]
    # The same norm twice: the bias-corrected EMA equals it, so both passes scale alike.
    torch.testing.assert_close(feats.grad, 2 * expected, rtol=1e-10, atol=1e-14)


def test_gradient_accumulation_over_micro_batches() -> None:
    model, x, y_a, y_b = make()
    halves = [(x[:8], y_a[:8], y_b[:8]), (x[8:], y_a[8:], y_b[8:])]
    trunk_params = list(model.trunk.parameters())
    reference = Reference(0.5)
    expected = [torch.zeros_like(p) for p in trunk_params]
    for xb, ya, yb in halves:
        feats = model.trunk(xb)
        grad, _ = reference.feature_grad(
            task_losses(model, {"a": feats, "b": feats}, ya, yb), feats
        )
        for acc, g in zip(expected, torch.autograd.grad(feats, trunk_params, grad), strict=True):
            acc += g

    balancer = GradientBalancer(["a", "b"], momentum=0.5).to(DT)
    for xb, ya, yb in halves:
        balanced_step(model, balancer, xb, ya, yb)
    assert balancer.count.tolist() == [2, 2]
    for p, g in zip(trunk_params, expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-14)


def test_eval_mode_and_no_grad_do_nothing() -> None:
    model, x, y_a, y_b = make()
    balancer = GradientBalancer(["a", "b"]).to(DT).eval()
    feats = model.trunk(x)
    views = balancer.branch(feats)
    assert views["a"] is feats
    assert views["b"] is feats
    losses = task_losses(model, views, y_a, y_b)
    plain = torch.autograd.grad(losses["a"] + losses["b"], feats, retain_graph=True)[0]
    feats.retain_grad()  # after autograd.grad, which would fill .grad too
    balancer(losses).backward()
    torch.testing.assert_close(feats.grad, plain, rtol=0, atol=0)
    assert balancer.count.tolist() == [0, 0]
    balancer.train()
    with torch.no_grad():
        feats = model.trunk(x)
        views = balancer.branch(feats)
    assert views["a"] is feats


def test_unused_view_warns_naming_the_task() -> None:
    model, x, y_a, y_b = make()
    balancer = GradientBalancer(["a", "b"]).to(DT)
    views = balancer.branch(model.trunk(x))
    losses = {
        "a": F.huber_loss(model.head_a(views["a"]), y_a),
        "b": F.huber_loss(model.head_b(views["a"]), y_b),  # the wrong view
    }
    with pytest.warns(UserWarning, match="task `b`'s view received no gradient"):
        balancer(losses).backward()
    assert balancer.count.tolist() == [1, 0]


def test_task_absent_under_allow_missing_does_not_warn() -> None:
    model, x, y_a, _ = make()
    balancer = GradientBalancer(["a", "b"], allow_missing=True).to(DT)
    feats = model.trunk(x)
    plain = torch.autograd.grad(F.huber_loss(model.head_a(feats), y_a), feats)[0]
    feats.retain_grad()
    views = balancer.branch(feats)
    loss_a = F.huber_loss(model.head_a(views["a"]), y_a)
    balancer({"a": loss_a}).backward()  # filterwarnings=error: any warning fails
    torch.testing.assert_close(feats.grad, plain, rtol=1e-12, atol=0)  # alone: s = T / n = 1
    assert balancer.count.tolist() == [1, 0]
    assert by_task(balancer)["b"].item() == 0.0


def test_zero_gradient_leaves_stats_unchanged_and_no_nan() -> None:
    model, x, y_a, y_b = make()
    balancer = GradientBalancer(["a", "b"]).to(DT)
    balanced_step(model, balancer, x, y_a, y_b)
    ema, count = balancer.ema.clone(), balancer.count.clone()
    feats = model.trunk(x)
    feats.retain_grad()
    views = balancer.branch(feats)
    mask = torch.zeros(16, 1, dtype=DT)  # no sample of this batch has a label for `b`
    losses = {
        "a": F.huber_loss(model.head_a(views["a"]), y_a),
        "b": (mask * (model.head_b(views["b"]) - y_b)).abs().mean(),
    }
    balancer(losses).backward()
    assert torch.isfinite(feats.grad).all()
    assert balancer.count.tolist() == [2, 1]
    assert balancer.ema[1] == ema[1]
    assert balancer.ema[0] != ema[0]
    assert count[1] == 1
    assert balancer.grad_norms[1] == 0


def test_zero_gradient_before_any_statistic_gives_no_nan() -> None:
    model, x, _y_a, _ = make()
    balancer = GradientBalancer(["a", "b"]).to(DT)
    feats = model.trunk(x)
    feats.retain_grad()
    views = balancer.branch(feats)
    losses = {"a": 0 * model.head_a(views["a"]).sum(), "b": 0 * model.head_b(views["b"]).sum()}
    balancer(losses).backward()
    assert torch.isfinite(feats.grad).all()
    assert balancer.count.tolist() == [0, 0]
    torch.testing.assert_close(balancer.last_weights, torch.ones(2, dtype=DT), rtol=0, atol=0)


@pytest.mark.parametrize("bad", [math.inf, math.nan])
def test_nonfinite_gradient_leaves_stats_unchanged(bad) -> None:
    model, x, y_a, y_b = make()
    balancer = GradientBalancer(["a", "b"]).to(DT)
    balanced_step(model, balancer, x, y_a, y_b)
    ema = balancer.ema.clone()
    views = balancer.branch(model.trunk(x))
    losses = {
        "a": F.huber_loss(model.head_a(views["a"]), y_a),
        "b": bad * model.head_b(views["b"]).mean(),  # an AMP overflow step
    }
    balancer(losses).backward()
    assert balancer.count.tolist() == [2, 1]
    assert balancer.ema[1] == ema[1]
    assert torch.isfinite(balancer.ema).all()
    assert torch.isfinite(balancer.last_weights).all()


def test_state_dict_round_trip_resumes_exactly() -> None:
    model, x, y_a, y_b = make()
    balancer = GradientBalancer(["a", "b"], momentum=0.7).to(DT)
    for step in range(3):
        balanced_step(model, balancer, x + step, y_a, y_b)
    state = balancer.state_dict()
    assert set(state) == {"ema", "count", "_extra_state"}
    restored = GradientBalancer(["a", "b"], momentum=0.7).to(DT)
    restored.load_state_dict(state)
    model.zero_grad()
    first = balanced_step(model, balancer, x - 1, y_a, y_b).grad
    second = balanced_step(model, restored, x - 1, y_a, y_b).grad
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(balancer.ema, restored.ema, rtol=0, atol=0)


def test_reset_forgets_statistics() -> None:
    model, x, y_a, y_b = make()
    balancer = GradientBalancer(["a", "b"]).to(DT)
    balanced_step(model, balancer, x, y_a, y_b)
    balancer.reset()
    assert balancer.count.tolist() == [0, 0]
    assert balancer.ema.abs().sum() == 0
    assert torch.isnan(balancer.running_norm).all()


def test_low_precision_gradients_are_measured_in_float32() -> None:
    torch.manual_seed(0)
    feats = torch.randn(64, 256, requires_grad=True)
    for dtype in (torch.bfloat16, torch.float16):
        balancer = GradientBalancer(["a", "b"])
        low = feats.to(dtype)
        views = balancer.branch(low)
        # Gradients of 1e-3 per element: their squares underflow in fp16 / lose bits in bf16.
        losses = {"a": 1e-3 * views["a"].float().sum(), "b": 2e-3 * views["b"].float().sum()}
        balancer(losses).backward()
        expected = torch.tensor([1e-3, 2e-3]) * math.sqrt(64 * 256)
        torch.testing.assert_close(balancer.grad_norms, expected, rtol=1e-2, atol=0)


def test_bad_input() -> None:
    model, x, _y_a, _y_b = make()
    balancer = GradientBalancer(["a", "b"]).to(DT)
    with pytest.raises(KeyError, match="`c`"):
        balancer({"a": torch.tensor(1.0), "b": torch.tensor(1.0), "c": torch.tensor(1.0)})
    with pytest.raises(KeyError, match="missing"):
        balancer({"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="`target`"):
        GradientBalancer(["a"], target="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`momentum`"):
        GradientBalancer(["a"], momentum=1.0)
    with pytest.raises(KeyError, match="weights"):
        GradientBalancer(["a"], weights={"z": 1.0})
    with pytest.raises(TypeError, match="`feats`"):
        balancer.branch("not a tensor")
    with pytest.raises(TypeError, match="element of `feats`"):
        balancer.branch((model.trunk(x), 3))


def test_repr_shows_hyperparameters() -> None:
    text = repr(GradientBalancer(["a", "b"], momentum=0.5, target="max"))
    assert "momentum=0.5" in text
    assert "target='max'" in text


@settings(deadline=None, max_examples=25)
@given(
    out_a=st.integers(1, 120),
    out_b=st.integers(1, 120),
    scale=st.floats(1e-3, 1e3),
    momentum=st.floats(0.0, 0.99),
)
def test_property_equal_norms_at_first_step(out_a, out_b, scale, momentum) -> None:
    model, x, y_a, y_b = make(out_a, out_b)
    balancer = GradientBalancer(["a", "b"], momentum=momentum).to(DT)
    feats = model.trunk(x)
    views = balancer.branch(feats)
    losses = {
        "a": scale * F.huber_loss(model.head_a(views["a"]), y_a),
        "b": F.mse_loss(model.head_b(views["b"]), y_b),
    }
    balancer(losses).backward()
    sent = balancer.last_weights * balancer.grad_norms
    torch.testing.assert_close(sent[0], sent[1], rtol=1e-5, atol=0)


def test_diagnostics_through_the_balancer_do_not_track() -> None:
    from balanced_losses.diagnostics import task_gradient_norms

    model, x, y_a, y_b = make()
    balancer = GradientBalancer(["a", "b"]).to(DT)
    balanced_step(model, balancer, x, y_a, y_b)
    ema, count, s = balancer.ema.clone(), balancer.count.clone(), balancer.last_weights.clone()
    feats = model.trunk(x)
    views = balancer.branch(feats)
    losses = task_losses(model, views, y_a, y_b)
    raw = task_gradient_norms(losses, [views["a"], views["b"]])  # does not reach the branch
    sent = task_gradient_norms(losses, model.trunk)  # through the branch: current multipliers
    assert balancer.count.tolist() == count.tolist()
    torch.testing.assert_close(balancer.ema, ema, rtol=0, atol=0)
    torch.testing.assert_close(balancer.last_weights, s, rtol=0, atol=0)
    trunk_params = list(model.trunk.parameters())
    for k, task in enumerate("ab"):
        g = torch.autograd.grad(losses[task], views[task], retain_graph=True)[0]
        torch.testing.assert_close(raw[task], g.norm(), rtol=1e-12, atol=0)
        by_hand = torch.autograd.grad(feats, trunk_params, s[k] * g, retain_graph=True)
        expected = torch.sqrt(sum(p.square().sum() for p in by_hand))
        torch.testing.assert_close(sent[task], expected, rtol=1e-10, atol=0)


def test_pickle_and_create_graph() -> None:
    import pickle

    model, x, y_a, y_b = make()
    balancer = GradientBalancer(["a", "b"]).to(DT)
    feats = model.trunk(x)
    views = balancer.branch(feats)
    total = balancer(task_losses(model, views, y_a, y_b))
    # Double backward: the rescaled feature gradient is itself differentiable.
    (grad,) = torch.autograd.grad(total, feats, create_graph=True)
    assert grad.requires_grad
    assert not balancer.ema.requires_grad
    assert not balancer.last_weights.requires_grad
    copy = pickle.loads(pickle.dumps(balancer))
    torch.testing.assert_close(copy.ema, balancer.ema, rtol=0, atol=0)
    assert copy.count.tolist() == [1, 1]
