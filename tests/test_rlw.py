"""RLW: K * softmax(z), z ~ N(0, I) from a counter-based (Philox4x32-10) stream of the seed."""

from __future__ import annotations

import io
import math
from collections import OrderedDict

import pytest
import torch

from balanced_losses import RLW
from balanced_losses._numerics import philox4x32 as _philox4x32
from balanced_losses._numerics import standard_normal as _standard_normal
from tests.asserts import by_task
from tests.registry import TASKS, leaf_losses, losses_at

# Known-answer vectors of Philox4x32-10, from the Random123 distribution (tests/kat_vectors):
# counter words, key words, expected output words, all hex.
PHILOX_KAT = [
    (
        "00000000 00000000 00000000 00000000",
        "00000000 00000000",
        "6627e8d5 e169c58d bc57ac4c 9b00dbd8",
    ),
    (
        "ffffffff ffffffff ffffffff ffffffff",
        "ffffffff ffffffff",
        "408f276d 41c83b0e a20bc7c6 6d5451fd",
    ),
    (
        "243f6a88 85a308d3 13198a2e 03707344",
        "a4093822 299f31d0",
        "d16cfe09 94fdcceb 5001e420 24126ea1",
    ),
]


def words(text: str) -> tuple[torch.Tensor, ...]:
    return tuple(torch.tensor(int(w, 16), dtype=torch.long) for w in text.split())


@pytest.mark.parametrize(("counter", "key", "expected"), PHILOX_KAT, ids=["zeros", "ones", "pi"])
def test_philox_matches_the_random123_known_answers(counter: str, key: str, expected: str) -> None:
    got = _philox4x32(words(counter), words(key))  # type: ignore[arg-type]
    assert [int(w) for w in got] == [int(w, 16) for w in expected.split()]


def test_draws_follow_box_muller_of_the_philox_words() -> None:
    # Hand-computed from the first KAT vector (seed 0, step 0, task 0) in float64.
    w0, w1 = 0x6627E8D5, 0xE169C58D
    u1, u2 = (((w >> 9) + 0.5) / 2**23 for w in (w0, w1))
    expected = math.sqrt(-2 * math.log(u1)) * math.cos(2 * math.pi * u2)
    z = _standard_normal(torch.tensor(0), torch.tensor(0), torch.tensor(0))
    assert z.dtype == torch.float32
    # float32 log, sqrt and cos: a few ulps of 1.2e-7 from the float64 value.
    torch.testing.assert_close(
        z.double(), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0
    )


def test_weights_are_k_softmax_of_the_stream_at_the_step_counter() -> None:
    rlw = RLW(TASKS, seed=7).double()
    for step in range(4):
        z = _standard_normal(torch.tensor(7), torch.tensor(step), torch.arange(3)).double()
        expected = 3 * torch.exp(z) / torch.exp(z).sum()
        values = losses_at(step)
        total = rlw(leaf_losses(values))
        torch.testing.assert_close(torch.stack(list(by_task(rlw).values())), expected)
        torch.testing.assert_close(total, (expected * torch.tensor(values).double()).sum())
        assert int(rlw.num_steps) == step + 1


# ------------------------------------------------------------------ the draws are N(0, 1)

SEED = 2024
STEPS, K = 20_000, 4  # 80 000 draws


@pytest.fixture(scope="module")
def draws() -> torch.Tensor:
    """z of tasks 0..3 at steps 0..19999, shape (steps, tasks), float64 for the statistics."""
    step = torch.arange(STEPS)[:, None]
    return _standard_normal(torch.tensor(SEED), step, torch.arange(K)[None, :]).double()


def test_draws_have_mean_0_and_std_1(draws: torch.Tensor) -> None:
    # Bounds of about 4 standard errors (1/sqrt(n) for the mean, 1/sqrt(2n) for the std).
    n = draws.numel()
    assert abs(draws.mean().item()) < 4 / math.sqrt(n), draws.mean()
    assert abs(draws.std().item() - 1) < 4 / math.sqrt(2 * n), draws.std()


def test_draws_pass_kolmogorov_smirnov_against_the_normal_cdf(draws: torch.Tensor) -> None:
    x = draws.flatten().sort().values
    n = x.numel()
    cdf = 0.5 * (1 + torch.erf(x / math.sqrt(2)))
    rank = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(rank / n - cdf, cdf - (rank - 1) / n).max().item()
    # 1.95 / sqrt(n) is the two-sided critical value at level 0.001.
    assert ks < 1.95 / math.sqrt(n), ks


@pytest.mark.parametrize(("threshold", "probability"), [(2.0, 0.0455003), (3.0, 0.0026998)])
def test_tails_have_the_normal_mass(draws: torch.Tensor, threshold: float, probability: float):
    # KS is blind in the tails: check P(|z| > t) within 4.5 binomial standard errors.
    n = draws.numel()
    freq = (draws.abs() > threshold).double().mean().item()
    assert abs(freq - probability) < 4.5 * math.sqrt(probability * (1 - probability) / n), freq


def test_draws_of_different_tasks_steps_and_seeds_are_uncorrelated(draws: torch.Tensor) -> None:
    bound = 4.5 / math.sqrt(STEPS)  # 0.032: 4.5 standard errors of a correlation over 20000
    across_tasks = torch.corrcoef(draws.T) - torch.eye(K, dtype=torch.float64)
    assert across_tasks.abs().max().item() < bound, across_tasks
    for k in range(K):
        lag1 = torch.corrcoef(torch.stack([draws[1:, k], draws[:-1, k]]))[0, 1]
        assert abs(lag1.item()) < bound, (k, lag1)
    step = torch.arange(STEPS)[:, None]
    next_seed = _standard_normal(torch.tensor(SEED + 1), step, torch.arange(K)[None, :])
    pair = torch.stack([draws.flatten(), next_seed.double().flatten()])
    assert abs(torch.corrcoef(pair)[0, 1].item()) < 4.5 / math.sqrt(draws.numel())


