"""Argument checks shared by the weighting modules (hyperparameters, not loss values)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

__all__ = ["check_number", "check_tasks", "per_task_values"]


def check_tasks(tasks: Iterable[str]) -> tuple[str, ...]:
    """Reject a bare string passed where a sequence of task names is expected."""
    if isinstance(tasks, str):
        raise TypeError(f"`tasks` must be a sequence of task names, got the string {tasks!r}")
    return tuple(tasks)


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
