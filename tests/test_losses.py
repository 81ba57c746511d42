from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from balanced_losses import HuberLoss
from balanced_losses.functional import huber_loss


def test_huber_module_equals_torch_module_and_functional():
    pred = torch.randn(8, 105, dtype=torch.float64) * 5
    target = torch.randn(8, 105, dtype=torch.float64) * 5
    torch.testing.assert_close(HuberLoss(2.0)(pred, target), nn.HuberLoss(delta=2.0)(pred, target))
    mask = torch.rand(8, 105) > 0.3
    torch.testing.assert_close(
        HuberLoss(2.0, target_clip=(-3, 3))(pred, target, mask),
        huber_loss(pred, target, delta=2.0, mask=mask, target_clip=(-3, 3)),
    )


def test_huber_module_validates_at_construction():
    with pytest.raises(ValueError, match=r"`delta` must be a finite number > 0, got 0"):
        HuberLoss(0)
    with pytest.raises(ValueError, match=r"`target_clip` must be \(lo, hi\) with lo < hi"):
        HuberLoss(target_clip=(1.0, 1.0))


def test_huber_module_repr_and_pickle():
    loss_fn = HuberLoss(0.5, target_clip=(-20.0, 20.0))
    assert repr(loss_fn) == "HuberLoss(delta=0.5, target_clip=(-20.0, 20.0))"
    assert repr(HuberLoss()) == "HuberLoss(delta=1.0)"
    clone = pickle.loads(pickle.dumps(loss_fn))
    x, y = torch.randn(4), torch.randn(4) * 40
    torch.testing.assert_close(clone(x, y), loss_fn(x, y))


def test_huber_module_compiles_fullgraph_equal_to_eager():
    loss_fn = HuberLoss(1.0, target_clip=(-20.0, 20.0))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="eager")
    pred, target = torch.randn(4, 105), torch.randn(4, 105) * 30
    mask = torch.rand(4, 105) > 0.5
    torch.testing.assert_close(compiled(pred, target, mask), loss_fn(pred, target, mask))