def test_high_counter_and_seed_words_matter() -> None:
    # step and seed above 2**32 use the counter's and key's high words: 2**32 apart must differ.
    task = torch.arange(8)
    base = _standard_normal(torch.tensor(5), torch.tensor(3), task)
    assert not torch.equal(base, _standard_normal(torch.tensor(5), torch.tensor(3 + 2**32), task))
    assert not torch.equal(base, _standard_normal(torch.tensor(5 + 2**32), torch.tensor(3), task))
    top = _standard_normal(torch.tensor(2**63 - 1), torch.tensor(2**63 - 1), task)
    assert torch.isfinite(top).all()
    assert (top.abs() < 5.8).all()


# ----------------------------------------------------------------------- module behaviour


def test_global_rng_is_neither_used_nor_advanced() -> None:
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    rlw = RLW(TASKS, seed=5)
    rlw(leaf_losses(losses_at(0)))
    assert torch.equal(torch.rand(3), expected)


def test_same_seed_same_draws_and_seed_none_follows_manual_seed() -> None:
    def draws_of(module: RLW) -> list[torch.Tensor]:
        out = []
        for step in range(3):
            module(leaf_losses(losses_at(step)))
            out.append(torch.stack(list(by_task(module).values())))
        return out

    for a, b in zip(draws_of(RLW(TASKS, seed=3)), draws_of(RLW(TASKS, seed=3)), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(draws_of(RLW(TASKS, seed=3))[0], draws_of(RLW(TASKS, seed=4))[0])
    torch.manual_seed(11)
    first = RLW(TASKS)
    torch.manual_seed(11)
    second = RLW(TASKS)
    assert torch.equal(first.seed, second.seed)
    for a, b in zip(draws_of(first), draws_of(second), strict=True):
        assert torch.equal(a, b)


def test_eval_mode_is_the_plain_sum_and_draws_nothing() -> None:
    trained = RLW(TASKS, seed=1)
    probe = RLW(TASKS, seed=1)
    probe.eval()
    total = probe(leaf_losses([1.0, 2.0, 3.0]))
    torch.testing.assert_close(total, torch.tensor(6.0, dtype=torch.float64))
    assert all(w.item() == 1.0 for w in by_task(probe).values())
    assert int(probe.num_steps) == 0
    probe.train()
    trained(leaf_losses([1.0, 2.0, 3.0]))
    probe(leaf_losses([1.0, 2.0, 3.0]))
    assert torch.equal(trained.last_weights, probe.last_weights)


def test_weights_sum_to_k() -> None:
    rlw = RLW(TASKS, seed=0).double()
    for step in range(5):
        rlw(leaf_losses(losses_at(step)))
        torch.testing.assert_close(rlw.last_weights.sum(), torch.tensor(3.0, dtype=torch.float64))


def test_state_dict_holds_seed_and_counter_and_overrides_the_constructor_seed() -> None:
    original = RLW(TASKS, seed=2**40 + 3)
    for step in range(3):
        original(leaf_losses(losses_at(step)))
    state = original.state_dict()
    assert set(state) == {"seed", "num_steps", "_extra_state"}
    assert int(state["seed"]) == 2**40 + 3
    assert int(state["num_steps"]) == 3
    resumed = RLW(TASKS, seed=1)
    resumed.load_state_dict(state)
    for step in range(3, 6):
        original(leaf_losses(losses_at(step)))
        resumed(leaf_losses(losses_at(step)))
        assert torch.equal(original.last_weights, resumed.last_weights)
    assert "seed=1099511627779" in repr(resumed)


def test_version_1_checkpoint_loads_with_a_warning_and_restarts_the_stream() -> None:
    # A version-1 state_dict: a CPU generator state in `_extra_state`, no seed, no counter.
    old = OrderedDict(_extra_state={"generator": torch.Generator().manual_seed(9).get_state()})
    old._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    buffer = io.BytesIO()
    torch.save(old, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    module = RLW(TASKS, seed=9)
    module(leaf_losses(losses_at(0)))
    with pytest.warns(
        UserWarning, match=r"version 1.*restart from step 0 with this module's seed 9"
    ):
        module.load_state_dict(state)
    assert int(module.num_steps) == 0
    assert int(module.seed) == 9
    fresh = RLW(TASKS, seed=9)
    module(leaf_losses(losses_at(0)))
    fresh(leaf_losses(losses_at(0)))
    assert torch.equal(module.last_weights, fresh.last_weights)


def test_a_current_state_dict_without_metadata_loads_silently() -> None:
    original = RLW(TASKS, seed=4)
    original(leaf_losses(losses_at(0)))
    plain = dict(original.state_dict())  # a plain dict has no _metadata: version unknown
    resumed = RLW(TASKS, seed=0)
    resumed.load_state_dict(plain)  # filterwarnings=error: a warning would fail here
    assert int(resumed.num_steps) == 1
    assert int(resumed.seed) == 4


@pytest.mark.parametrize("seed", [-1, 2**63, 1.0, True])
def test_seed_out_of_range_is_rejected(seed: object) -> None:
    with pytest.raises(ValueError, match=r"`seed` must be an integer >= 0 and < 2\*\*63"):
        RLW(TASKS, seed=seed)  # type: ignore[arg-type]
