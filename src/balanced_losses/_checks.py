"""Argument checks shared by the weighting modules (hyperparameters, not loss values)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

__all__ = [
    "check_betas",
    "check_count",
    "check_loss",
    "check_loss_mapping",
    "check_loss_values",
    "check_momentum",
    "check_number",
    "check_seed",
    "check_task_names",
    "check_task_weights",
    "per_task_values",
]


def check_task_names(tasks: Iterable[str]) -> tuple[str, ...]:
    """Return ``tasks`` as a tuple of unique, non-empty strings, or raise naming the problem."""
    if isinstance(tasks, str):
        raise TypeError(f"`tasks` must be a sequence of task names, got the string {tasks!r}")
    if not isinstance(tasks, Iterable):
        raise TypeError(f"`tasks` must be a sequence of task names, got {type(tasks).__name__}")
    names = tuple(tasks)
    if len(names) == 0:
        raise ValueError("a weighting needs at least one task, got none")
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"task names must be non-empty strings, got {name!r}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"task names must be unique, got duplicates {duplicates}")
    return names


def check_seed(seed: int | None) -> int:
    """Return ``seed`` if it is an integer in ``[0, 2**63)``; draw one when it is None.

    A None seed is drawn from torch's global RNG (a host value: construction time only).
    """
    if seed is None:
        return int(torch.randint(0, 2**62, ()).item())
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise ValueError(f"`seed` must be an integer >= 0 and < 2**63 or None, got {seed!r}")
    return seed


def check_number(name: str, value: object, *, low: float, strict: bool) -> float:
    """Return ``value`` as a float if it is a finite number above ``low`` (strictly if asked)."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if strict else value >= low)
    )
    if not ok:
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def per_task_values(
    name: str, tasks: Sequence[str], values: Mapping[str, float] | None, default: float
) -> list[float]:
    """Expand an optional task-name-to-number mapping into a list in task order."""
    if values is None:
        return [default] * len(tasks)
    unknown = sorted(set(values) - set(tasks))
    if unknown:
        shown = ", ".join(f"`{task}`" for task in unknown)
        raise KeyError(f"unknown task(s) {shown} in `{name}`; expected one of {list(tasks)}")
    result = []
    for task in tasks:
        value = values.get(task, default)
        if not (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ):
            raise ValueError(f"`{name}` of task `{task}` must be a finite number, got {value!r}")
        result.append(float(value))
    return result


def check_betas(betas: object) -> tuple[float, float]:
    """Return Adam's ``betas`` as two floats if they are a pair of numbers in [0, 1)."""
    ok = (
        isinstance(betas, (tuple, list))
        and len(betas) == 2
        and all(
            isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0
            for b in betas
        )
    )
    if not ok:
        raise ValueError(f"`betas` must be a pair of numbers in [0, 1), got {betas!r}")
    return float(betas[0]), float(betas[1])  # type: ignore[index]


def check_count(name: str, value: object) -> int:
    """Return ``value`` if it is an integer >= 1 (not a bool); otherwise a ValueError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}")
    return value


def check_momentum(momentum: float) -> float:
    """Return ``momentum`` as a float if it is in [0, 1): an EMA weight on the old value."""
    if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
        raise ValueError(f"`momentum` must be in [0, 1), got {momentum!r}")
    return float(momentum)


def check_task_weights(tasks: Sequence[str], weights: Mapping[str, float] | None) -> list[float]:
    """Per-task weights in task order: finite numbers >= 0, 1 for tasks not named."""
    values = per_task_values("weights", tasks, weights, 1.0)
    for task, value in zip(tasks, values, strict=True):
        if value < 0:
            raise ValueError(f"`weights` of task `{task}` must be >= 0, got {value!r}")
    return values


def check_loss_mapping(losses: object) -> None:
    """Raise TypeError unless ``losses`` is a mapping (from task name to loss)."""
    if not isinstance(losses, Mapping):
        raise TypeError(
            f"`losses` must be a mapping from task name to scalar loss, got {type(losses)}"
        )


def check_loss(name: str, loss: object) -> Tensor:
    """Return ``loss`` if it is a 0-dim tensor; raise naming task ``name`` otherwise."""
    if not isinstance(loss, Tensor):
        raise TypeError(f"loss of task `{name}` must be a Tensor, got {type(loss)}")
    if loss.dim() != 0:
        raise ValueError(
            f"loss of task `{name}` must be a scalar (0-dim) tensor, got shape "
            f"{tuple(loss.shape)}; reduce it first"
        )
    return loss


def check_loss_values(
    tasks: Sequence[str], values: Tensor, present: Tensor, domain: str | None
) -> None:
    """Raise ``ValueError`` naming the task on a present loss that is not finite or in ``domain``.

    ``domain`` is None (any finite value), ``"nonnegative"`` or ``"positive"``. Opt-in
    (``check_inputs=True``): every ``.tolist()`` here is a host-device sync.
    """
    for name, value, ok in zip(tasks, values.tolist(), present.tolist(), strict=True):
        if not ok:
            continue
        if not math.isfinite(value):
            raise ValueError(f"loss of task `{name}` must be finite, got {value}")
        if domain == "nonnegative" and value < 0:
            raise ValueError(f"loss of task `{name}` must be >= 0, got {value}")
        if domain == "positive" and value <= 0:
            raise ValueError(f"loss of task `{name}` must be > 0, got {value}")
