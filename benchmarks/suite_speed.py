"""Step time and peak memory of every method of the suite, as ratios to a plain sum.

Run through ``python benchmarks/suite.py --speed [--problems ...] [--methods ...]``. On each
problem, every method gets its own model and optimizer and trains on the problem's batches;
rounds interleave the methods (their order rotating every round) so that a change in the
machine's load hits all of them alike, after warm-up rounds. A method's time ratio is the median
over rounds of its step time divided by the plain sum's in the same round; its memory ratio is
the peak of live tensor bytes in one step (under ``torch.profiler``), divided by the plain sum's.
One torch thread. Results: ``benchmarks/results/suite_speed.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Iterator
from typing import Any

import harness
import timing
import torch
from problems import Problem, Split
from render_suite import PHASES


class Stepper:
    """One method training on endless batches of a problem: ``step()`` returns its seconds."""

    def __init__(self, problem: Problem, method: str, train: Split, seed: int = 0) -> None:
        self.trainer = harness.start(problem, method, train, seed)
        self.train = train
        self.batches = self._batches(problem.budget.batch_size)

    def _batches(self, size: int) -> Iterator[Split]:
        size = min(size, len(self.train))  # full batches only: equal work every step
        generator = torch.Generator().manual_seed(0)
        while True:
            for index in harness.batches(len(self.train), size, generator):
                if len(index) == size:
                    yield self.train.take(index)

    def step(self) -> float:
        batch = next(self.batches)
        start = time.perf_counter()
        self.trainer.step(batch)
        return time.perf_counter() - start


def measure(
    problem: Problem, methods: list[str], rounds: int, warmup: int, *, smoke: bool = False
) -> dict[str, Any]:
    train, _ = problem.data(smoke=smoke)  # smoke: the small split, a run of seconds
    runners = {m: Stepper(problem, m, train) for m in ["sum", *[m for m in methods if m != "sum"]]}
    with harness.warnings_as_notes():
        times = timing.interleave(runners, rounds=rounds, warmup=warmup)
        memory = {m: timing.peak_step_bytes(r) for m, r in runners.items()}
    rows = []
    for m in runners:
        ratios = [t / b for t, b in zip(times[m], times["sum"], strict=True)]
        ratio, iqr = timing.median_iqr(ratios)
        rows.append(
            {
                "method": m,
                "step_seconds": statistics.median(times[m]),
                "ratio": ratio,
                "ratio_iqr": iqr,
                "peak_bytes": memory[m][0],
                "peak_ratio": memory[m][0] / max(memory["sum"][0], 1),
            }
        )
    return {"problem": problem.name, "rounds": rounds, "warmup": warmup, "rows": rows}


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    rounds, warmup = (2, 1) if args.smoke else (60, 5)
    started = time.perf_counter()
    out = args.out or harness.RESULTS
    path = out / "suite_speed.json"
    record: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {"problems": {}}
    command = " ".join(["python", "benchmarks/suite.py", "--speed", "--problems", *args.problems])
    if args.methods:
        command += " --methods " + " ".join(args.methods)
    for name in args.problems:
        problem = harness.load_problem(name)
        methods = [m for m in (args.methods or harness.methods_of(problem)) if ":" not in m]
        methods = [m for m in methods if m != harness.CONSTANT]
        # The steps after a calibration, measured apart (the warm-up freezes it).
        methods += [PHASES[m][0] for m in methods if m in PHASES]
        print(f"{name}: {len(methods)} methods, {rounds} interleaved rounds", flush=True)
        begun = time.perf_counter()
        entry = measure(problem, methods, rounds, warmup, smoke=args.smoke)
        # Each problem keeps the call that measured it: problems can be measured apart.
        entry["call"] = {
            "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "wall_seconds": time.perf_counter() - begun,
            "machine": harness.machine_info(),
            "threads": 1,
        }
        previous = record["problems"].get(name)
        if args.methods and previous is not None:
            # Methods measured on their own join the problem's rows: each row's ratio is to the
            # plain sum of its own interleaved rounds, and the earlier rows and sum stay.
            measured = {row["method"] for row in entry["rows"]} - {"sum"}
            kept = [row for row in previous["rows"] if row["method"] not in measured]
            previous["rows"] = kept + [row for row in entry["rows"] if row["method"] in measured]
            previous.setdefault("added", []).append({"methods": sorted(measured), **entry["call"]})
            entry = previous
        record["problems"][name] = entry
    if not args.smoke or args.out is not None:
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"done in {harness.format_seconds(time.perf_counter() - started)}")
    return 0
