"""Shared drivers for the weighting-method tests: one training step per method, losses, weights."""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import torch
from torch import Tensor

from balanced_losses import (
    DBMTL,
    DWA,
    FAMO,
    IMTLL,
    RLW,
    GeometricMean,
    UncertaintyWeighting,
    Weighting,
)

TASKS = ("depth", "segmentation", "normals")

FACTORIES: dict[str, Callable[[tuple[str, ...]], Weighting]] = {
    "DWA": lambda tasks: DWA(tasks),
    "RLW": lambda tasks: RLW(tasks, seed=1234),
    "IMTLL": lambda tasks: IMTLL(tasks),
    "FAMO": lambda tasks: FAMO(tasks),
    "GeometricMean": lambda tasks: GeometricMean(tasks),
    "DBMTL": lambda tasks: DBMTL(tasks, balance_features=False),
    "UncertaintyWeighting": lambda tasks: UncertaintyWeighting(tasks),
}
METHODS = sorted(FACTORIES)


def leaf_losses(values: list[float], *, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    """Scalar leaf tensors named after ``TASKS``, so that autograd gives d total / d L_k."""
    return {
        name: torch.tensor(v, dtype=dtype, requires_grad=True)
        for name, v in zip(TASKS, values, strict=True)
    }


def losses_at(step: int) -> list[float]:
    """A deterministic, positive, non-monotone sequence of per-task losses."""
    return [
        (k + 1) * math.exp(-0.1 * step) * (1.0 + 0.3 * math.sin(1.7 * step + k))
        for k in range(len(TASKS))
    ]


def effective_weights(total: Tensor, losses: dict[str, Tensor]) -> Tensor:
    """d total / d L_k in task order, by autograd (graph kept)."""
    names = list(losses)
    grads = torch.autograd.grad(total, [losses[n] for n in names], retain_graph=True)
    return torch.stack(grads)


def train_step(module: Weighting, step: int, *, dtype: torch.dtype = torch.float64) -> tuple:
    """One training step of ``module`` as its method prescribes; returns (total, weights).

    Learned parameters take a plain SGD step (stateless, so nothing else must be saved); DWA
    closes an epoch every third step; FAMO updates from the losses 10 % lower after the step.
    """
    losses = leaf_losses(losses_at(step), dtype=dtype)
    total = module(losses)
    weights = effective_weights(total, losses)
    params = list(module.parameters())
    if params:
        grads = torch.autograd.grad(total, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.sub_(0.1 * g)
    if isinstance(module, DWA) and step % 3 == 2:
        module.step()
    if isinstance(module, FAMO):
        after = [v * (0.9 - 0.05 * k) for k, v in enumerate(losses_at(step))]
        module.update(leaf_losses(after, dtype=dtype))
    return total.detach(), weights


def reload(module: Weighting, fresh: Weighting) -> Weighting:
    """Load ``module``'s state_dict into ``fresh`` through torch.save / torch.load."""
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return fresh
