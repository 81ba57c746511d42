"""GradNorm: weight updates by hand (Chen et al. 2018, Eq. 1-2 and Algorithm 1), float64."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from balanced_losses import GradNorm

# These tests scale losses by constants on purpose (to show a method's invariance).
pytestmark = pytest.mark.filterwarnings("ignore:.*multiplied by a constant:UserWarning")

DT = torch.float64
TASKS = ["a", "b", "c"]


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = nn.Linear(2, 3)
        self.heads = nn.ModuleList([nn.Linear(3, 1), nn.Linear(3, 4), nn.Linear(3, 2)])


def make(seed: int = 0) -> tuple[Tiny, Tensor, list[Tensor]]:
    torch.manual_seed(seed)
    model = Tiny().to(DT)
    x = torch.randn(5, 2, dtype=DT)
    ys = [torch.randn(5, 1, dtype=DT), 5 * torch.randn(5, 4, dtype=DT), torch.randn(5, 2, dtype=DT)]
    return model, x, ys


def losses_of(model: Tiny, x: Tensor, ys: list[Tensor]) -> dict[str, Tensor]:
    h = torch.tanh(model.shared(x))
    scales = [1.0, 3.0, 0.2]  # very different gradient sizes
    return {
        t: s * (head(h) - y).square().mean()
        for t, s, head, y in zip(TASKS, scales, model.heads, ys, strict=True)
    }


def per_task_norms(losses: dict[str, Tensor], params: list[Tensor]) -> Tensor:
    norms = []
    for t in TASKS:
        grads = torch.autograd.grad(losses[t], params, retain_graph=True)
        norms.append(torch.sqrt(sum(g.square().sum() for g in grads)))
    return torch.stack(norms)


def hand_update(
    w: Tensor, losses: Tensor, initial: Tensor, norms: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """d L_grad / d w by autograd on the paper's formula, with the target as a constant."""
    w = w.clone().requires_grad_(True)
    ratio = losses / initial  # Eq. 1: loss ratio
    r = ratio / ratio.mean()  # relative inverse training rate
    g = w * norms  # G_k = ||grad_W w_k L_k|| = w_k ||grad_W L_k||
    target = (g.mean() * r**alpha).detach()  # Sec. 3.2: a constant
    l_grad = (g - target).abs().sum()
    (grad,) = torch.autograd.grad(l_grad, w)
    return grad, l_grad.detach()


def renormalize(w: Tensor) -> Tensor:
    return w * len(w) / w.sum()


def test_first_update_sgd_matches_hand_computation() -> None:
    model, x, ys = make()
    params = list(model.shared.parameters())
    gradnorm = GradNorm(TASKS, params, alpha=1.5, lr=0.1, optimizer="sgd").to(DT)
    losses = losses_of(model, x, ys)
    values = torch.stack([losses[t] for t in TASKS]).detach()
    norms = per_task_norms(losses, params)
    total = gradnorm(losses)

    w0 = torch.ones(3, dtype=DT)
    torch.testing.assert_close(total, (w0 * torch.stack([losses[t] for t in TASKS])).sum())
    grad, l_grad = hand_update(w0, values, values, norms, 1.5)
    # At step 1, L(0) = L: r = 1 and every target is the mean norm.
    torch.testing.assert_close(grad, torch.sign(norms - norms.mean()) * norms, rtol=1e-12, atol=0)
    expected = renormalize(w0 - 0.1 * grad)
    torch.testing.assert_close(gradnorm.loss_weights, expected, rtol=1e-12, atol=0)
    torch.testing.assert_close(gradnorm.gradnorm_loss, l_grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(gradnorm.initial_losses, values, rtol=0, atol=0)
    assert gradnorm.num_steps.item() == 1
    # The weights logged are the ones the total used: before the update.
    torch.testing.assert_close(gradnorm.last_weights, w0, rtol=0, atol=0)


def test_second_update_uses_loss_ratios_and_alpha() -> None:
    model, x, ys = make()
    params = list(model.shared.parameters())
    alpha = 1.5
    gradnorm = GradNorm(TASKS, params, alpha=alpha, lr=0.05, optimizer="sgd").to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = losses_of(model, x, ys)
    initial = torch.stack([first[t] for t in TASKS]).detach()
    gradnorm(first).backward()
    opt.step()
    w1 = gradnorm.loss_weights.clone()

    second = losses_of(model, x, ys)
    values = torch.stack([second[t] for t in TASKS]).detach()
    norms = per_task_norms(second, params)
    grad, l_grad = hand_update(w1, values, initial, norms, alpha)
    ratios = values / initial
    assert ratios.max() / ratios.min() > 1.01  # r != 1: alpha matters here
    total = gradnorm(second)
    torch.testing.assert_close(total, (w1 * torch.stack([second[t] for t in TASKS])).sum())
    torch.testing.assert_close(
        gradnorm.loss_weights, renormalize(w1 - 0.05 * grad), rtol=1e-12, atol=0
    )
    torch.testing.assert_close(gradnorm.gradnorm_loss, l_grad, rtol=1e-12, atol=0)


def test_first_update_adam_matches_hand_computation() -> None:
    model, x, ys = make()
    params = list(model.shared.parameters())
    gradnorm = GradNorm(TASKS, params, lr=0.025).to(DT)
    losses = losses_of(model, x, ys)
    values = torch.stack([losses[t] for t in TASKS]).detach()
    norms = per_task_norms(losses, params)
    gradnorm(losses)
    grad, _ = hand_update(torch.ones(3, dtype=DT), values, values, norms, 1.5)
    # Adam's first step: m_hat = g, v_hat = g^2, so the step is lr * g / (|g| + eps).
    step = 0.025 * grad / (grad.abs() + 1e-8)
    expected = renormalize(torch.ones(3, dtype=DT) - step)
    torch.testing.assert_close(gradnorm.loss_weights, expected, rtol=1e-12, atol=0)
    assert gradnorm.optimizer_steps.tolist() == [1, 1, 1]


def test_restoring_force_raises_the_weight_of_the_slower_task() -> None:
    shared = torch.ones(2, dtype=DT, requires_grad=True)
    gradnorm = GradNorm(["fast", "slow"], [shared], alpha=1.5, lr=0.01, optimizer="sgd").to(DT)
    gradnorm({"fast": (shared * 1.0).sum(), "slow": (shared * 1.0).sum()})
    # Equal gradient norms; `fast` halved its loss, `slow` did not: r_slow > 1 > r_fast.
    gradnorm({"fast": (shared * 0.5).sum(), "slow": (shared * 1.0).sum()})
    assert gradnorm.loss_weights[1] > gradnorm.loss_weights[0]


def test_gradnorm_never_touches_model_gradients() -> None:
    model, x, ys = make()
    params = list(model.shared.parameters())
    gradnorm = GradNorm(TASKS, params, optimizer="sgd", lr=0.1).to(DT)
    for step in range(2):
        model.zero_grad(set_to_none=True)
        losses = losses_of(model, x, ys)
        weights_used = gradnorm.loss_weights.clone()
        total = gradnorm(losses)
        # The update ran (autograd.grad per task) and no .grad was written.
        assert all(p.grad is None for p in model.parameters())
        assert not torch.equal(gradnorm.loss_weights, weights_used)
        by_hand = [torch.zeros_like(p) for p in model.parameters()]
        for k, t in enumerate(TASKS):
            grads = torch.autograd.grad(
                losses[t], list(model.parameters()), retain_graph=True, allow_unused=True
            )
            for acc, g in zip(by_hand, grads, strict=True):
                if g is not None:
                    acc += weights_used[k] * g
        total.backward()
        for p, g in zip(model.parameters(), by_hand, strict=True):
            torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-15)
        assert not gradnorm.loss_weights.requires_grad
        assert list(gradnorm.parameters()) == []
        x = x + step


