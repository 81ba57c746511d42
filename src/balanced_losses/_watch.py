"""Which learned parameters an optimizer stepped: one process-wide optimizer step hook.

A weighting with learned parameters warns when they get gradients but no optimizer steps them
(they were not given to one). Torch's optimizers all call the hooks registered with
``register_optimizer_step_post_hook``; the one here, registered on first use, records which
watched parameters were stepped. Python-side records only: reading them costs no sync.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["ParameterWatch", "stepped", "watch"]

# Forward calls in a row with gradients but unchanged parameters before ParameterWatch warns:
# more than any gradient-accumulation window in practice.
_STALE_STEPS = 50

# Ids of the watched parameters, and of those an optimizer stepped since the last check.
_WATCHED: dict[int, weakref.ref[Tensor]] = {}
_STEPPED: dict[int, bool] = {}
_HOOK: list[Any] = []


def _mark_stepped(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            ref = _WATCHED.get(id(param))
            if ref is not None and ref() is param:
                _STEPPED[id(param)] = True


def _forget(ref: weakref.ref[Tensor]) -> None:
    for key in [key for key, value in _WATCHED.items() if value is ref]:
        del _WATCHED[key]
        _STEPPED.pop(key, None)


def watch(params: Sequence[Tensor]) -> None:
    """Start recording optimizer steps of ``params`` (registers the hook on first use)."""
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_mark_stepped))
    for param in params:
        ref = _WATCHED.get(id(param))
        # Ids are reused once an object is freed: a dead or foreign entry is replaced.
        if ref is None or ref() is not param:
            _WATCHED[id(param)] = weakref.ref(param, _forget)
            _STEPPED.pop(id(param), None)


def stepped(params: Sequence[Tensor]) -> bool:
    """Whether an optimizer stepped any of ``params`` since the last call; clears the record."""
    return any(_STEPPED.pop(id(p), False) for p in params)


class ParameterWatch:
    """Warns once when a module's parameters get gradients but no optimizer steps them.

    That happens when they were not given to any optimizer: the module then stays at its
    initial values, silently. Read from Python-side records (which parameters an optimizer
    stepped, through torch's optimizer step hook; whether a gradient exists): no sync.
    """

    def __init__(self) -> None:
        # Training calls in a row with gradients and no optimizer step.
        self.stale_steps = 0
        self.warned = False

    def check(self, module: nn.Module) -> None:
        """Count one training call of ``module``; warn once at ``_STALE_STEPS`` stale calls."""
        if self.warned or torch.compiler.is_compiling():
            return
        params = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not params:
            return
        watch(params)
        was_stepped = stepped(params)
        got_grad = any(p.grad is not None for p in params)
        self.stale_steps = self.stale_steps + 1 if got_grad and not was_stepped else 0
        if self.stale_steps >= _STALE_STEPS:
            self.warned = True
            names = ", ".join(f"`{name}`" for name, _ in module.named_parameters(recurse=False))
            warnings.warn(
                f"{type(module).__name__}'s parameters {names} have received gradients for "
                f"{_STALE_STEPS} steps and no optimizer stepped them: pass "
                "`weighting.parameters()` to the optimizer (e.g. "
                "`torch.optim.Adam([*model.parameters(), *weighting.parameters()])`), or the "
                "weights stay at their initial values",
                UserWarning,
                stacklevel=4,
            )
