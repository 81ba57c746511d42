"""Per-step cost of every method relative to a plain ``sum(losses)``, time and memory.

A step is what a training loop pays per batch: forward (encoder, heads, losses), the method's
combination of the losses, backward, the optimizer step and the method's per-step hook (FAMO's
``update`` recomputes the losses after the step). Per-epoch hooks (DWA's ``step``) are not
counted.

Time: every method has its own copy of the model (same initialization) and optimizer. After a
warmup, each round runs one step of every method, in an order that rotates from round to
round, all in one process, so that machine load drifts affect every method alike. The table
gives the median step time and the median over rounds of (method's step time / the same
round's ``sum`` step time), with its interquartile range.

Memory: one more step of each method under ``torch.profiler`` with ``profile_memory=True``;
the peak is the highest total of live CPU tensor bytes allocated during the step, above the
level at its start (the step's working set: activations, gradients, temporaries).

Two trunks: the demo model (bidirectional GRU, hidden 32) and a wider one (hidden 128).
Writes ``<out>/speed.json`` (every row, the settings, the machine: CPU, cores, torch version and
threads, the load average at the start and at the end, and the wall time) and renders
``<out>/speed.md`` from it with ``benchmarks/render.py``, which also fills the README's and the
docs' tables from the JSON.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/speed.py    # a few minutes
    python benchmarks/speed.py --smoke              # seconds, for CI (speed_smoke.*)

Runs with one torch thread by default (``--threads``) so ratios do not depend on how busy the
other cores are.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import _pointer_countdown_lib as lib
import render
import torch

TRUNKS = {"demo": 32, "wide": 128}  # name -> GRU hidden size per direction


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="a few rounds, for CI")
    return parser.parse_args(argv)


class Stepper(Protocol):
    """Anything that runs one training step and returns its wall time in seconds."""

    def step(self) -> float: ...


class Runner:
    """One method's model, optimizer and strategy, stepping through fixed batches."""

    def __init__(self, method: str, hidden: int, batches: list[lib.Batch]) -> None:
        torch.manual_seed(0)
        self.model = lib.PointerCountdownNet(hidden=hidden)
        ctx = lib.MethodContext(lib.TASKS, dict(lib.OUTPUT_SIZES), self.model, 0)
        self.strategy = lib.REGISTRY[method].factory(ctx)
        params = [*self.model.parameters(), *self.strategy.extra_parameters()]
        self.optimizer = torch.optim.Adam(params, lr=1e-3)
        self.batches = itertools.cycle(batches)

    def step(self) -> float:
        batch = next(self.batches)
        start = time.perf_counter()
        self.strategy.step(self.model, self.optimizer, batch)
        return time.perf_counter() - start


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


def cost_rows(
    runners: Mapping[str, Stepper], times: Mapping[str, list[float]], baseline: str = "sum"
) -> list[dict[str, Any]]:
    """Per runner: median step time, per-round time ratio to ``baseline``, memory and ratios.

    The memory is measured here, one more step of each runner under the profiler.
    """
    memory = {m: peak_step_bytes(runner) for m, runner in runners.items()}
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


def measure(methods: list[str], hidden: int, args: argparse.Namespace) -> list[dict]:
    data = lib.make_data(8 * args.batch_size, seed=1)
    batches = [
        data.index(slice(i, i + args.batch_size)) for i in range(0, len(data), args.batch_size)
    ]
    runners = {m: Runner(m, hidden, batches) for m in methods}
    times = interleave(runners, rounds=args.rounds, warmup=args.warmup)
    return cost_rows(runners, times)


def to_json(
    results: dict[str, list[dict]],
    args: argparse.Namespace,
    *,
    argv: list[str],
    machine_start: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Everything measured, with the settings and the machine, for ``render.py``."""
    machine = lib.machine_info()
    return {
        "script": "benchmarks/speed.py",
        "command": " ".join(["python", "benchmarks/speed.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "wall_seconds": seconds,
        "load_average_1_5_15_min_at_start": machine_start["load_average_1_5_15_min"],
        "machine": machine,
        "trunks": [
            {"name": name, "gru_hidden": TRUNKS[name], "rows": rows}
            for name, rows in results.items()
        ],
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine_start = lib.machine_info()
    if args.smoke:
        args.rounds, args.warmup, args.batch_size = 3, 1, 4
    names = args.methods
    if names is not None:
        names = list(dict.fromkeys(["sum", *names]))
    methods = lib.resolve_methods(names)
    if "sum" not in methods:
        methods.insert(0, "sum")
    started = time.perf_counter()
    results = {}
    for trunk, hidden in TRUNKS.items():
        print(f"{trunk}: {len(methods)} methods, {args.rounds} rounds", flush=True)
        results[trunk] = measure(methods, hidden, args)
    record = to_json(
        results,
        args,
        argv=argv,
        machine_start=machine_start,
        seconds=time.perf_counter() - started,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "speed_smoke" if args.smoke else "speed"
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    md_path = args.out / f"{stem}.md"
    text = render.speed_markdown(record, source=render.relative(json_path))
    md_path.write_text(text)
    print(text)
    print(f"wrote {json_path} and {md_path}")
    if not args.smoke:
        print("README and docs tables: python benchmarks/render.py")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