def test_state_dict_round_trip_resumes_exactly() -> None:
    model, x, ys = make()
    params = list(model.shared.parameters())
    gradnorm = GradNorm(TASKS, params).to(DT)
    for step in range(3):
        gradnorm(losses_of(model, x + step, ys))
    state = gradnorm.state_dict()
    assert set(state) == {
        "loss_weights", "initial_losses", "initialized", "num_steps", "exp_avg", "exp_avg_sq",
        "_extra_state",
        "optimizer_steps",
    }  # fmt: skip
    restored = GradNorm(TASKS, params).to(DT)
    restored.load_state_dict(state)
    gradnorm(losses_of(model, x - 1, ys))
    restored(losses_of(model, x - 1, ys))
    torch.testing.assert_close(restored.loss_weights, gradnorm.loss_weights, rtol=0, atol=0)
    torch.testing.assert_close(restored.exp_avg_sq, gradnorm.exp_avg_sq, rtol=0, atol=0)


def test_eval_mode_and_no_grad_apply_without_updating() -> None:
    model, x, ys = make()
    gradnorm = GradNorm(TASKS, model.shared).to(DT).eval()
    gradnorm(losses_of(model, x, ys))
    assert gradnorm.num_steps.item() == 0
    gradnorm.train()
    with torch.no_grad():
        gradnorm(losses_of(model, x, ys))
    assert gradnorm.num_steps.item() == 0
    torch.testing.assert_close(gradnorm.loss_weights, torch.ones(3, dtype=DT), rtol=0, atol=0)


def test_nonpositive_initial_loss() -> None:
    model, x, ys = make()
    params = list(model.shared.parameters())
    checked = GradNorm(TASKS, params, check_inputs=True).to(DT)
    losses = losses_of(model, x, ys)
    losses["b"] = losses["b"] * 0
    with pytest.raises(ValueError, match=r"task `b` must be > 0, got 0\.0"):
        checked(losses)
    # Unchecked: L_b(0) waits for a positive value; nothing becomes NaN meanwhile.
    unchecked = GradNorm(TASKS, params, optimizer="sgd").to(DT)
    unchecked(losses)
    assert unchecked.initialized.tolist() == [True, False, True]
    assert torch.isfinite(unchecked.loss_weights).all()
    unchecked(losses_of(model, x, ys))
    assert unchecked.initialized.tolist() == [True, True, True]


def test_loss_without_shared_dependency_warns() -> None:
    model, x, ys = make()
    gradnorm = GradNorm(TASKS, model.shared).to(DT)
    losses = losses_of(model, x, ys)
    losses["c"] = model.heads[2].bias.square().sum()
    with pytest.warns(UserWarning, match="task `c` does not depend"):
        gradnorm(losses)
    assert torch.isfinite(gradnorm.loss_weights).all()


def test_bad_arguments() -> None:
    model, *_ = make()
    with pytest.raises(ValueError, match="`alpha`"):
        GradNorm(TASKS, model.shared, alpha=-1)
    with pytest.raises(ValueError, match="`lr`"):
        GradNorm(TASKS, model.shared, lr=0)
    with pytest.raises(ValueError, match="`optimizer`"):
        GradNorm(TASKS, model.shared, optimizer="rmsprop")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`shared_parameters`"):
        GradNorm(TASKS, [])
    with pytest.raises(KeyError, match="`d`"):
        GradNorm(TASKS, model.shared)({"d": torch.tensor(1.0)})
