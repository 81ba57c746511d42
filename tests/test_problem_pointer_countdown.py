"""Problem 1 of the suite: a plain sum starts in the regime the package is for."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if not (BENCHMARKS / "problems").is_dir():  # the release check copies tests/ out of the tree
    pytest.skip("benchmarks/ is not here (tests copied out of the tree)", allow_module_level=True)
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

from problems import pointer_countdown as pc  # noqa: E402


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_calibration_at_initialization(seed: int) -> None:
    # The targets of the issue (BACKGROUND.md's setup): the countdown's loss near 15.7, in
    # Huber's linear regime, and a countdown/pointer gradient ratio at the encoder of 0.1-0.2.
    # The pointer's loss is 0.11-0.13, short of the setup's 0.2 (the module docstring says why).
    train, _ = pc.PROBLEM.data()
    torch.manual_seed(seed)
    got = pc.calibration(pc.PROBLEM.model(), train.take(torch.arange(256)))
    assert 0.10 <= got["grad_ratio"] <= 0.20
    assert 15.0 <= got["countdown_loss"] <= 16.5
    assert 0.10 <= got["pointer_loss"] <= 0.14


def test_budget_is_the_setups() -> None:
    # BACKGROUND.md's setup: Adam at 1e-3, batch 32, 2048 training samples, 20 epochs.
    train, val = pc.PROBLEM.data()
    assert (len(train), len(val)) == (2048, 512)
    b = pc.PROBLEM.budget
    assert (b.epochs, b.batch_size, b.lr) == (20, 32, 1e-3)
