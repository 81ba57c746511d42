"""Render every published table and figure of the README and the docs from the results JSON.

The numbers in ``README.md``, ``docs/*.md`` and ``benchmarks/results/*.md`` are never typed by
hand: each sits in a generated block, between

    <!-- generated: NAME (source: PATH.json; regenerate: python benchmarks/render.py) -->
    <!-- end generated: NAME -->

and this script rewrites every block from the JSON that the measuring script wrote:

- ``benchmarks/results/quality_runs.json``: ``benchmarks/quality.py`` (training quality);
- ``benchmarks/results/speed.json``: ``benchmarks/speed.py`` (step time and memory);
- ``benchmarks/results/aggregators_speed.json``: ``benchmarks/aggregators_speed.py`` (step time
  and memory of the aggregators, ours and TorchJD's);
- ``benchmarks/results/init_gradients.json``: ``benchmarks/init_gradients.py`` (gradients at
  initialization);
- ``examples/results/pointer_countdown.json``: ``examples/pointer_countdown.py`` (the demo).

Usage (from the repository root; needs only the standard library)::

    python benchmarks/render.py            # rewrite the blocks and benchmarks/results/*.md
    python benchmarks/render.py --check    # exit 1, listing what differs, if anything would change

``tests/test_generated_docs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# ruff: noqa: RUF001  (the rendered text uses the multiplication and plus-minus signs)

ROOT = Path(__file__).resolve().parents[1]

QUALITY = "benchmarks/results/quality_runs.json"
SPEED = "benchmarks/results/speed.json"
AGGREGATORS_SPEED = "benchmarks/results/aggregators_speed.json"
INIT = "benchmarks/results/init_gradients.json"
DEMO = "examples/results/pointer_countdown.json"

TASKS = ("pointer", "countdown")
BASELINES = {"pointer": "pointer-alone", "countdown": "countdown-alone"}
#: Method names of ``examples/_pointer_countdown_lib.py``, in table order, with their labels.
LABELS = {
    "sum": "plain sum",
    "normalizer": '`LossNormalizer(correction="none")`, weights 0.7/0.1',
    "normalizer-sqrt": '`LossNormalizer(correction="sqrt")`, same weights',
    "uncertainty": "`UncertaintyWeighting`",
    "gradient-balancer": "`GradientBalancer`",
    "gradnorm": "`GradNorm`",
    "dwa": "`DWA`",
    "rlw": "`RLW`",
    "imtll": "`IMTLL`",
    "famo": "`FAMO`",
    "geometric-mean": "`GeometricMean`",
    "dbmtl": '`DBMTL` (log transform + `GradientBalancer(target="max")`)',
    "upgrad": "`UPGrad`",
    "upgrad-balanced": "`UPGrad(balance_norms=True)`",
    "mgda": "`MGDA`",
    "cagrad": "`CAGrad`",
    "imtlg": "`IMTLG`",
    "aligned-mtl": "`AlignedMTL`",
    "nash-mtl": "`NashMTL`",
    "fairgrad": "`FairGrad`",
    "pcgrad": "`PCGrad`",
}
SHORT = {m: (label.split("`")[1] if "`" in label else label) for m, label in LABELS.items()}
SHORT["normalizer"] = 'LossNormalizer(correction="none")'
SHORT["normalizer-sqrt"] = 'LossNormalizer(correction="sqrt")'
#: What each method of the registry is, for the benchmark's own table.
DESCRIPTIONS = {
    "pointer-alone": "pointer loss alone",
    "countdown-alone": "countdown loss alone",
    "sum": "plain sum(losses)",
    "normalizer": "running-mean normalizer, correction none, weights 0.7/0.1, momentum 0.95",
    "normalizer-sqrt": "the same with correction sqrt (times sqrt(output size))",
    "uncertainty": "uncertainty weighting (Kendall), s = 0 at start, trained by the model's Adam",
    "gradient-balancer": "per-task gradients rescaled at the shared features in one backward",
    "gradnorm": "GradNorm (Chen et al. 2018), alpha 1.5, on the encoder's last layer",
    "dwa": "Dynamic Weight Average (Liu et al. 2019), T = 2",
    "rlw": "random loss weighting (Lin et al. 2022)",
    "imtll": "IMTL-L (Liu et al. 2021), scales trained by the model's Adam",
    "famo": "FAMO (Liu et al. 2023), lr 0.025, wd 1e-3",
    "geometric-mean": "geometric mean of losses",
    "dbmtl": "Dual-Balancing MTL (Lin et al. 2023)",
    "upgrad": "UPGrad (Quinton & Rey 2024) at the shared features",
    "upgrad-balanced": "UPGrad on gradients first scaled to the mean EMA norm (balance_norms)",
    "mgda": "MGDA-UB, min-norm point (Sener & Koltun 2018) at the shared features",
    "cagrad": "CAGrad (Liu et al. 2021), c = 0.4, at the shared features",
    "imtlg": "IMTL-G (Liu et al. 2021) at the shared features",
    "aligned-mtl": "Aligned-MTL (Senushkin et al. 2023) at the shared features",
    "nash-mtl": "Nash-MTL (Navon et al. 2022), max_norm 1, at the shared features",
    "fairgrad": "FairGrad (Ban & Ji 2024), alpha 1, at the shared features",
    "pcgrad": "PCGrad (Yu et al. 2020), seeded by the run, at the shared features",
}


# ------------------------------------------------------------------------------------ helpers


def load(rel: str) -> Any:
    return json.loads((ROOT / rel).read_text())


def relative(path: Path) -> str:
    """``path`` relative to the repository root when it is inside it, else as given."""
    try:
        return path.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return path.as_posix()


def mean_std(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def seeds_text(seeds: Sequence[int]) -> str:
    if len(seeds) == 1:
        return str(seeds[0])
    return ", ".join(map(str, seeds[:-1])) + f" and {seeds[-1]}"


def machine_text(machine: dict[str, Any]) -> str:
    """``1 torch thread on a 2-core AMD EPYC, torch 2.13.0+cpu, load average 1.9``."""
    threads = machine["torch_threads"]
    load5 = machine["load_average_1_5_15_min"][1]
    return (
        f"{threads} torch thread{'s' if threads != 1 else ''} on a {machine['cpu_count']}-core "
        f"{machine['cpu']}, torch {machine['torch']}; load average {load5:.1f} over the last "
        "5 minutes of the run, other processes sharing the machine"
    )


def name(method: str) -> str:
    """A method's short name for prose: code-formatted when it is a class."""
    return "a plain sum" if method == "sum" else f"`{SHORT[method]}`"


