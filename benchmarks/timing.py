"""Step time and memory of training methods, measured side by side in one process.

Each method is a :class:`Stepper`: something that runs one training step and returns its wall
time. :func:`interleave` runs every stepper once per round, in an order that rotates from round
to round, so that a change in the machine's load hits every method alike; :func:`median_iqr`
summarizes the per-round ratios; :func:`peak_step_bytes` measures one step's memory under
``torch.profiler``; :func:`cost_rows` puts the three together against a baseline.
``benchmarks/suite_speed.py`` and ``benchmarks/aggregators_speed.py`` use them.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata
from typing import Any, Protocol


class Stepper(Protocol):
    """Anything that runs one training step and returns its wall time in seconds."""

    def step(self) -> float: ...


def interleave(
    runners: Mapping[str, Stepper], *, rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Each runner's step times, one per round, the order of the runners rotating every round.

    ``warmup`` rounds first (not recorded): caches, allocator pools and lazy initialization.
    """
    names = list(runners)
    for _ in range(warmup):
        for runner in runners.values():
            runner.step()
    times: dict[str, list[float]] = {m: [] for m in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for m in order:
            times[m].append(runners[m].step())
    return times


def median_iqr(values: Sequence[float]) -> tuple[float, list[float]]:
    """The median and the interquartile range ``[q1, q3]`` of ``values``."""
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    return statistics.median(values), [q1, q3]


def peak_step_bytes(runner: Stepper) -> tuple[int, int]:
    """Peak live bytes above the step's starting level, and total bytes allocated, in a step."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        runner.step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    live = list(itertools.accumulate(n for _, n in events))
    return max([0, *live]), sum(n for _, n in events if n > 0)


def cost_rows(
    runners: Mapping[str, Stepper],
    times: Mapping[str, list[float]],
    baseline: str = "sum",
    *,
    memory_of: Callable[[Any], tuple[int, int]] = peak_step_bytes,
) -> list[dict[str, Any]]:
    """Per runner: median step time, per-round time ratio to ``baseline``, memory and ratios.

    The memory is measured here, one more step of each runner: ``memory_of(runner)`` gives its
    ``(peak, allocated)`` bytes (under the profiler by default; a GPU has its own counters).
    """
    memory = {m: memory_of(runner) for m, runner in runners.items()}
    rows = []
    for m in runners:
        ratio, iqr = median_iqr([t / s for t, s in zip(times[m], times[baseline], strict=True)])
        rows.append(
            {
                "method": m,
                "ms": 1e3 * statistics.median(times[m]),
                "ratio": ratio,
                "iqr": iqr,
                "peak": memory[m][0],
                "peak_ratio": memory[m][0] / max(memory[baseline][0], 1),
                "alloc": memory[m][1],
                "alloc_ratio": memory[m][1] / max(memory[baseline][1], 1),
            }
        )
    return rows


def package_version(package: str) -> str | None:
    """The installed version of ``package``, None where it is not installed."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
