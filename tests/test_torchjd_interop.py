"""The TorchJD interop example: our losses and balancing feed mtl_backward with UPGrad."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

pytest.importorskip("torchjd")
pytest.importorskip("qpsolvers")  # UPGrad's default projector needs torchjd[quadprog-projector]
pytest.importorskip("quadprog")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "torchjd_interop.py"

pytestmark = pytest.mark.skipif(
    not EXAMPLE.is_file(), reason="examples/ is not here (tests copied out of the source tree)"
)


@pytest.fixture(scope="module")
def example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("torchjd_interop", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("balance", ["normalizer", "factors"])
def test_a_few_steps_run_and_stay_finite(example: ModuleType, balance: str) -> None:
    losses = example.train(3, balance)
    assert set(losses) == {"pointer", "countdown"}
    assert all(math.isfinite(v) and v > 0 for v in losses.values())


def test_scaled_losses_are_the_normalizer_total_split_by_task(example: ModuleType) -> None:
    raw = {"pointer": torch.tensor(0.2), "countdown": torch.tensor(15.7)}
    fed = example.balance_losses(raw, "normalizer", example.LossNormalizer(example.OUTPUT_SIZES))
    reference = example.LossNormalizer(example.OUTPUT_SIZES)
    torch.testing.assert_close(sum(fed), reference(raw))


def test_factors_alone_follow_sqrt_output_size(example: ModuleType) -> None:
    raw = {"pointer": torch.tensor(1.0), "countdown": torch.tensor(1.0)}
    fed = example.balance_losses(raw, "factors", example.LossNormalizer(example.OUTPUT_SIZES))
    torch.testing.assert_close(fed[1] / fed[0], torch.tensor(math.sqrt(24 / 2)))


def test_upgrad_fills_the_shared_gradients(example: ModuleType) -> None:
    from torchjd.aggregation import UPGrad
    from torchjd.autojac import jac_to_grad, mtl_backward

    model = example.TwoHeads()
    x, targets = example.make_batch(torch.Generator().manual_seed(0))
    features, outputs = model(x)
    huber = example.HuberLoss()
    raw = {t: huber(outputs[t], targets[t]) for t in example.OUTPUT_SIZES}
    mtl_backward(example.balance_losses(raw, "factors", None), features=features)
    jac_to_grad(model.encoder.parameters(), UPGrad())
    for p in model.parameters():
        assert p.grad is not None
        assert torch.isfinite(p.grad).all()
    # UPGrad wrote a real, non-zero gradient into the shared encoder.
    assert any(p.grad.abs().sum() > 0 for p in model.encoder.parameters())


def test_main_runs_with_a_small_step_count(
    example: ModuleType, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["torchjd_interop.py", "--steps", "2"])
    example.main()
    out = capsys.readouterr().out
    assert "pointer" in out
    assert "at step 2" in out
