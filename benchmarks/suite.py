"""The benchmark suite: every method, the peers and the baselines, on every problem, over seeds.

For each problem of ``benchmarks/problems/`` (``pointer_countdown``, ``digits``, ``ucr``,
``many_tasks``) and each seed, trains:

- a constant prediction (``constant``: no training; a run in which a task ends worse than it and
  than the task alone counts as diverged), which also records each task's gradient norm at the
  trunk's parameters at the seed's initialization;
- each task alone (the single-task baselines that Δm is measured against);
- a plain ``sum(losses)`` and the static weights a user would try first, tuned: three weight
  vectors (each loss divided by its value at initialization; the sqrt-of-output-size factors;
  the output-size factors), the best on validation kept per seed and labelled ``tuned``;
- every method of the package at its defaults: the loss-level ones on the losses, the
  feature-level ones attached at the model's trunk (``attach(model, "trunk")``);
- TorchJD's aggregators on the trunk's parameters (``mtl_backward`` + ``jac_to_grad``), its own
  implementation, where ``torchjd`` is installed (the ``bench`` extra).

Within a seed every method starts from the same weights and sees the same batches, with the
problem's one budget (``Problem.budget``); nothing is tuned per method. Each run records the
validation metric of each task (lower is better) after every epoch.

Δm of one run = mean over tasks of (metric - metric of the task alone, same seed) / (metric
alone), in %. ``benchmarks/render_suite.py`` turns the results into tables and figures.

The study of the default runs on more problems, with the baselines and the methods it was
chosen against (``CONFIRMATION_METHODS``) and the candidate changes (``VARIANTS``):
``user_regime`` (a development problem) and three problems held out until the default was
chosen (``newcomer_digits``, ``blood_pressure``, ``power_demand``).

The field's own 11-task benchmark, ``qm9`` (``problems/qm9.py``), runs every method like the
four problems above but is not in their mean ranks; it was added after the default was chosen.
``qm9_paper`` is the same problem at the papers' budget, for a GPU.

``many_tasks`` also runs with 10 and 40 tasks (``many_tasks_k10``, ``many_tasks_k40``: the
first tasks of the same 40), with the baselines and a few methods (``SCALING_METHODS``), to show
how quality and step time grow with the number of tasks.

Usage (from the repository root)::

    python benchmarks/suite.py                         # every problem, method and seed 0-4
    python benchmarks/suite.py --problems digits --methods sum dbmtl --seeds 0 1
    python benchmarks/suite.py --reuse                 # only the runs not in the results yet
    python benchmarks/suite.py --smoke                 # every problem and method, a few steps
    python benchmarks/suite.py --speed                 # step time and memory vs a plain sum
    python benchmarks/suite.py --problems many_tasks_k10 many_tasks_k40   # scaling with K
    python benchmarks/suite.py --problems qm9_paper --device cuda --jobs 1  # QM9, papers' budget

Runs go to ``benchmarks/results/<problem>.json`` (``--smoke``: a temporary folder unless
``--out`` is given). ``--jobs`` worker processes (2 by default) run in parallel, one torch thread
each; a progress line per finished run gives the runs done, the time left and the run's Δm.
"""

from __future__ import annotations

import argparse
import datetime
import math
import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# The names the other scripts and the tests read from here.
from harness import (  # noqa: E402
    CONFIRMATION_METHODS,
    CONSTANT,
    EXTRA,
    FIELD,
    HELD_OUT,
    LR_VARIANTS,
    PACKAGE_FEATURES,
    PACKAGE_LOSS,
    PAPER_BUDGETS,
    PROBLEMS,
    RESULTS,
    SCALING,
    SCALING_METHODS,
    SEEDS,
    STATIC,
    TORCHJD,
    VARIANTS,
    Job,
    Trainer,
    batches,
    calibration_line,
    format_seconds,
    head_names,
    init_gradient_norms,
    load_problem,
    load_results,
    machine_info,
    make_trainer,
    methods_of,
    problem_info,
    results_path,
    run,
    save_results,
    start,
    warnings_as_notes,
)
from render_suite import delta_m  # noqa: E402  (torch-free: the tables compute it the same way)

