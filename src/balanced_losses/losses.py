"""Per-task loss modules built on :mod:`balanced_losses.functional`."""

from __future__ import annotations

import math

from torch import Tensor, nn

from balanced_losses import functional

__all__ = ["HuberLoss"]


class HuberLoss(nn.Module):
    r"""Mean Huber loss with a validity mask for padded elements and optional target clipping.

    A module twin of :func:`balanced_losses.functional.huber_loss`. Without a mask and without
    clipping it equals :class:`torch.nn.HuberLoss` with ``reduction="mean"``. With a boolean mask
    it is the mean over the valid elements only, so padded time steps count for nothing; a batch
    with no valid element gives 0 and a zero gradient, never NaN.

    Args:
        delta: Threshold between the quadratic and the linear regime; must be > 0. Inside it the
            per-element gradient is the residual; outside it is capped at ``delta``.
        target_clip: Optional ``(lo, hi)`` that targets are clamped to, e.g. ``(-20, 20)``.

    Shape:
        - input: :math:`(*)`; target: same shape; mask: boolean, broadcastable to input.
        - output: scalar.

    Example:
        >>> import torch
        >>> loss_fn = HuberLoss(delta=1.0, target_clip=(-20.0, 20.0))
        >>> pred = torch.zeros(2, 3)
        >>> target = torch.tensor([[0.5, 30.0, 0.0], [0.0, 0.0, 0.0]])
        >>> valid = torch.tensor([[True, True, False], [True, False, False]])
        >>> loss_fn(pred, target, valid)
        tensor(6.5417)
    """

    def __init__(self, delta: float = 1.0, *, target_clip: tuple[float, float] | None = None):
        super().__init__()
        if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
            raise ValueError(f"`delta` must be a finite number > 0, got {delta!r}")
        if target_clip is not None and not target_clip[0] < target_clip[1]:
            raise ValueError(f"`target_clip` must be (lo, hi) with lo < hi, got {target_clip!r}")
        self.delta = float(delta)
        self.target_clip = target_clip

    def forward(self, input: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
        """Return the mean Huber loss over the elements where ``mask`` is true (all if None)."""
        return functional.huber_loss(
            input, target, delta=self.delta, mask=mask, target_clip=self.target_clip
        )

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        clip = "" if self.target_clip is None else f", target_clip={self.target_clip}"
        return f"delta={self.delta}{clip}"
