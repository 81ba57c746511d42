"""Our weightings against TorchJD 0.18's scalarizers: same losses, same calls, same weights.

Compared: ``torchjd.scalarization.UW`` (UncertaintyWeighting), ``IMTLL``, ``DWA``, ``FAMO``,
``GeometricMean``, ``Random`` (RLW) and ``STCH``. Effective weights are d total / d L_k by
autograd on both sides. Where the two differ by design, the comment says how and the part that
must agree is compared.
"""

from __future__ import annotations

import math

import pytest
import torch

from balanced_losses import DWA, FAMO, IMTLL, RLW, STCH, GeometricMean, UncertaintyWeighting
from balanced_losses._numerics import standard_normal as _standard_normal
from tests.registry import TASKS, effective_weights, leaf_losses, losses_at

pytest.importorskip("torchjd")
scalarization = pytest.importorskip("torchjd.scalarization")

K = len(TASKS)


def stacked(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([losses[t] for t in TASKS])


def both(ours, theirs, values: list[float], *, dtype=torch.float64):
    """Totals and effective weights of both modules on the same loss values (separate leaves)."""
    mine = leaf_losses(values, dtype=dtype)
    other = leaf_losses(values, dtype=dtype)
    total_ours = ours(mine)
    total_theirs = theirs(stacked(other))
    return (
        total_ours,
        total_theirs,
        effective_weights(total_ours, mine),
        effective_weights(total_theirs, other),
    )


def sgd(module: torch.nn.Module, total: torch.Tensor, lr: float = 0.2) -> None:
    params = list(module.parameters())
    grads = torch.autograd.grad(total, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.sub_(lr * g)


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        # Kendall regression form: sum 0.5 exp(-s) L + 0.5 s, identical to TorchJD's UW.
        (lambda: UncertaintyWeighting(TASKS), lambda: scalarization.UW(K)),
        (lambda: IMTLL(TASKS), lambda: scalarization.IMTLL(K)),
    ],
    ids=["UW", "IMTLL"],
)
def test_learned_scales_follow_the_same_trajectory(ours, theirs) -> None:
    a, b = ours().double(), theirs().double()
    for step in range(10):
        total_a, total_b, w_a, w_b = both(a, b, losses_at(step))
        torch.testing.assert_close(total_a, total_b, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(w_a, w_b, rtol=1e-13, atol=0)
        sgd(a, total_a)
        sgd(b, total_b)
    assert not torch.allclose(w_a, torch.ones_like(w_a)), "the scales never moved"


def test_geometric_mean() -> None:
    a, b = GeometricMean(TASKS), scalarization.GeometricMean()
    for values in ([0.5, 2.0, 8.0], [1e-6, 3.0, 1e5], [1.0, 1.0, 1.0]):
        total_a, total_b, w_a, w_b = both(a, b, values)
        torch.testing.assert_close(total_a, total_b, rtol=1e-14, atol=0)
        torch.testing.assert_close(w_a, w_b, rtol=1e-14, atol=0)


def test_dwa_over_epochs_with_the_same_step_calls() -> None:
    a, b = DWA(TASKS, temperature=2.0).double(), scalarization.DWA(temperature=2.0)
    for epoch in range(5):
        for batch in range(4):
            values = [v * (1 + 0.1 * batch) for v in losses_at(3 * epoch + (epoch % 2) * batch)]
            total_a, total_b, w_a, w_b = both(a, b, values)
            torch.testing.assert_close(total_a, total_b, rtol=1e-14, atol=0)
            torch.testing.assert_close(w_a, w_b, rtol=1e-14, atol=0)
        a.step()
        b.step()
    assert not torch.allclose(w_a, torch.ones_like(w_a)), "DWA never left uniform weights"


def test_famo_with_the_same_update_calls() -> None:
    # TorchJD's FAMO steps its logits with torch.optim.Adam; ours writes Adam out (buffers in
    # the state_dict). Same maths, different rounding order: compared to 1e-12.
    a, b = FAMO(TASKS).double(), scalarization.FAMO(K).double()
    for step in range(15):
        values = losses_at(step)
        after = [v * (0.9 + 0.04 * ((step + k) % 3)) for k, v in enumerate(values)]
        total_a, total_b, w_a, w_b = both(a, b, values)
        torch.testing.assert_close(total_a, total_b, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(w_a, w_b, rtol=1e-12, atol=0)
        a.update(leaf_losses(after))
        b.update(stacked(leaf_losses(after)))
        torch.testing.assert_close(a.logits, b._w.detach(), rtol=1e-12, atol=1e-14)
    assert a.logits.abs().max() > 0.02, "the logits never moved"


def test_rlw_given_the_same_z_is_random_scaled_by_k(monkeypatch: pytest.MonkeyPatch) -> None:
    # TorchJD's Random draws z from torch's global RNG (torch.randn, in the losses' dtype) and
    # its weights sum to 1 (the paper's); ours draws z from a Philox stream keyed by our seed and
    # sums to K. The streams differ by design (ours must compile and stay on the device), so
    # what can be compared is the map from z to weights: TorchJD's torch.randn is made to return
    # the z our module draws at that step, and then our weights must be K times TorchJD's.
    seed = 2024
    a, b = RLW(TASKS, seed=seed), scalarization.Random()
    drawn: list[torch.Tensor] = []

    def our_z(n: int, *, device=None, dtype=None, **_: object) -> torch.Tensor:
        assert n == K
        drawn.append(_standard_normal(a.seed, a.num_steps - 1, torch.arange(K)))
        return drawn[-1].to(device=device, dtype=dtype)

    for step in range(6):
        values = losses_at(step)
        mine, other = (
            leaf_losses(values, dtype=torch.float32),
            leaf_losses(values, dtype=torch.float32),
        )
        total_a = a(mine)  # advances a.num_steps: our_z reads the draw a just made
        with monkeypatch.context() as patch:
            patch.setattr(torch, "randn", our_z)
            total_b = b(stacked(other))
        w_a, w_b = effective_weights(total_a, mine), effective_weights(total_b, other)
        torch.testing.assert_close(w_a, K * w_b, rtol=1e-6, atol=0)
        torch.testing.assert_close(total_a, K * total_b, rtol=1e-6, atol=0)
    assert len(drawn) == 6
    assert not torch.equal(drawn[0], drawn[1])


def test_imtll_is_twice_uw_at_minus_s_as_torchjd_documents() -> None:
    imtl, uw = scalarization.IMTLL(K).double(), scalarization.UW(K).double()
    with torch.no_grad():
        imtl.log_scale.copy_(torch.tensor([0.2, -0.4, 1.0]))
        uw.log_var.copy_(-imtl.log_scale)
    values = torch.tensor(losses_at(2), dtype=torch.float64)
    ours = IMTLL(TASKS).double()
    with torch.no_grad():
        ours.log_scales.copy_(imtl.log_scale)
    total = ours({t: values[i] for i, t in enumerate(TASKS)})
    torch.testing.assert_close(total, imtl(values))
    torch.testing.assert_close(total, 2 * uw(values))
    assert math.isfinite(total.item())


@pytest.mark.parametrize("mu", [0.1, 1.0])
def test_stch_after_its_nadir_epoch_is_k_times_torchjd_on_log_ratios(mu: float) -> None:
    """The authors' multi-task STCH: K * TorchJD's STCH (preferences 1) of log(L / nadir)."""
    stch = STCH(TASKS, mu=mu, warmup_epochs=1)
    epochs = ([4.0, 0.5, 2.0], [3.0, 0.25, 2.0]), ([2.0, 0.75, 1.0], [2.0, 0.25, 1.0])
    for epoch in epochs:
        for values in epoch:
            stch(leaf_losses(values))
        stch.epoch_end()
    # The nadir is the mean over the second epoch (the first is warm-up only).
    torch.testing.assert_close(
        stch.nadir.double(), torch.tensor([2.0, 0.5, 1.0], dtype=torch.float64)
    )
    values = [1.0, 0.6, 1.5]
    mine = leaf_losses(values, dtype=torch.float64)
    other = leaf_losses(values, dtype=torch.float64)
    total = stch(mine)
    reference = scalarization.STCH(mu, weights=torch.ones(K, dtype=torch.float64))
    theirs = K * reference(torch.log(stacked(other) / stch.nadir.double()))
    torch.testing.assert_close(total, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(
        effective_weights(total, mine), effective_weights(theirs, other), rtol=1e-10, atol=0
    )
    torch.testing.assert_close(stch.last_weights, effective_weights(total, mine).float())


def test_stch_warm_up_is_the_sum_of_log_losses() -> None:
    stch = STCH(TASKS)
    values = [4.0, 0.5, 2.0]
    mine = leaf_losses(values, dtype=torch.float64)
    total = stch(mine)
    torch.testing.assert_close(total, torch.tensor(math.log(4.0 * 0.5 * 2.0), dtype=total.dtype))
    torch.testing.assert_close(
        effective_weights(total, mine), torch.tensor([0.25, 2.0, 0.5], dtype=torch.float64)
    )


def test_stch_far_above_a_tiny_nadir_stays_finite_in_float32() -> None:
    """A loss of 3.4e8 over a nadir of 1e-30: the ratio is beyond float32, the total is not."""
    stch = STCH(["a", "b"], warmup_epochs=0)
    stch({"a": torch.tensor(1e-30), "b": torch.tensor(1.0)})
    stch.epoch_end()
    a = torch.tensor(3.4e8, requires_grad=True)
    b = torch.tensor(1.0, requires_grad=True)
    total = stch({"a": a, "b": b})
    assert torch.isfinite(total)
    total.backward()
    # The smooth maximum puts all the weight on a: K / L_a, finite.
    assert a.grad.item() == pytest.approx(2 / 3.4e8, rel=1e-5)
    assert math.isfinite(b.grad.item())
    # f_a = log(3.4e8 / 1e-30) = 87.4: the total is K mu (f_a + log(1 + e^(f_b - f_a))).
    assert total.item() == pytest.approx(2 * math.log(3.4e8 / 1e-30), rel=1e-5)


def test_stch_a_task_absent_from_the_nadir_epoch_takes_its_first_loss_after_it() -> None:
    stch = STCH(["a", "b"], warmup_epochs=0, allow_missing=True)
    stch({"a": torch.tensor(2.0)})  # b has no loss in the nadir epoch
    stch.epoch_end()
    assert stch.nadir.tolist() == [2.0, 0.0]
    b = torch.tensor(0.5, requires_grad=True)
    total = stch({"a": torch.tensor(2.0), "b": b})
    total.backward()
    assert stch.nadir.tolist() == [2.0, 0.5]
    # Both at their nadir: equal softmax shares, so b's weight is K * 1/2 / L_b = 2.
    assert b.grad.item() == pytest.approx(2.0, rel=1e-6)