def names(methods: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    parts = [name(m) for m in methods]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def command_text(record: dict[str, Any]) -> str:
    """The command that wrote ``record``, with the ``OMP_NUM_THREADS`` it ran under if it mattered.

    A record with ``sets_own_threads`` comes from a script that sets torch's thread count itself
    (the demo's ``--threads``), which overrides the variable: the command alone reproduces it.
    Other records, and the demo's from before ``--threads``, keep the prefix they ran with.
    """
    omp = record.get("machine", {}).get("omp_num_threads")
    prefix = f"OMP_NUM_THREADS={omp} " if omp and not record.get("sets_own_threads") else ""
    return prefix + record["command"]


# -------------------------------------------------------------------------------- the results


def quality_runs() -> list[dict[str, Any]]:
    return [r for r in load(QUALITY)["runs"] if not r["smoke"]]


def quality_summary(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: MAEs and delta_m (%) per seed, paired with the same seed's single-task runs.

    delta_m of one seed = mean over tasks of (MAE_k - MAE_k alone) / MAE_k alone.
    """
    by_key = {(r["method"], r["seed"]): r for r in runs}
    seeds = sorted({r["seed"] for r in runs})
    order = [*BASELINES.values(), *LABELS]
    order += sorted({r["method"] for r in runs} - set(order))
    summary: dict[str, dict[str, Any]] = {}
    for method in order:
        mae: dict[str, list[float]] = {t: [] for t in TASKS}
        delta: list[float] = []
        for seed in seeds:
            run = by_key.get((method, seed))
            if run is None:
                continue
            rels = []
            for task in TASKS:
                if method in BASELINES.values() and method != BASELINES[task]:
                    continue  # the other head of a single-task run is untrained
                mae[task].append(run["val_mae"][task])
                base = by_key.get((BASELINES[task], seed))
                if base is not None and method not in BASELINES.values():
                    single = base["val_mae"][task]
                    rels.append((run["val_mae"][task] - single) / single)
            if len(rels) == len(TASKS):
                delta.append(100.0 * statistics.fmean(rels))
        if any(mae.values()):
            summary[method] = {"mae": mae, "delta": delta}
    return summary


def speed_rows(trunk: str = "demo") -> dict[str, dict[str, Any]]:
    for entry in load(SPEED)["trunks"]:
        if entry["name"] == trunk:
            return {row["method"]: row for row in entry["rows"]}
    raise KeyError(f"trunk `{trunk}` not in {SPEED}")


def quality_settings(runs: list[dict[str, Any]]) -> tuple[int, list[int]]:
    epochs = sorted({r["epochs"] for r in runs})
    if len(epochs) != 1:
        raise ValueError(f"{QUALITY} mixes runs of {epochs} epochs")
    return epochs[0], sorted({r["seed"] for r in runs})


# ----------------------------------------------------------------------------------- the blocks


def block_quality_table() -> str:
    runs = quality_runs()
    summary = quality_summary(runs)
    epochs, seeds = quality_settings(runs)
    speed = load(SPEED)
    demo_speed = speed_rows("demo")
    alone = [summary[BASELINES[t]]["mae"][t] for t in TASKS]
    lines = [
        f"Validation MAE in bars after {epochs} epochs, mean ± standard deviation over seeds "
        f"{seeds_text(seeds)}. Step time is the median over {speed['rounds']} interleaved rounds "
        "of the method's step time divided by that of a plain `sum(losses)` in the same round; "
        "peak memory is the step's peak of live tensor bytes, also divided by the plain sum's; "
        f"both on the demo model with {speed['threads']} torch "
        f"thread{'s' if speed['threads'] != 1 else ''}.",
        "",
        "| method | pointer MAE | countdown MAE | Δm (%) | step time / sum | peak memory / sum |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| each task alone | {mean_std(alone[0])} | {mean_std(alone[1])} | 0 | | |",
    ]
    for method, label in LABELS.items():
        if method not in summary:
            continue
        row = summary[method]
        cost = demo_speed.get(method)
        time_ratio = f"{cost['ratio']:.3f}" if cost else "-"
        peak_ratio = f"{cost['peak_ratio']:.2f}" if cost else "-"
        lines.append(
            f"| {label} | {mean_std(row['mae']['pointer'])} | {mean_std(row['mae']['countdown'])} "
            f"| {mean_std(row['delta'], 0)} | {time_ratio} | {peak_ratio} |"
        )
    cpu_seconds = sum(r["seconds"] for r in runs)
    lines += [
        "",
        f"Reproduce with `python benchmarks/quality.py --seeds {' '.join(map(str, seeds))}` "
        f"(the {len(runs)} runs of `{QUALITY}` took {minutes(cpu_seconds)} of CPU time, one "
        "thread each; `--jobs 2`, the default, runs two at a time) and "
        f"`{command_text(speed)}` ({minutes(speed['wall_seconds'])} wall time, "
        f"{machine_text(speed['machine'])}); the full tables, with a wider trunk, are in "
        "`benchmarks/results/`.",
    ]
    return "\n".join(lines)


def _best(summary: dict[str, dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> str:
    methods = [m for m in LABELS if m in summary]
    return min(methods, key=lambda m: key(summary[m]))


def block_quality_verdict() -> str:
    runs = quality_runs()
    summary = quality_summary(runs)
    _, seeds = quality_settings(runs)
    best = {
        "pointer MAE": _best(summary, lambda r: statistics.fmean(r["mae"]["pointer"])),
        "countdown MAE": _best(summary, lambda r: statistics.fmean(r["mae"]["countdown"])),
        "Δm": _best(summary, lambda r: statistics.fmean(r["delta"])),
    }
    leader = best["Δm"]
    demo_cost = speed_rows("demo").get(leader)
    wide_cost = speed_rows("wide").get(leader)
    if len(set(best.values())) == 1:
        first = f"On this problem {name(leader)} has the lowest mean error on both heads and "
        first += "the best mean Δm"
    else:
        parts = [f"lowest mean {what}: {name(m)}" for what, m in best.items() if what != "Δm"]
        first = f"On this problem {name(leader)} has the best mean Δm ({'; '.join(parts)})"
    if demo_cost and wide_cost:
        first += (
            f", at {demo_cost['ratio']:.2f}× the step time of a plain sum on the demo model "
            f"({wide_cost['ratio']:.2f}× with the wider trunk)"
        )
    lead = summary[leader]["delta"]
    bound = statistics.fmean(lead) + (statistics.stdev(lead) if len(lead) > 1 else 0.0)
    close = [
        m
        for m in LABELS
        if m in summary and m != leader and statistics.fmean(summary[m]["delta"]) <= bound
    ]
    lines = [first + "."]
    if close:
        lines.append(
            f"The mean Δm of {names(close)} is within one standard deviation (over the "
            f"{len(seeds)} seeds) of {name(leader)}'s, so measure on your own model "
            "(`balanced_losses.diagnostics`) before you trust a ranking."
        )
    alone = statistics.fmean(summary[BASELINES["countdown"]]["mae"]["countdown"])
    starved = [
        m
        for m in LABELS
        if m in summary and statistics.fmean(summary[m]["mae"]["countdown"]) > 2 * alone
    ]
    if starved:
        lines.append(
            f"With {names(starved)}, the countdown head ends at more than twice the mean error "
            "of the countdown head trained alone."
        )
    return " ".join(lines)


#: The methods a user can reach through the losses alone, and those that need the features.
LOSS_LEVEL = (
    "normalizer",
    "normalizer-sqrt",
    "uncertainty",
    "gradnorm",
    "dwa",
    "rlw",
    "imtll",
    "famo",
    "geometric-mean",
)
FEATURE_LEVEL = (
    "gradient-balancer",
    "dbmtl",
    "upgrad",
    "upgrad-balanced",
    "mgda",
    "cagrad",
    "imtlg",
    "aligned-mtl",
    "nash-mtl",
    "fairgrad",
    "pcgrad",
)


SUITE = (
    "benchmarks/results/pointer_countdown.json",
    "benchmarks/results/digits.json",
    "benchmarks/results/ucr.json",
    "benchmarks/results/many_tasks.json",
)


def _suite() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render_suite

    return render_suite


#: The feature-level method the README's and the docs' code examples use.
EXAMPLE_METHOD = "dbmtl"


@dataclass(frozen=True)
class Recommendation:
    """What the decision path recommends, from the suite's results."""

    records: dict[str, Any]
    rank: dict[str, float]
    best: str
    #: The feature-level methods that no problem shows worse than ``best`` beyond seed noise.
    tied: list[str]
    features: str
    losses: str
    #: Methods ranked above a pick but left out: method -> problems where a plain sum beat it.
    excluded: dict[str, list[str]]
    #: Every ranked method -> the problems where a plain sum beat it beyond seed noise.
    losing: dict[str, list[str]]


def recommendation() -> Recommendation:
    """The decision path's picks, from the suite's results.

    A method that some problem shows worse than a plain sum beyond seed noise is not
    recommended, whatever its mean rank: a user cannot tell in advance whether their problem is
    that one. Among the rest, the best mean rank; the feature-level methods that no problem shows
    worse than that one beyond noise are its equals.
    """
    rs = _suite()
    records = rs.load_all()
    if len(records) != len(SUITE):
        missing = sorted(set(SUITE) - {f"benchmarks/results/{p}.json" for p in records})
        raise FileNotFoundError(f"the decision path needs the suite's results: {missing}")
    rank = rs.mean_ranks(records)
    losing = {
        m: [p for p, r in records.items() if rs.comparison(r, m)[0] == "worse"]
        for m in (*FEATURE_LEVEL, *LOSS_LEVEL)
        if m in rank
    }

    def pick(methods: tuple[str, ...]) -> str:
        ranked = sorted((m for m in methods if m in rank), key=rank.__getitem__)
        return next((m for m in ranked if not losing[m]), ranked[0])

    best = pick(FEATURE_LEVEL)
    tied = [
        m
        for m in FEATURE_LEVEL
        if m in rank
        and not losing[m]
        and all(rs.comparison(r, m, best)[0] != "worse" for r in records.values())
    ]
    # The code examples of the README and the docs use one method; it is the advice while no
    # problem shows it worse than the best (tests/test_generated_docs.py checks that the
    # examples name the method recommended here).
    features = EXAMPLE_METHOD if EXAMPLE_METHOD in tied else best
    losses = pick(LOSS_LEVEL)
    excluded = {
        m: losing[m]
        for picked, level in ((best, FEATURE_LEVEL), (losses, LOSS_LEVEL))
        for m in level
        if m in rank and rank[m] < rank[picked] and losing[m]
    }
    return Recommendation(records, rank, best, tied, features, losses, excluded, losing)


def recommended_feature_method() -> str:
    """The feature-level method the decision path recommends (the class name)."""
    return SHORT[recommendation().features]


def _step_costs() -> dict[str, float]:
    """Each method's largest step-time ratio to a plain sum over the suite's problems."""
    path = ROOT / "benchmarks" / "results" / "suite_speed.json"
    if not path.is_file():
        return {}
    costs: dict[str, float] = {}
    problems = json.loads(path.read_text())["problems"]
    for entry in (problems[p] for p in _suite().PROBLEMS if p in problems):
        for row in entry["rows"]:
            costs[row["method"]] = max(costs.get(row["method"], 0.0), row["ratio"])
    return costs


def _against_sum(records: dict[str, Any], method: str) -> str:
    """Per problem, how ``method`` compares with a plain sum, in words with the figures."""
    rs = _suite()
    parts = []
    for problem, record in records.items():
        verdict, figures = rs.comparison(record, method)
        parts.append(f"{problem} {verdict} ({figures})")
    return "; ".join(parts)


def block_suite_summary() -> str:
    rs = _suite()
    records = rs.load_all()
    speed_path = ROOT / "benchmarks" / "results" / "suite_speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else None
    seeds = sorted({r["seed"] for rec in records.values() for r in rec["runs"] if not r["smoke"]})
    cpu = (
        sum(r["seconds"] for rec in records.values() for r in rec["runs"] if not r["smoke"]) / 3600
    )
    return (
        f"Δm against each task trained alone (%), mean ± standard error over seeds "
        f"{seeds_text(seeds)}, on {len(records)} problems; lower is better. Mean rank: each "
        "method's rank by mean Δm, averaged over the problems. Step time: the median ratio to "
        "a plain sum over interleaved rounds, one torch thread (the range over the problems). "
        f"The runs took {cpu:.1f} h of CPU time; `python benchmarks/suite.py` reproduces them "
        "(`--reuse` keeps what is there), `python benchmarks/render_suite.py` the tables in "
        "`benchmarks/results/` (one per problem, with per-task metrics, the worst seed and "
        "the verdict against a plain sum) and the figures.\n\n" + rs.summary_table(records, speed)
    )


SCALING = (
    "benchmarks/results/many_tasks_k10.json",
    "benchmarks/results/many_tasks.json",
    "benchmarks/results/many_tasks_k40.json",
)


def block_suite_scaling() -> str:
    rs = _suite()
    speed_path = ROOT / "benchmarks" / "results" / "suite_speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else None
    records = rs.load_scaling()
    if not records:
        return rs.scaling_table(records, speed)
    seeds = sorted({r["seed"] for rec in records.values() for r in rec["runs"] if not r["smoke"]})
    return (
        "`many_tasks` with the first K of its 40 tasks (same data, model and budget); Δm "
        f"against each task trained alone (%), mean ± standard error over seeds "
        f"{seeds_text(seeds)}; step time relative to a plain sum at the same K, one torch "
        "thread. `python benchmarks/suite.py --problems many_tasks_k10 many_tasks_k40` and "
        "`python benchmarks/suite.py --speed --problems many_tasks_k10 many_tasks_k40` reproduce "
        "them (K=20 is the suite's `many_tasks`).\n\n" + rs.scaling_table(records, speed)
    )


#: The robustness goal for the recommended method on problem 1: worst seed and mean Δm (%).
GOAL_WORST, GOAL_MEAN = 20.0, 0.0


def block_defaults_study() -> str:
    """The recommended method's defaults varied on problem 1, and whether they meet the goal."""
    rs = _suite()
    r = recommendation()
    record = r.records["pointer_countdown"]
    by_seed = rs.summarize(record)[r.features]["delta"]
    deltas = list(by_seed.values())
    mean, se = rs.mean_se(deltas)
    met = max(deltas) <= GOAL_WORST and mean <= GOAL_MEAN
    variants = " ".join(m for m in rs.STUDY if m not in rs.LABELS)
    return (
        f"On pointer_countdown, over seeds {seeds_text(sorted(by_seed))}; Δm against each task "
        'trained alone (%), mean ± standard error; "against the defaults": the difference of '
        "the means beyond twice its standard error, or within noise. `python benchmarks/suite.py "
        f"--problems pointer_countdown --methods {variants}` reproduces the variants.\n\n"
        + rs.study_table(record)
        + f"\nThe goal for the recommended method, `{SHORT[r.features]}`, is a worst seed at most "
        f"{GOAL_WORST:+.0f} % and a mean at most {GOAL_MEAN:.0f} %: it has "
        f"{mean:+.1f} ± {se:.1f} % and {max(deltas):+.1f} % on its worst seed, so the goal is "
        f"{'met' if met else 'not met'}."
    )


def block_decision_path() -> str:
    """The one recommendation every page shows, decided by the suite's results."""
    r = recommendation()
    rank, n, cost = r.rank, len(r.rank), _step_costs()
    if len(r.tied) > 1:
        why = (
            "The feature-level methods that no problem shows worse than a plain sum, nor worse "
            f"than the best mean rank among those (`{SHORT[r.best]}`, {rank[r.best]:.1f} of "
            f"{n}), beyond seed noise are {', '.join(f'`{SHORT[m]}`' for m in r.tied)}: any of "
            f"them; the examples use `{SHORT[r.features]}` (a step costs "
            f"{cost.get(r.features, math.nan):.2f}× a plain sum's at most)"
        )
    else:
        why = f"It has the best mean rank of the feature-level methods ({rank[r.best]:.1f} of {n})"

    def left_out(level: tuple[str, ...]) -> str:
        gone = [
            f"`{SHORT[m]}` ({rank[m]:.1f}) is worse than a plain sum on {', '.join(r.excluded[m])}"
            for m in level
            if m in r.excluded
        ]
        return f" Ranked higher but left out: {'; '.join(gone)}." if gone else ""

    return "\n".join(
        [
            f"1. **Can your code reach the shared features?** Use `{SHORT[r.features]}`. "
            f"{why}. Against a plain sum, Δm: {_against_sum(r.records, r.features)}. "
            '`weighting.attach(model, "trunk")` balances there without a change to your '
            f"model's `forward`.{left_out(FEATURE_LEVEL)}",
            f"2. **Only the losses?** `{SHORT[r.losses]}` has the best mean rank of the "
            + (
                "loss-level methods, all of which some problem shows worse than a plain sum "
                if r.losing[r.losses]
                else "loss-level methods that no problem shows worse than a plain sum "
            )
            + f"beyond seed noise ({rank[r.losses]:.1f} of {n}); against a plain sum: "
            f"{_against_sum(r.records, r.losses)}.{left_out(LOSS_LEVEL)} Static weights tuned "
            "on validation (the best of three simple vectors; put your own factors in "
            f"`weights=`) against a plain sum: {_against_sum(r.records, 'tuned')}.",
            "3. **Do task gradients point against each other?** (a negative cosine in "
            "`balanced_losses.diagnostics.gradient_report`) `UPGrad` at the shared "
            f"features; against a plain sum: {_against_sum(r.records, 'upgrad')}.",
            "4. **Resuming from a checkpoint of an older release?** Keep the class it was "
            "trained with: every class loads its earlier checkpoints. Switch methods at "
            "the start of a run, not in the middle.",
        ]
    )


def block_demo_table() -> str:
    record = load(DEMO)
    lines = [
        "| method | pointer MAE (bars) | countdown MAE (bars) "
        "| countdown/pointer grad ratio at init | at end |",
        "|---|---:|---:|---:|---:|",
    ]
    for run in record["methods"]:
        label = LABELS.get(run["method"], run["method"])
        lines.append(
            f"| {label} | {run['val_mae']['pointer']:.2f} | {run['val_mae']['countdown']:.2f} "
            f"| {run['ratio_init']:.3g} | {run['ratio_end']:.3g} |"
        )
    lines += [
        "",
        f"`{command_text(record)}`: {record['epochs']} epochs, seed {record['seed']}, "
        f"{minutes(record['wall_seconds'])} in all with {machine_text(record['machine'])}. "
        f"Results: `{DEMO}`.",
    ]
    return "\n".join(lines)


def block_demo_curves() -> str:
    """Per method of the demo: how the countdown head and the gradient ratio moved."""
    record = load(DEMO)
    lines = [
        "| method | countdown MAE at init | after epoch 1 | at the end | first epoch below half "
        "of its init | grad ratio, lowest over epochs 1 to end | highest |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in record["methods"]:
        history = run["history"]
        curve = history["val_countdown"]
        ratios = history["ratio"][1:]
        below = next(
            (int(e) for e, v in zip(history["epoch"], curve, strict=True) if v < curve[0] / 2), None
        )
        lines.append(
            f"| {LABELS.get(run['method'], run['method'])} | {curve[0]:.1f} | {curve[1]:.1f} "
            f"| {curve[-1]:.2f} | {below if below is not None else 'never'} "
            f"| {min(ratios):.3g} | {max(ratios):.3g} |"
        )
    lines += [
        "",
        f"From `{DEMO}` ({record['epochs']} epochs, seed {record['seed']}). Grad ratio: "
        "countdown/pointer ratio of the weighted gradient each task sends into the shared "
        f"encoder, on {record['probe_size']} training samples, after each epoch.",
    ]
    return "\n".join(lines)


def block_init_gradients() -> str:
    record = load(INIT)
    seeds = record["seeds"]

    def cell(get: Callable[[dict[str, Any]], float], fmt: str) -> str:
        values = [get(s) for s in seeds]
        spread = f" ({format(min(values), fmt)} to {format(max(values), fmt)})"
        return format(statistics.fmean(values), fmt) + (spread if len(values) > 1 else "")

    rows = [
        ("pointer loss", lambda s: s["loss"]["pointer"], ".3g"),
        ("countdown loss", lambda s: s["loss"]["countdown"], ".3g"),
        (
            "pointer elements in Huber's linear regime (%)",
            lambda s: 100 * s["linear_share"]["pointer"],
            ".3g",
        ),
        (
            "countdown elements in Huber's linear regime (%)",
            lambda s: 100 * s["linear_share"]["countdown"],
            ".3g",
        ),
        (
            "pointer mean per-element derivative",
            lambda s: s["mean_abs_derivative"]["pointer"],
            ".2f",
        ),
        (
            "countdown mean per-element derivative",
            lambda s: s["mean_abs_derivative"]["countdown"],
            ".2f",
        ),
        (
            "countdown/pointer gradient ratio at the heads' outputs, plain sum",
            lambda s: s["ratio"]["outputs_sum"],
            ".2g",
        ),
        ("... at the shared encoder, plain sum", lambda s: s["ratio"]["encoder_sum"], ".2g"),
        ('... at the outputs, `correction="sqrt"`', lambda s: s["ratio"]["outputs_sqrt"], ".2g"),
        ('... at the encoder, `correction="sqrt"`', lambda s: s["ratio"]["encoder_sqrt"], ".2g"),
        (
            "... at the outputs, each loss divided by its value",
            lambda s: s["ratio"]["outputs_divided_by_value"],
            ".2g",
        ),
        (
            "... at the encoder, each loss divided by its value",
            lambda s: s["ratio"]["encoder_divided_by_value"],
            ".2g",
        ),
    ]
    n = len(seeds)
    lines = [
        f"| at initialization | mean over {n} seeds (lowest to highest) |",
        "| --- | --- |",
    ]
    lines += [f"| {name} | {cell(get, fmt)} |" for name, get, fmt in rows]
    sizes = record["output_sizes"]
    lines += [
        "",
        f"Closed form for equal per-element derivatives: "
        f"$\\sqrt{{{sizes['pointer']}/{sizes['countdown']}}} = "
        f"{record['closed_form_ratio_outputs']:.2f}$. Measured by `{command_text(record)}` on "
        f"the demo's model and data (seeds {seeds_text([s['seed'] for s in seeds])}, the first "
        f"{record['probe_size']} training samples); results in `{INIT}`.",
    ]
    return "\n".join(lines)


def block_normalizer_vs_alone() -> str:
    runs = quality_runs()
    epochs, seeds = quality_settings(runs)
    by_key = {(r["method"], r["seed"]): r for r in runs}
    ratios = [
        by_key[("normalizer", s)]["val_mae"]["countdown"]
        / by_key[("countdown-alone", s)]["val_mae"]["countdown"]
        for s in seeds
        if ("normalizer", s) in by_key and ("countdown-alone", s) in by_key
    ]
    return (
        f'Trained that way for {epochs} epochs (`LossNormalizer(correction="none")` with the '
        f"demo's weights, {len(ratios)} seeds), the countdown head ends at "
        f"{min(ratios):.1f} to {max(ratios):.1f} times the validation MAE of the countdown "
        f"head trained alone (`{QUALITY}`)."
    )


# ------------------------------------------------------------------------- whole-file outputs


def quality_markdown(record: dict[str, Any], *, source: str = QUALITY) -> str:
    runs = [r for r in record["runs"] if r["smoke"] == record.get("smoke", False)]
    summary = quality_summary(runs)
    epochs, seeds = quality_settings(runs)
    lines = [
        _open("quality-md", source),
        "# Training quality on the pointer/countdown problem",
        "",
        f"Rendered by `python benchmarks/render.py` from `{Path(source).name}`, which "
        "`benchmarks/quality.py` writes. Validation MAE in bars after "
        f"{epochs} epochs, mean ± std over seeds {seeds}. delta_m = mean over tasks of "
        "(MAE - single-task MAE) / single-task MAE, paired per seed with the single-task runs "
        "of the same seed; lower is better, <= 0 means the tasks are on average at least as "
        "good as when trained alone.",
        "",
        "| method | pointer MAE | countdown MAE | delta_m (%) | description |",
        "|---|---:|---:|---:|---|",
    ]
    for method, row in summary.items():
        delta = mean_std(row["delta"], 0) if row["delta"] else "-"
        lines.append(
            f"| {method} | {mean_std(row['mae']['pointer'])} | "
            f"{mean_std(row['mae']['countdown'])} | {delta} | {DESCRIPTIONS.get(method, '')} |"
        )
    seconds = [r["seconds"] for r in runs]
    lines += [
        "",
        f"{len(runs)} runs, one torch thread each, {minutes(statistics.fmean(seconds))} per run "
        f"on average ({minutes(sum(seconds))} of CPU time in all). The calls that made them:",
        "",
    ]
    for call in record["calls"]:
        if "converted_from" in call:
            lines.append(
                f"- `{call['command']}`: {call['new_runs']} runs in {call['wall_minutes']} min, "
                f"load average {call['load_average_5_min_at_end']} (5 min) at the end on "
                f"{call['cpu_count']} cores; {call['converted_from']}. {call['note']}"
            )
        else:
            lines.append(
                f"- `{command_text(call)}` ({call['date']}): {call['new_runs']} runs in "
                f"{minutes(call['wall_seconds'])}, {machine_text(call['machine'])}."
            )
    lines += ["", "Per-seed values and curves are in the JSON.", _close("quality-md"), ""]
    return "\n".join(lines)


def speed_markdown(record: dict[str, Any], *, source: str = SPEED) -> str:
    threads = record["threads"]
    lines = [
        _open("speed-md", source),
        "# Per-step cost relative to a plain sum",
        "",
        f"Rendered by `python benchmarks/render.py` from `{Path(source).name}`, which "
        f"`{command_text(record)}` wrote on {record['date']} ({record['rounds']} interleaved "
        f"rounds after {record['warmup']} warmup rounds, batch {record['batch_size']}, "
        f"{threads} torch thread{'s' if threads != 1 else ''}, CPU). "
        "Time ratio: median over rounds of the method's step time divided by the same round's "
        "`sum` step time [interquartile range]. Peak: highest live CPU tensor bytes during one "
        "step above its starting level (torch.profiler); allocated: all bytes allocated in the "
        "step.",
        "",
    ]
    for trunk in record["trunks"]:
        lines += [
            f"## {trunk['name']} (GRU hidden {trunk['gru_hidden']})",
            "",
            "| method | step (ms) | time / sum | peak (MB) | peak / sum | allocated / sum |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in trunk["rows"]:
            q1, q3 = row["iqr"]
            lines.append(
                f"| {row['method']} | {row['ms']:.1f} | {row['ratio']:.3f} [{q1:.3f}, {q3:.3f}] "
                f"| {row['peak'] / 2**20:.1f} | {row['peak_ratio']:.2f} "
                f"| {row['alloc_ratio']:.2f} |"
            )
        lines.append("")
    start = " / ".join(f"{x:.1f}" for x in record["load_average_1_5_15_min_at_start"])
    end = " / ".join(f"{x:.1f}" for x in record["machine"]["load_average_1_5_15_min"])
    machine = record["machine"]
    lines += [
        f"Wall time {record['wall_seconds']:.0f} s on a {machine['cpu_count']}-core "
        f"{machine['cpu']}, torch {machine['torch']}. Load average (1/5/15 min) at the start "
        f"{start}, at the end {end}: other processes shared the machine, which adds noise to "
        "the ratios (wider ranges) but, interleaved, not a bias.",
        _close("speed-md"),
        "",
    ]
    return "\n".join(lines)


def _ratio_cell(value: float, iqr: Sequence[float], digits: int = 3) -> str:
    return f"{value:.{digits}f} [{iqr[0]:.{digits}f}, {iqr[1]:.{digits}f}]"


def aggregators_speed_markdown(record: dict[str, Any], *, source: str = AGGREGATORS_SPEED) -> str:
    threads = record["threads"]
    configs = record["configs"]
    lines = [
        _open("aggregators-speed-md", source),
        "# Aggregators: per-step cost relative to a plain sum, ours and TorchJD's",
        "",
        f"Rendered by `python benchmarks/render.py` from `{Path(source).name}`, which "
        f"`{command_text(record)}` wrote on {record['date']} ({record['rounds']} interleaved "
        f"rounds after {record['warmup']} warmup rounds, batch {record['batch_size']}, "
        f"{record['time_steps']} time steps, {threads} torch thread{'s' if threads != 1 else ''}, "
        f"CPU; balanced_losses {record['balanced_losses']}, TorchJD {record['torchjd']}). "
        "Ours (`balanced_losses.IMTLG`, ...) combine the tasks' gradients at the shared "
        "features inside the one backward pass; TorchJD's (`torchjd.IMTLG`, ...) combine the "
        "rows of the Jacobian with respect to the trunk's parameters (`mtl_backward`, then "
        "`jac_to_grad`). Time ratio: median over rounds of the method's step time divided by the "
        "same round's `sum` step time [interquartile range]. Peak: highest live CPU tensor bytes "
        "during one step above its starting level (torch.profiler). TorchJD / ours: median over "
        "rounds of TorchJD's step time divided by the same round's step time of our aggregator "
        "of the same name (above 1: ours is faster). CAGrad with "
        f"c = {record['cagrad_c']} and FairGrad with alpha = {record['fairgrad_alpha']} in both "
        "libraries, other options at their defaults.",
        "",
    ]
    by_config = {(c["trunk"], c["tasks"]): c for c in configs}
    compared = list(
        dict.fromkeys(
            row["aggregator"] for c in configs for row in c["rows"] if "torchjd_over_ours" in row
        )
    )
    if compared:
        heads = [f"{c['trunk']}, K = {c['tasks']}" for c in configs]
        lines += [
            "## TorchJD's step time / ours",
            "",
            "| aggregator | " + " | ".join(heads) + " |",
            "|---|" + "---:|" * len(heads),
        ]
        for agg in compared:
            cells = []
            for c in configs:
                row = next((r for r in c["rows"] if r["method"] == agg), None)
                ok = row is not None and "torchjd_over_ours" in row
                cells.append(f"{row['torchjd_over_ours']:.2f}" if ok else "-")
            lines.append(f"| {agg} | " + " | ".join(cells) + " |")
        lines.append("")
    over = []
    for (trunk, k), c in by_config.items():
        target = record["targets"].get(str(k))
        if target is None:
            continue
        over += [
            f"{r['method']} ({trunk}, K = {k}: {r['ratio']:.2f})"
            for r in c["rows"]
            if r["family"] == "ours" and r["ratio"] > target
        ]
    targets = ", ".join(f"{v:.2f} for K = {k}" for k, v in record["targets"].items())
    lines += [
        f"Targets for ours, step time / sum: at most {targets}. "
        + (f"Above: {', '.join(over)}." if over else "All of ours are within them."),
        "",
    ]
    for c in configs:
        heads_text = ", ".join(
            f"{h['outputs']}{' per step' if h['per_step'] else ' pooled'} x{h['scale']:g}"
            for h in c["heads"]
        )
        lines += [
            f"## {c['trunk']} trunk (GRU hidden {c['gru_hidden']}), K = {c['tasks']}",
            "",
            f"Heads (outputs, target scale): {heads_text}.",
            "",
            "| method | step (ms) | time / sum | peak (MB) | peak / sum | TorchJD / ours |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for row in c["rows"]:
            vs = (
                _ratio_cell(row["torchjd_over_ours"], row["torchjd_over_ours_iqr"], 2)
                if "torchjd_over_ours" in row
                else ""
            )
            lines.append(
                f"| {row['method']} | {row['ms']:.1f} | {_ratio_cell(row['ratio'], row['iqr'])} "
                f"| {row['peak'] / 2**20:.1f} | {row['peak_ratio']:.2f} | {vs} |"
            )
        lines.append("")
    start = " / ".join(f"{x:.1f}" for x in record["load_average_1_5_15_min_at_start"])
    machine = record["machine"]
    end = " / ".join(f"{x:.1f}" for x in machine["load_average_1_5_15_min"])
    notes = "".join(f" Note: {n}." for n in record["notes"])
    lines += [
        f"Wall time {record['wall_seconds']:.0f} s on a {machine['cpu_count']}-core "
        f"{machine['cpu']}, torch {machine['torch']}. Load average (1/5/15 min) at the start "
        f"{start}, at the end {end}: other processes shared the machine, which adds noise to "
        f"the ratios (wider ranges) but, interleaved, not a bias.{notes}",
        _close("aggregators-speed-md"),
        "",
    ]
    return "\n".join(lines)


def block_aggregators_cost() -> str:
    """Step time and peak memory of each aggregator, ours and TorchJD's, per configuration."""
    record = load(AGGREGATORS_SPEED)
    configs = record["configs"]
    heads = [f"{c['trunk']}, K = {c['tasks']}" for c in configs]
    lines = [
        "Step time / a plain sum's (peak memory / a plain sum's), measured interleaved in one "
        f"process on {machine_text(record['machine'])}, {record['rounds']} rounds; `demo` is the "
        "bidirectional GRU of the pointer/countdown demo (hidden 32), `wide` the same with "
        f"hidden 128. Reproduce with `{command_text(record)}`; every row and the interquartile "
        "ranges are in `benchmarks/results/aggregators_speed.md`.",
        "",
        "| method | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
    ]
    methods = list(dict.fromkeys(r["method"] for c in configs for r in c["rows"]))
    for method in methods:
        cells = []
        for c in configs:
            row = next((r for r in c["rows"] if r["method"] == method), None)
            cells.append("-" if row is None else f"{row['ratio']:.2f} ({row['peak_ratio']:.2f})")
        label = f"`{method}`" if not method.startswith("torchjd") else f"TorchJD `{method[8:]}`"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


SOLVER_TIMING = (
    "benchmarks/results/solver_timing_cpu.json",
    "benchmarks/results/solver_timing_cuda.json",
)


def block_solver_timing() -> str:
    """Milliseconds per call of each aggregator's weight solver, on the CPU and on a GPU."""
    records = [load(path) for path in SOLVER_TIMING]
    lines = [
        "| solver | "
        + " | ".join(f"{r['device']}, K = {k}" for r in records for k in (3, 10))
        + " |",
        "|---|" + "---:|" * (2 * len(records)),
    ]
    solvers = list(dict.fromkeys(row["solver"] for row in records[0]["rows"]))
    for solver in solvers:
        cells = []
        for r in records:
            for k in (3, 10):
                row = next(x for x in r["rows"] if x["solver"] == solver and x["k"] == k)
                cells.append(f"{row['ms']:.2f}")
        lines.append(f"| {solver} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Median milliseconds per call over "
        + " and ".join(f"{r['repeats']} calls ({r['device']}, torch {r['torch']})" for r in records)
        + "; `python benchmarks/solver_timing.py --device cpu` (or `cuda`) writes them.",
    ]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the machinery


@dataclass(frozen=True)
class Block:
    sources: tuple[str, ...]
    render: Callable[[], str]


BLOCKS: dict[str, Block] = {
    "quality-table": Block((QUALITY, SPEED), block_quality_table),
    "quality-verdict": Block((QUALITY, SPEED), block_quality_verdict),
    "decision-path": Block((*SUITE, "benchmarks/results/suite_speed.json"), block_decision_path),
    "suite-summary": Block((*SUITE, "benchmarks/results/suite_speed.json"), block_suite_summary),
    "defaults-study": Block((*SUITE, "benchmarks/results/suite_speed.json"), block_defaults_study),
    "suite-scaling": Block((*SCALING, "benchmarks/results/suite_speed.json"), block_suite_scaling),
    "demo-table": Block((DEMO,), block_demo_table),
    "demo-curves": Block((DEMO,), block_demo_curves),
    "init-gradients": Block((INIT,), block_init_gradients),
    "normalizer-vs-alone": Block((QUALITY,), block_normalizer_vs_alone),
    "aggregators-cost": Block((AGGREGATORS_SPEED,), block_aggregators_cost),
    "solver-timing": Block(SOLVER_TIMING, block_solver_timing),
}
#: Files made whole from one JSON each.
FILES: dict[str, tuple[str, Callable[[], str]]] = {
    "benchmarks/results/quality.md": (QUALITY, lambda: quality_markdown(load(QUALITY))),
    "benchmarks/results/speed.md": (SPEED, lambda: speed_markdown(load(SPEED))),
    "benchmarks/results/aggregators_speed.md": (
        AGGREGATORS_SPEED,
        lambda: aggregators_speed_markdown(load(AGGREGATORS_SPEED)),
    ),
}
#: Files whose generated blocks are rewritten in place.
PAGES = (
    "README.md",
    "docs/index.md",
    "docs/getting-started.md",
    "docs/choosing.md",
    "docs/why.md",
    "docs/production.md",
    "docs/conflicts.md",
    "docs/migrating.md",
)

_BLOCK = re.compile(
    r"<!-- generated: (?P<name>[\w-]+) \(.*?\) -->\n.*?<!-- end generated: (?P=name) -->",
    re.DOTALL,
)


def _open(name: str, sources: str) -> str:
    return (
        f"<!-- generated: {name} (source: {sources}; regenerate: python benchmarks/render.py) -->"
    )


def _close(name: str) -> str:
    return f"<!-- end generated: {name} -->"


def render_page(text: str) -> str:
    """``text`` with every generated block rewritten; unknown block names raise."""

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in BLOCKS:
            raise KeyError(f"unknown generated block `{name}`; expected one of {sorted(BLOCKS)}")
        block = BLOCKS[name]
        # Blank lines around the content: Markdown must not read it as part of the comment.
        return f"{_open(name, ', '.join(block.sources))}\n\n{block.render()}\n\n{_close(name)}"

    return _BLOCK.sub(replace, text)


def expected_outputs() -> dict[str, str]:
    """Every generated file's full expected text, by path relative to the repository root."""
    out = {path: make() for path, (_, make) in FILES.items()}
    for page in PAGES:
        text = (ROOT / page).read_text()
        out[page] = render_page(text)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 on drift")
    args = parser.parse_args(argv)
    stale = []
    for path, text in expected_outputs().items():
        target = ROOT / path
        if not target.exists() or target.read_text() != text:
            stale.append(path)
            if not args.check:
                target.write_text(text)
    if args.check:
        if stale:
            print(f"out of date (run `python benchmarks/render.py`): {', '.join(stale)}")
            return 1
        print("every generated block matches its results JSON")
        return 0
    print(f"rewrote {', '.join(stale)}" if stale else "nothing to rewrite")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
