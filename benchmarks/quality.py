"""Training quality of every method on the pointer/countdown problem, over several seeds.

Trains the demo model of ``examples/pointer_countdown.py`` (same data generator, model,
optimizer and budget: Adam lr 1e-3, batch 32, 2048 training samples, 20 epochs) under each
method of the registry in ``examples/_pointer_countdown_lib.py``, plus each task alone
(single-task baselines), for every seed. Within a seed every method starts from the same
weights and sees the same batches.

Writes ``<out>/quality_runs.json``, the single source of every quality figure: every run (MAEs,
gradient ratios, curves, wall time, machine) and every call that added runs (command, date,
wall time, machine and load). From it, ``benchmarks/render.py`` renders ``<out>/quality.md``
(per-task validation MAE in bars, mean +- std over seeds, and delta_m against single-task
training) and the tables of the README and the docs; this script also draws
``<out>/quality.png``. delta_m of one seed is
mean over tasks of (MAE_k - MAE_k(task k alone)) / MAE_k(task k alone), in %, against the
single-task runs of the *same* seed; the table gives its mean and std over seeds.

Usage (from the repository root)::

    python benchmarks/quality.py --seeds 0 1 2 --jobs 2     # full run, ~10 min per method
    python benchmarks/quality.py --reuse                    # only runs missing from the JSON
    python benchmarks/quality.py --smoke                    # seconds, for CI

Every run uses one torch thread; ``--jobs`` worker processes (2 by default: the benchmark
targets a 2-core machine) run in parallel; ``--jobs 1`` runs in this process. Nothing here is
tuned to any method: the budget and hyperparameters are the user's.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import multiprocessing
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import _pointer_countdown_lib as lib
import render

BASELINES = {"pointer": "pointer-alone", "countdown": "countdown-alone"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=None, metavar="NAME")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--reuse", action="store_true", help="keep runs already in quality_runs.json"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny runs, for CI")
    return parser.parse_args(argv)


def _worker_init() -> None:
    import torch

    torch.set_num_threads(1)


def _run(job: dict[str, Any]) -> dict[str, Any]:
    result = lib.train(
        job["method"],
        seed=job["seed"],
        epochs=job["epochs"],
        n_train=job["n_train"],
        n_val=job["n_val"],
        max_steps=job["max_steps"],
        probe_size=job["probe_size"],
    )
    out = lib.result_to_dict(result)
    out["epochs"] = job["epochs"]
    out["smoke"] = job["smoke"]
    out["machine"] = lib.machine_info()
    return out


def plot(rows: list[dict], runs: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(max(15.0, 0.9 * len(rows)), 4.5))
    names = [row["method"] for row in rows]
    xs = range(len(names))
    for ax, task in zip(axes[:2], lib.TASKS, strict=False):
        for x, row in zip(xs, rows, strict=True):
            values = row["mae"][task]
            if values:
                ax.bar(x, statistics.fmean(values), color="C0", alpha=0.5)
                ax.plot([x] * len(values), values, "k.", ms=5)
        ax.set_title(f"{task} validation MAE (bars), seeds as dots", fontsize=10)
        ax.set_yscale("log")
    for x, row in zip(xs, rows, strict=True):
        if row["delta"]:
            mean = statistics.fmean(row["delta"])
            ax = axes[2]
            ax.bar(x, mean, color="C2" if mean <= 0 else "C3", alpha=0.6)
            ax.plot([x] * len(row["delta"]), row["delta"], "k.", ms=5)
    axes[2].axhline(0.0, color="black", lw=0.8)
    axes[2].set_yscale("symlog", linthresh=10)
    axes[2].set_title("delta_m vs single-task (%), seeds as dots", fontsize=10)
    for ax in axes:
        ax.set_xticks(list(xs), names, rotation=40, ha="right", fontsize=8)
        ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def load_record(path: Path) -> dict[str, Any]:
    """The results file, or an empty one: ``{"calls": [...], "runs": [...]}``."""
    if not path.exists():
        return {"script": "benchmarks/quality.py", "calls": [], "runs": []}
    record: dict[str, Any] = json.loads(path.read_text())
    return record


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    names = args.methods
    if names is not None:
        names = list(dict.fromkeys([*BASELINES.values(), *names]))
    methods = lib.resolve_methods(names, baselines=True)
    epochs = 1 if args.smoke else args.epochs
    seeds = args.seeds[:1] if args.smoke else args.seeds
    job_base = {
        "epochs": epochs,
        "n_train": 128 if args.smoke else 2048,
        "n_val": 32 if args.smoke else 512,
        "max_steps": 2 if args.smoke else None,
        "probe_size": 8 if args.smoke else 128,
        "smoke": args.smoke,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    runs_path = args.out / ("quality_smoke_runs.json" if args.smoke else "quality_runs.json")
    record = load_record(runs_path)
    if not args.reuse:
        record["calls"], record["runs"] = [], []
    record["smoke"] = args.smoke
    previous = [r for r in record["runs"] if r["epochs"] == epochs and r["smoke"] == args.smoke]
    record["runs"] = previous
    done = {(r["method"], r["seed"]) for r in previous}
    jobs = [
        {"method": m, "seed": s, **job_base} for s in seeds for m in methods if (m, s) not in done
    ]
    print(f"{len(jobs)} runs ({len(done)} reused) on {args.jobs} worker(s)", flush=True)
    started = time.perf_counter()
    call = {
        "command": " ".join(["python", "benchmarks/quality.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jobs": args.jobs,
        "new_runs": 0,
        "wall_seconds": 0.0,
        "machine": lib.machine_info(),
    }
    record["calls"].append(call)
    runs = record["runs"]
    # spawn: a fresh interpreter per worker, so no OpenMP state is inherited from the parent.
    context = multiprocessing.get_context("spawn")
    pool = None
    if args.jobs > 1:
        pool = ProcessPoolExecutor(
            max_workers=args.jobs, mp_context=context, initializer=_worker_init
        )
    else:
        _worker_init()
    with pool if pool is not None else contextlib.nullcontext():
        for run in pool.map(_run, jobs) if pool is not None else map(_run, jobs):
            mae = run["val_mae"]
            print(
                f"  {run['method']:>18} seed {run['seed']}: pointer {mae['pointer']:6.2f}, "
                f"countdown {mae['countdown']:6.2f} ({run['seconds']:.0f} s)",
                flush=True,
            )
            runs.append(run)
            call["new_runs"] += 1
            call["wall_seconds"] = time.perf_counter() - started
            # Written after every run, so an interrupted call keeps what it measured.
            runs_path.write_text(json.dumps(record, indent=1) + "\n")
    call["wall_seconds"] = time.perf_counter() - started
    call["machine"] = lib.machine_info()  # the load average at the end
    runs_path.write_text(json.dumps(record, indent=1) + "\n")
    summary = render.quality_summary(runs)
    # Every method of the file, not only this call's: a `--methods --reuse` call redraws all.
    rows = [{"method": m, **row} for m, row in summary.items()]
    all_seeds = sorted({r["seed"] for r in runs})
    md_path = args.out / ("quality_smoke.md" if args.smoke else "quality.md")
    md_path.write_text(render.quality_markdown(record, source=render.relative(runs_path)))
    png_path = md_path.with_suffix(".png")
    plot(rows, runs, png_path, title=f"pointer/countdown, {epochs} epochs, seeds {all_seeds}")
    print(md_path.read_text())
    print(f"wrote {runs_path}, {md_path}, {png_path}")
    if not args.smoke:
        print("README and docs tables: python benchmarks/render.py")
    bad = [r["method"] for r in runs if not all(math.isfinite(v) for v in r["val_mae"].values())]
    if bad:
        print(f"non-finite validation MAE for {sorted(set(bad))}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