__all__ = [
    "CONFIRMATION_METHODS",
    "CONSTANT",
    "EXTRA",
    "FIELD",
    "HELD_OUT",
    "LR_VARIANTS",
    "PACKAGE_FEATURES",
    "PACKAGE_LOSS",
    "PAPER_BUDGETS",
    "PROBLEMS",
    "RESULTS",
    "SCALING",
    "SCALING_METHODS",
    "SEEDS",
    "STATIC",
    "TORCHJD",
    "VARIANTS",
    "Job",
    "Trainer",
    "batches",
    "calibration_line",
    "delta_m",
    "format_seconds",
    "head_names",
    "init_gradient_norms",
    "load_problem",
    "load_results",
    "machine_info",
    "make_trainer",
    "methods_of",
    "problem_info",
    "results_path",
    "run",
    "save_results",
    "start",
    "warnings_as_notes",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--problems",
        nargs="+",
        default=list(PROBLEMS),
        choices=[*PROBLEMS, *SCALING, *EXTRA, *HELD_OUT, *FIELD, *PAPER_BUDGETS],
    )
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--reuse", action="store_true", help="skip runs already in the results")
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything (CI)")
    parser.add_argument("--speed", action="store_true", help="step time and memory instead")
    parser.add_argument(
        "--device",
        default="cpu",
        help="where each run trains (e.g. cuda for qm9_paper; the committed results: cpu)",
    )
    args = parser.parse_args(argv)
    if args.speed:
        import suite_speed

        return suite_speed.main(args)
    out = args.out or (Path(tempfile.mkdtemp()) if args.smoke else RESULTS)
    seeds = [0] if args.smoke else args.seeds
    jobs: list[Job] = []
    records: dict[str, dict[str, Any]] = {}
    for name in args.problems:
        problem = load_problem(name)
        line = calibration_line(name, args.smoke)
        if line:
            print(line, flush=True)
        record = load_results(results_path(out, name)) if args.reuse else {"runs": [], "calls": []}
        records[name] = record
        record["problem"] = problem_info(problem)
        done = {(r["method"], r["seed"]) for r in record["runs"]}
        wanted = args.methods or methods_of(problem)
        # Any method of the package may run on any problem when named.
        package = {*PACKAGE_LOSS, *PACKAGE_FEATURES}
        unknown = sorted(
            set(wanted) - set(methods_of(problem)) - {*VARIANTS, *LR_VARIANTS, *package}
        )
        if unknown:
            parser.error(f"unknown method(s) {unknown} for `{name}`")
        # Baselines first: a run's Δm needs them.
        named = [*methods_of(problem), *sorted(package), *VARIANTS, *LR_VARIANTS]
        ordered = [m for m in dict.fromkeys(named) if m in wanted]
        jobs += [
            Job(name, m, s, args.smoke, args.device)
            for s in seeds
            for m in ordered
            if (m, s) not in done
        ]
    print(f"{len(jobs)} runs, {args.jobs} at a time, 1 torch thread each", flush=True)
    started = time.perf_counter()
    finished: list[dict[str, Any]] = []

    def report(result: dict[str, Any]) -> None:
        finished.append(result)
        record = records[result["problem"]]
        record["runs"] = [
            r
            for r in record["runs"]
            if (r["method"], r["seed"]) != (result["method"], result["seed"])
        ] + [result]
        alone = {
            r["method"].split(":", 1)[1]: r["metrics"][r["method"].split(":", 1)[1]]
            for r in record["runs"]
            if r["method"].startswith("alone:") and r["seed"] == result["seed"]
        }
        dm = ""
        if set(alone) == set(result["metrics"]) and not result["method"].startswith("alone:"):
            floors = record["problem"].get("metric_floor", {})
            dm = f"  Δm {delta_m(result['metrics'], alone, floors):+.1f} %"
        elapsed = time.perf_counter() - started
        left = elapsed / len(finished) * (len(jobs) - len(finished))
        print(
            f"[{len(finished)}/{len(jobs)}] {format_seconds(elapsed)} elapsed, "
            f"ETA {format_seconds(left)}  {result['problem']} {result['method']} "
            f"seed {result['seed']}{dm}",
            flush=True,
        )
        save_results(results_path(out, result["problem"]), record)

    if args.jobs <= 1:
        for job in jobs:
            report(run(job))
    else:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
            futures = [pool.submit(run, job) for job in jobs]
            for future in as_completed(futures):
                report(future.result())
    call = {
        "command": " ".join(["python", "benchmarks/suite.py", *(argv or sys.argv[1:])]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "runs": len(jobs),
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": sum(r["seconds"] for r in finished),
        "jobs": args.jobs,
        "machine": machine_info(),
    }
    for name, record in records.items():
        record["calls"].append(call)
        save_results(results_path(out, name), record)
    print(f"done: {len(jobs)} runs in {format_seconds(time.perf_counter() - started)}; {out}")
    bad = [r for r in finished if not all(math.isfinite(v) for v in r["metrics"].values())]
    for r in bad:
        print(f"non-finite metric: {r['problem']} {r['method']} seed {r['seed']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
