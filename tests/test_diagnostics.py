"""Diagnostics: per-task norms, cosines, reports and the monitor against autograd by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from balanced_losses import diagnostics
from balanced_losses.diagnostics import (
    GradientMonitor,
    GradientReport,
    gradient_cosines,
    gradient_report,
    task_gradient_norms,
)

DT = torch.float64


def make() -> tuple[nn.Module, nn.Module, nn.Module, Tensor]:
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 6)).to(DT)
    head_p, head_c = nn.Linear(6, 2).to(DT), nn.Linear(6, 105).to(DT)
    return trunk, head_p, head_c, torch.randn(10, 3, dtype=DT)


def losses_of(trunk, head_p, head_c, x) -> tuple[dict[str, Tensor], Tensor]:
    feats = trunk(x)
    return {
        "pointer": head_p(feats).square().mean(),
        "countdown": 0.01 * (head_c(feats) - 3).abs().mean(),
    }, feats


def by_hand(loss: Tensor, params: list[Tensor]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([
        torch.zeros(p.numel(), dtype=p.dtype) if g is None else g.reshape(-1)
        for g, p in zip(grads, params, strict=True)
    ])  # fmt: skip


@pytest.mark.parametrize("form", ["module", "list", "generator"])
def test_norms_match_autograd_and_leave_grad_alone(form) -> None:
    trunk, head_p, head_c, x = make()
    losses, _ = losses_of(trunk, head_p, head_c, x)
    params = list(trunk.parameters())
    given = {"module": trunk, "list": params, "generator": trunk.parameters()}[form]
    norms = task_gradient_norms(losses, given)
    for task, loss in losses.items():
        torch.testing.assert_close(norms[task], by_hand(loss, params).norm(), rtol=1e-12, atol=0)
        assert not norms[task].requires_grad
    assert all(p.grad is None for p in trunk.parameters())
    (losses["pointer"] + losses["countdown"]).backward()  # the graph survived


def test_unused_parameters_and_features_count_as_zero() -> None:
    trunk, head_p, head_c, x = make()
    losses, feats = losses_of(trunk, head_p, head_c, x)
    # Each head's parameters are unused by the other task; features are an intermediate tensor.
    both = list(head_p.parameters()) + list(head_c.parameters())
    norms = task_gradient_norms(losses, both)
    torch.testing.assert_close(norms["pointer"], by_hand(losses["pointer"], both).norm())
    at_feats = task_gradient_norms(losses, feats)
    torch.testing.assert_close(at_feats["countdown"], by_hand(losses["countdown"], [feats]).norm())
    detached = {"none": torch.zeros((), dtype=DT, requires_grad=True) * 0 + 1.0}
    assert task_gradient_norms(detached, feats)["none"].item() == 0.0


def test_cosines_match_autograd() -> None:
    trunk, head_p, head_c, x = make()
    losses, _ = losses_of(trunk, head_p, head_c, x)
    losses["third"] = trunk(x).sum()
    params = list(trunk.parameters())
    cos = gradient_cosines(losses, trunk)
    assert list(cos) == [("pointer", "countdown"), ("pointer", "third"), ("countdown", "third")]
    for (a, b), value in cos.items():
        ga, gb = by_hand(losses[a], params), by_hand(losses[b], params)
        expected = ga @ gb / (ga.norm() * gb.norm())
        torch.testing.assert_close(value, expected, rtol=1e-10, atol=1e-12)


def test_cosine_with_zero_gradient_is_nan() -> None:
    w = torch.tensor([1.0, 2.0], requires_grad=True)
    cos = gradient_cosines({"a": w.sum(), "b": 0 * w.sum()}, [w])
    assert math.isnan(cos[("a", "b")].item())


def test_report_shares_ratios_and_text() -> None:
    w = torch.tensor([3.0, 4.0], requires_grad=True)
    # Gradients (3, 4) * c: norms 5 * c.
    losses = {"pointer": 0.5 * w.square().sum() * 0.1, "countdown": 0.5 * w.square().sum() * 0.0026}
    report = gradient_report(losses, w, cosines=True)
    assert report.norms["pointer"] == pytest.approx(0.5)
    assert report.norms["countdown"] == pytest.approx(0.013)
    assert report.shares["countdown"] == pytest.approx(0.013 / 0.513)
    assert report.ratios == pytest.approx({"pointer": 1.0, "countdown": 0.026})
    assert report.cosines[("pointer", "countdown")] == pytest.approx(1.0)
    assert report.largest == "pointer"
    text = str(report)
    assert "`countdown` receives 2.6 % of `pointer`'s gradient." in text
    assert "countdown       0.013    2.5 %      0.026x" in text
    assert report.as_dict(prefix="train/") == pytest.approx({
        "train/grad_norm/pointer": 0.5,
        "train/grad_share/pointer": 0.5 / 0.513,
        "train/grad_ratio/pointer": 1.0,
        "train/grad_norm/countdown": 0.013,
        "train/grad_share/countdown": 0.013 / 0.513,
        "train/grad_ratio/countdown": 0.026,
        "train/grad_cos/pointer-countdown": 1.0,
    })  # fmt: skip
    assert all(type(v) is float for v in report.as_dict().values())


def test_monitor_measures_only_every_n_steps(monkeypatch) -> None:
    trunk, head_p, head_c, x = make()
    calls = []
    real = diagnostics.gradient_report

    def counting(*args, **kwargs) -> GradientReport:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(diagnostics, "gradient_report", counting)
    monitor = GradientMonitor(trunk, every=3, cosines=True)
    assert monitor.latest() is None
    assert monitor.as_dict() == {}
    reports = []
    for _ in range(7):
        losses, _ = losses_of(trunk, head_p, head_c, x)
        reports.append(monitor.step(losses))
    assert [r is not None for r in reports] == [True, False, False, True, False, False, True]
    assert len(calls) == 3
    assert monitor.latest() is reports[-1]
    logged = monitor.as_dict()
    assert set(logged) == {
        "grad_norm/pointer", "grad_share/pointer", "grad_ratio/pointer",
        "grad_norm/countdown", "grad_share/countdown", "grad_ratio/countdown",
        "grad_cos/pointer-countdown",
    }  # fmt: skip
    expected = by_hand(losses["countdown"], list(trunk.parameters())).norm().item()
    assert logged["grad_norm/countdown"] == pytest.approx(expected, rel=1e-12)


def test_monitor_takes_params_per_step() -> None:
    trunk, head_p, head_c, x = make()
    monitor = GradientMonitor(every=1)
    losses, feats = losses_of(trunk, head_p, head_c, x)
    report = monitor.step(losses, feats)
    assert report is not None
    expected = by_hand(losses["pointer"], [feats]).norm().item()
    assert report.norms["pointer"] == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="pass `params`"):
        monitor.step(losses)


def test_bad_input() -> None:
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(ValueError, match="`params`"):
        task_gradient_norms({"a": w.sum()}, [])
    with pytest.raises(ValueError, match="require grad"):
        task_gradient_norms({"a": w.sum()}, [torch.ones(2)])
    with pytest.raises(ValueError, match="task `a` must be a scalar"):
        task_gradient_norms({"a": w * 2}, [w])
    with pytest.raises(ValueError, match="`losses`"):
        task_gradient_norms({}, [w])
    with pytest.raises(ValueError, match="`every`"):
        GradientMonitor([w], every=0)


@pytest.mark.parametrize(
    "measure",
    [
        pytest.param(lambda losses, p: gradient_report(losses, p), id="gradient_report"),
        pytest.param(lambda losses, p: gradient_cosines(losses, p), id="gradient_cosines"),
        pytest.param(lambda losses, p: task_gradient_norms(losses, p), id="task_gradient_norms"),
    ],
)
def test_measuring_after_backward_says_when_to_call_it(measure):
    layer = nn.Linear(3, 4)
    out = torch.tanh(layer(torch.randn(5, 3)))  # tanh saves its output: backward frees it
    losses = {"pointer": out[:, :2].square().mean(), "countdown": out[:, 2:].abs().mean()}
    sum(losses.values()).backward()
    with pytest.raises(RuntimeError, match=r"task `pointer`.*before `loss.backward\(\)`") as info:
        measure(losses, layer.parameters())
    assert "retain_graph=True" in str(info.value)
    assert "backward through the graph a second time" in str(info.value.__cause__)


def test_measuring_after_backward_with_retain_graph_works():
    layer = nn.Linear(3, 4)
    out = torch.tanh(layer(torch.randn(5, 3)))
    losses = {"pointer": out[:, :2].square().mean(), "countdown": out[:, 2:].abs().mean()}
    sum(losses.values()).backward(retain_graph=True)
    report = gradient_report(losses, layer.parameters())
    assert set(report.norms) == {"pointer", "countdown"}
    assert all(n > 0 for n in report.norms.values())
