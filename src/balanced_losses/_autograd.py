"""Helpers shared by the modules that take gradients w.r.t. chosen tensors (no public API)."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "as_tensors",
    "constant_factor",
    "is_measuring",
    "measuring",
    "scale_gradient",
    "task_gradients",
    "warn_constant_factors",
]

# How many measurements are in progress. A process-wide counter, not a thread-local or a
# ContextVar: autograd runs the backward of CUDA graphs on its own device threads, which would
# not see a value set in the caller's thread.
_measuring_depth = 0


@contextmanager
def measuring() -> Iterator[None]:
    """Mark gradients taken inside as measurements, not training steps.

    :class:`~balanced_losses.GradientBalancer` sees the flag in its backward: it then applies
    its current multipliers without updating its statistics or warning about missing tasks.
    """
    global _measuring_depth
    _measuring_depth += 1
    try:
        yield
    finally:
        _measuring_depth -= 1


def is_measuring() -> bool:
    """True inside :func:`measuring`."""
    return _measuring_depth > 0


def as_tensors(params: nn.Module | Tensor | Iterable[Tensor], name: str = "params") -> list[Tensor]:
    """Return ``params`` as a list of tensors that require grad.

    Accepts an ``nn.Module`` (its parameters that require grad), one tensor, or an iterable of
    tensors (parameters or intermediate activations such as shared features).
    """
    tensors: list[Tensor]
    if isinstance(params, nn.Module):
        tensors = [p for p in params.parameters() if p.requires_grad]
    elif isinstance(params, Tensor):
        tensors = [params]
    else:
        tensors = list(params)
    if not tensors:
        raise ValueError(f"`{name}` must hold at least one tensor that requires grad, got none")
    for i, tensor in enumerate(tensors):
        if not isinstance(tensor, Tensor):
            raise TypeError(f"`{name}` must hold tensors, got {type(tensor)} at position {i}")
        if not tensor.requires_grad:
            raise ValueError(
                f"`{name}` must hold tensors that require grad; the one at position {i} "
                f"(shape {tuple(tensor.shape)}) does not"
            )
    return tensors


def task_gradients(loss: Tensor, tensors: list[Tensor]) -> list[Tensor | None]:
    """Gradient of ``loss`` w.r.t. each tensor; None where the loss does not depend on it.

    Uses ``torch.autograd.grad`` with ``retain_graph=True``: the caller's ``.backward()`` still
    works afterwards, and no ``.grad`` attribute is touched.
    """
    if not loss.requires_grad:
        return [None] * len(tensors)
    with measuring():
        grads = torch.autograd.grad(loss, tensors, retain_graph=True, allow_unused=True)
    return list(grads)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by fixed factors in backward."""

    @staticmethod
    def forward(ctx: Any, values: Tensor, factors: Tensor) -> Tensor:
        ctx.save_for_backward(factors)
        return values.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (factors,) = ctx.saved_tensors
        return grad * factors, None


def scale_gradient(values: Tensor, factors: Tensor) -> Tensor:
    """``values`` unchanged, with the gradient flowing back through them times ``factors``."""
    scaled: Tensor = _ScaleGradient.apply(values, factors)  # type: ignore[no-untyped-call]
    return scaled


def constant_factor(loss: Tensor) -> float | None:
    """The Python number ``loss`` was last multiplied by (``0.1 * loss``, ``loss * 3``), or None.

    Reads the autograd node that made ``loss`` (eager mode only): a product whose second operand
    (where PyTorch puts a Python number, whichever side it was written on) is a 0-dim CPU
    tensor of Python's number types, float64 or int64. A tensor factor the user computed, such
    as ``loss * (1 / mask.sum())``, has the loss's dtype or device and is not reported.
    """
    node = loss.grad_fn
    if node is None or node.name() != "MulBackward0":
        return None
    if sum(f is not None for f, _ in node.next_functions) != 1:
        return None
    saved = getattr(node, "_saved_other", None)
    if (
        isinstance(saved, Tensor)
        and saved.dim() == 0
        and saved.device.type == "cpu"
        and saved.dtype in (torch.float64, torch.int64)
        and not saved.requires_grad
    ):
        # A factor of 0 is not cancelled: it removes the task.
        return float(saved) or None
    return None


def warn_constant_factors(method: str, given: Mapping[str, Tensor]) -> None:
    """Warn about losses multiplied by a Python number, for a ``method`` that cancels them.

    Eager mode only (see :func:`constant_factor`); the caller asks once per module.
    """
    factors = {name: constant_factor(loss) for name, loss in given.items()}
    found = {name: f for name, f in factors.items() if f is not None and f != 1.0}
    if not found:
        return
    shown = ", ".join(f"`{name}` (x{f:g})" for name, f in found.items())
    suggestion = ", ".join(f"{name!r}: {f:g}" for name, f in found.items())
    warnings.warn(
        f"{method}: the losses of {shown} are multiplied by a constant, and {method} "
        "cancels a constant factor of a loss, so that factor does not change training. "
        f"Drop it from the loss and pass `weights={{{suggestion}}}` to {method} instead: "
        "that scales the task's gradient after balancing",
        UserWarning,
        stacklevel=3,
    )
