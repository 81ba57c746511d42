"""Assertion helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor


def grad_norm(output: Tensor, wrt: Tensor | Iterable[Tensor]) -> Tensor:
    """Norm of the gradient of ``output`` w.r.t. ``wrt`` (a tensor or several), graph kept."""
    inputs = [wrt] if isinstance(wrt, Tensor) else list(wrt)
    grads = torch.autograd.grad(output, inputs, retain_graph=True, allow_unused=True)
    squares = [g.pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def effective_weights(total: Tensor, losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """d total / d loss_k for each task, by autograd."""
    names = list(losses)
    grads = torch.autograd.grad(total, [losses[n] for n in names], retain_graph=True)
    return dict(zip(names, grads, strict=True))
