"""The README's Python blocks run as written, in order, on a small two-head model."""

from __future__ import annotations

import contextlib
import io
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

README = Path(__file__).resolve().parents[1] / "README.md"

pytestmark = pytest.mark.skipif(
    not README.is_file(), reason="README.md is not here (tests copied out of the source tree)"
)


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


class TwoHeads(nn.Module):
    """The README's model: a shared encoder, a 2-output pointer and a 105-output countdown head."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(4, 16), nn.Tanh())
        self.pointer_head = nn.Linear(16, 2)
        self.countdown_head = nn.Linear(16, 105)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        feats = self.encoder(x)
        return {"pointer": self.pointer_head(feats), "countdown": self.countdown_head(feats)}


def test_readme_has_python_blocks() -> None:
    assert len(python_blocks()) >= 3


def test_readme_python_blocks_run_in_order() -> None:
    torch.manual_seed(0)
    model = TwoHeads()
    namespace = {
        "model": model,
        "F": F,
        "x": torch.randn(8, 4),
        "y_p": torch.rand(8, 2),
        "y_c": 20 * torch.randn(8, 105),  # large residuals: Huber's linear regime
    }
    printed = io.StringIO()
    for number, block in enumerate(python_blocks(), start=1):
        for p in model.parameters():
            p.grad = None
        with contextlib.redirect_stdout(printed):
            exec(compile(block, f"README.md python block {number}", "exec"), namespace)
        if "backward()" in block:
            # The block trained: the gradient reached the shared encoder, finite and non-zero.
            for p in model.encoder.parameters():
                assert p.grad is not None, f"block {number}: no gradient reached the encoder"
                assert torch.isfinite(p.grad).all()
                assert p.grad.abs().sum() > 0
    loss = namespace["loss"]
    assert isinstance(loss, torch.Tensor)
    assert loss.dim() == 0
    assert math.isfinite(loss.item())
    report = namespace["report"]
    assert set(report.norms) == {"pointer", "countdown"}
    assert all(n > 0 for n in report.norms.values())
    out = printed.getvalue()
    assert "train loss" in out  # the log_dict block printed on its first call
    assert "grad_share/countdown" in out
    assert "pointer" in out
    assert "countdown" in out
