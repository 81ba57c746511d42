"""Pure loss math with no state: masked, target-clipped Huber and reduction-factor corrections.

Everything here is a function of its arguments. The stateful modules in :mod:`balanced_losses`
build on these functions.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Correction", "huber_loss", "reduction_factor", "reduction_factors"]

Correction = Literal["none", "sqrt", "linear"]
"""How a task's loss is rescaled for the number of elements its mean runs over."""

_CORRECTIONS: tuple[str, ...] = ("none", "sqrt", "linear")


def _check_correction(correction: str) -> None:
    if correction not in _CORRECTIONS:
        raise ValueError(f"`correction` must be one of {list(_CORRECTIONS)}, got {correction!r}")


def _check_output_size(task: str, size: object) -> int:
    # bool is an int subclass; `True` as an output size is almost surely a mistake.
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"output size of task `{task}` must be an integer >= 1, got {size!r}")
    return size


def reduction_factor(output_size: int, correction: Correction = "sqrt") -> float:
    r"""Return the absolute reduction-factor correction for a loss averaged over ``output_size``.

    A loss :math:`L = \frac{1}{N}\sum_{i=1}^{N} \ell(\hat y_i, y_i)` has
    :math:`\partial L / \partial \hat y_i = \ell'_i / N`, so its gradient norm w.r.t. the
    ``N`` outputs is :math:`\lVert \ell' \rVert / N`, which is :math:`a / \sqrt{N}` when every
    per-element derivative has magnitude :math:`a`. Multiplying the loss by

    - ``"none"``: :math:`1`, leaves that :math:`1/\sqrt{N}` gap;
    - ``"sqrt"``: :math:`\sqrt{N}`, closes it exactly when the per-element derivative magnitudes
      are equal across tasks (and only then);
    - ``"linear"``: :math:`N`, turns the mean into a sum.

    Args:
        output_size: Number of elements per sample that the loss is averaged over.
        correction: One of ``"none"``, ``"sqrt"``, ``"linear"``.

    Returns:
        The factor :math:`c(N)`.

    Example:
        >>> reduction_factor(4, "sqrt")
        2.0
    """
    _check_correction(correction)
    _check_output_size("<output_size>", output_size)
    if correction == "sqrt":
        return math.sqrt(output_size)
    if correction == "linear":
        return float(output_size)
    return 1.0


def reduction_factors(
    output_sizes: Mapping[str, int], correction: Correction = "sqrt"
) -> dict[str, float]:
    r"""Return per-task reduction factors, relative so that their mean over tasks is 1.

    .. math:: c_k = \frac{c(N_k)}{\frac{1}{K}\sum_j c(N_j)}

    Only the ratios :math:`c_k / c_j` matter for balancing one task against another. Dividing
    by the mean keeps the scale of the total (and so the effective learning rate) the same as
    with ``correction="none"``: turning the correction on, or adding a task with a large output,
    does not silently multiply every gradient by :math:`\sqrt{N}`.

    Args:
        output_sizes: Task name to the number of elements per sample its loss averages over.
        correction: One of ``"none"``, ``"sqrt"``, ``"linear"``.

    Returns:
        Task name to :math:`c_k`, in the order of ``output_sizes``.

    Raises:
        ValueError: If ``output_sizes`` is empty, a size is not an integer >= 1, or the
            correction is unknown.

    Example:
        >>> factors = reduction_factors({"pointer": 2, "countdown": 98}, "sqrt")
        >>> round(factors["countdown"] / factors["pointer"], 6)
        7.0
    """
    _check_correction(correction)
    if len(output_sizes) == 0:
        raise ValueError("`output_sizes` must name at least one task, got an empty mapping")
    absolute = {
        task: reduction_factor(_check_output_size(task, size), correction)
        for task, size in output_sizes.items()
    }
    mean = sum(absolute.values()) / len(absolute)
    return {task: value / mean for task, value in absolute.items()}


def huber_loss(
    input: Tensor,
    target: Tensor,
    *,
    delta: float = 1.0,
    mask: Tensor | None = None,
    target_clip: tuple[float, float] | None = None,
) -> Tensor:
    r"""Mean Huber loss over the valid elements, with optional target clipping.

    .. math::
        \ell(r) = \begin{cases} \tfrac12 r^2 & |r| \le \delta \\
                  \delta (|r| - \tfrac12 \delta) & |r| > \delta \end{cases},\qquad
        L = \frac{\sum_i m_i\, \ell(\hat y_i - \operatorname{clip}(y_i))}{\max(1, \sum_i m_i)}

    Without ``mask`` and ``target_clip`` this equals
    ``torch.nn.functional.huber_loss(input, target, delta=delta)``. Masked-out elements count for
    nothing, not even through NaN or infinite padding values in ``target``: their residual is
    set to zero before the loss is taken. A batch with no valid element gives a loss of 0 with a
    zero gradient.

    Args:
        input: Predictions.
        target: Targets, same shape as ``input``.
        delta: Where the loss turns from quadratic to linear; must be > 0.
        mask: Optional boolean tensor, broadcastable to ``input``; ``True`` marks valid elements.
        target_clip: Optional ``(lo, hi)``; targets are clamped to it before the loss.

    Returns:
        A scalar tensor.

    Shape:
        - input: :math:`(*)`; target: same; mask: broadcastable to :math:`(*)`.
        - output: :math:`()`.

    Example:
        >>> pred = torch.tensor([0.0, 0.0, 0.0])
        >>> target = torch.tensor([0.5, 3.0, float("nan")])
        >>> huber_loss(pred, target, mask=torch.tensor([True, True, False]))
        tensor(1.3125)
    """
    if not (isinstance(delta, (int, float)) and math.isfinite(delta) and delta > 0):
        raise ValueError(f"`delta` must be a finite number > 0, got {delta!r}")
    if input.shape != target.shape:
        raise ValueError(
            f"`input` and `target` must have the same shape, got {tuple(input.shape)} "
            f"and {tuple(target.shape)}"
        )
    if target_clip is not None:
        lo, hi = target_clip
        if not lo < hi:
            raise ValueError(f"`target_clip` must be (lo, hi) with lo < hi, got {target_clip!r}")
        target = target.clamp(lo, hi)
    if mask is None:
        return F.huber_loss(input, target, reduction="mean", delta=delta)
    if mask.dtype != torch.bool:
        raise ValueError(f"`mask` must be a boolean tensor, got dtype {mask.dtype}")
    mask = mask.expand_as(input)
    # Padded targets may hold NaN or inf; putting the (detached) prediction there gives a zero
    # residual, so neither the loss nor its gradient can pick them up. The detach cuts the
    # gradient of this placeholder target, which must contribute nothing.
    target = torch.where(mask, target, input.detach())
    elementwise = F.huber_loss(input, target, reduction="none", delta=delta)
    total = torch.where(mask, elementwise, torch.zeros_like(elementwise)).sum()
    count = mask.sum().clamp_min(1).to(elementwise.dtype)
    return total / count
