"""Running statistics shared by the weightings: the bias-corrected exponential moving average."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["debiased"]


def debiased(ema: Tensor, count: Tensor, momentum: float) -> Tensor:
    r"""Bias-corrected EMA :math:`m_t / (1 - \beta^t)`, NaN where ``count`` is 0.

    Adam's correction (Kingma & Ba 2015, Sec. 3): an EMA started at 0 with momentum
    :math:`\beta` is low by the factor :math:`1 - \beta^t` after :math:`t` updates, so dividing by
    it makes the first update equal the first value exactly. ``count`` holds :math:`t` per entry.
    """
    correction = 1.0 - momentum ** count.to(ema.dtype)
    return torch.where(count > 0, ema / correction.clamp_min(1e-38), torch.nan)
