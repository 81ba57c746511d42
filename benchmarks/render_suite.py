"""Tables and figures of the benchmark suite, from ``benchmarks/results/<problem>.json``.

For each problem: ``benchmarks/results/<problem>.md`` (every method's per-task metric and Δm,
mean ± standard error over seeds, the worst seed's Δm and the rank), a figure of Δm with error
bars (``docs/figures/suite_<problem>.png``) and the training curves of a few methods
(``docs/figures/suite_<problem>_curves.png``); across problems, ``benchmarks/results/suite.md``
(mean rank, Δm per problem, step time). ``benchmarks/render.py`` puts the summary in the README
and the docs. Everything is computed from the JSON files; run after ``benchmarks/suite.py``::

    python benchmarks/render_suite.py          # write the tables and figures
    python benchmarks/render_suite.py --check  # exit 1 if a table is stale (no figures)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import balanced_losses as bl

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FIGURES = ROOT / "docs" / "figures"
PROBLEMS = ("pointer_countdown", "digits", "ucr", "many_tasks")
#: Problems outside the mean ranks that get a table of their own: the development problem of
#: the default study and the held-out problems (``benchmarks/render_default.py``).
OTHER_PROBLEMS = (
    "user_regime",
    "newcomer_digits",
    "blood_pressure",
    "power_demand",
    "gait",
    "vowels",
)
#: The field's benchmarks: every method runs, outside the four problems' mean ranks.
FIELD_PROBLEMS = ("qm9",)
#: The scaling study: ``many_tasks`` with K tasks (``benchmarks/suite.py``'s ``SCALING``).
SCALING = {10: "many_tasks_k10", 20: "many_tasks", 40: "many_tasks_k40"}

# ruff: noqa: RUF001  (the rendered text uses the plus-minus and multiplication signs)

#: How each method is shown; the order of the tables: the baselines, the package's methods
#: (its catalog: loss-level, then feature-level), TorchJD's peers.
LABELS: dict[str, str] = {
    "sum": "plain sum",
    "tuned": "static weights, tuned (best of 3 on validation)",
    **{m.key: m.label for m in bl.catalog.methods("loss")},
    **{m.key: m.label for m in bl.catalog.methods("features")},
    "torchjd-upgrad": "TorchJD `UPGrad` (parameters)",
    "torchjd-mgda": "TorchJD `MGDA` (parameters)",
    "torchjd-pcgrad": "TorchJD `PCGrad` (parameters)",
    "torchjd-imtlg": "TorchJD `IMTLG` (parameters)",
    "torchjd-aligned-mtl": "TorchJD `AlignedMTL` (parameters)",
    "torchjd-cagrad": "TorchJD `CAGrad` (parameters)",
}
STATIC = ("static-initial-loss", "static-sqrt-size", "static-size")
#: Per-step logs of ``benchmarks/failure_modes.py``.
FAILURES = RESULTS / "failure_modes.json"
#: Methods whose curves are drawn.
CURVES = ("sum", "tuned", "dbmtl", "gradient-balancer", "upgrad", "loss-normalizer")


def load(problem: str) -> dict[str, Any] | None:
    path = RESULTS / f"{problem}.json"
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text())
    # A run still in progress has not written its problem's description yet.
    return record if "problem" in record else None


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan
    return mean, se


def delta_m(
    metrics: Mapping[str, float],
    alone: Mapping[str, float],
    floors: Mapping[str, float] | None = None,
) -> float:
    """Mean over tasks of the relative change against each task alone, in %.

    A task alone can score 0 (an error rate of 0 % on the validation set): its change is then
    taken relative to ``floors[task]``, the smallest non-zero value its metric can take (one
    validation sample's error), as it is for any single-task score below that floor.
    """
    floors = floors or {}
    parts = []
    for t in metrics:
        base = max(alone[t], floors.get(t, 0.0))
        if base <= 0:
            raise ValueError(
                f"task `{t}` trained alone scored {alone[t]}: Δm divides by it; give the problem "
                "a `metric_floor` for that task (the smallest non-zero value of its metric)"
            )
        parts.append((metrics[t] - alone[t]) / base)
    return 100.0 * statistics.fmean(parts)


def summarize(record: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per method: per-seed metrics and Δm; ``tuned`` picks, per seed, the best static vector."""
    runs = [r for r in record["runs"] if not r["smoke"]]
    tasks = record["problem"]["tasks"]
    floors = record["problem"].get("metric_floor", {})
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["method"], r["seed"]): r for r in runs}
    alone: dict[int, dict[str, float]] = {}
    for seed in seeds:
        got = {
            t: by[(f"alone:{t}", seed)]["metrics"][t] for t in tasks if (f"alone:{t}", seed) in by
        }
        if len(got) == len(tasks):
            alone[seed] = got
    out: dict[str, dict[str, Any]] = {}
    methods = sorted({r["method"] for r in runs if not r["method"].startswith("alone:")})
    for method in [*LABELS, *(m for m in methods if m not in LABELS)]:
        if method in out or method in STATIC:
            continue
        per_seed: dict[int, dict[str, float]] = {}
        for seed in alone:
            if method == "tuned":
                options = [by[(m, seed)]["metrics"] for m in STATIC if (m, seed) in by]
                if len(options) == len(STATIC):
                    per_seed[seed] = min(options, key=lambda ms: delta_m(ms, alone[seed], floors))
            elif (method, seed) in by:
                per_seed[seed] = by[(method, seed)]["metrics"]
        if per_seed:
            deltas = {s: delta_m(ms, alone[s], floors) for s, ms in per_seed.items()}
            out[method] = {"metrics": per_seed, "delta": deltas}
    return out


def ranks(summary: Mapping[str, Mapping[str, Any]]) -> dict[str, int]:
    order = sorted(summary, key=lambda m: statistics.fmean(summary[m]["delta"].values()))
    return {m: i + 1 for i, m in enumerate(order)}


#: Methods whose cost changes during a run: the speed row of the steps after the calibration
#: (the harness builds it), and the steps the calibration lasts. ``--speed`` measures both.
PHASES = {
    "calibrated-balancer": ("calibrated-balancer-frozen", 100),
    "calibrated-weighting": ("calibrated-weighting-frozen", 100),
}

#: The candidate defaults of ``benchmarks/candidates.py``, shown in the default study only.
CANDIDATE_LABELS = {
    "partial-0.5": "partial equalization, α = 0.5",
    "lift-0.5": "lift only the starved, ρ = 0.5",
    "frozen-100": "calibrate 100 steps, then freeze",
    "params-100": "calibrate 100 steps at the trunk's parameters, then freeze",
    "params-100-sqrt": "the same, each multiplier raised to 1/2",
    "params-20": "the same over 20 steps",
    "every-4": "`CalibratedWeighting(every=4)`",
    "every-10": "`CalibratedWeighting(every=10)`",
    "clamped-4": "equalization clamped to [1/4, 4]",
    "dbmtl-smoothed": "DB-MTL on running-mean losses",
}


def label(method: str) -> str:
    return LABELS.get(method) or CANDIDATE_LABELS.get(method) or f"`{method}`"


#: The robustness study of the recommended method's defaults (problem 1), with what each
#: variant changes.
STUDY = {
    "dbmtl": "`DBMTL()`: the defaults (momentum 0.9, gradient half scaled to the largest norm)",
    "dbmtl-momentum-0": "`DBMTL(momentum=0)`: the current step's norms, no running statistics",
    "dbmtl-momentum-0.99": "`DBMTL(momentum=0.99)`: slower statistics",
    "dbmtl-log-only": "`DBMTL(balance_features=False)`: the log transform alone",
    "gradient-balancer": "`GradientBalancer()`: the gradient half alone, to the mean norm",
    "gradient-balancer-max": '`GradientBalancer(target="max")`: to the largest norm',
    "gradient-balancer-momentum-0.99": "`GradientBalancer(momentum=0.99)`",
    "gradient-balancer-momentum-0": "`GradientBalancer(momentum=0)`",
    "dbmtl-lr-3e-4": "`DBMTL()` at learning rate 3e-4 (the budget's: 1e-3)",
    "dbmtl-lr-3e-3": "`DBMTL()` at learning rate 3e-3",
    "sum": "a plain sum, for comparison",
    "sum-lr-3e-4": "a plain sum at learning rate 3e-4",
    "sum-lr-3e-3": "a plain sum at learning rate 3e-3",
}
#: The variant the others are compared with: the recommended method at its defaults.
STUDY_DEFAULT = "dbmtl"


def study_table(record: dict[str, Any]) -> str:
    """The variants of the study next to the defaults: mean, standard error, worst seed."""
    summary = summarize(record)
    present = [m for m in STUDY if m in summary]
    if not any(m not in LABELS for m in present):  # no variant ran on this problem
        return ""
    lines = [
        "| variant | Δm (%) | worst seed Δm | seeds with Δm > +20 % | against the defaults |",
        "| --- | --- | --- | --- | --- |",
    ]
    for m in present:
        deltas = list(summary[m]["delta"].values())
        d, se = mean_se(deltas)
        over = sum(v > 20 for v in deltas)
        against = "" if m == STUDY_DEFAULT else comparison(record, m, STUDY_DEFAULT)[0]
        lines.append(
            f"| {STUDY[m]} | {d:+.1f} ± {se:.1f} | {max(deltas):+.1f} | {over} of {len(deltas)} "
            f"| {against} |"
        )
    return "\n".join(lines) + "\n"


def problem_table(record: dict[str, Any]) -> str:
    summary = {m: v for m, v in summarize(record).items() if m in LABELS}
    if not summary:
        return "No complete seed yet.\n"
    info = record["problem"]
    tasks = info["tasks"]
    rank = ranks(summary)
    seeds = sorted({s for v in summary.values() for s in v["delta"]})
    shown_tasks = tasks if len(tasks) <= 4 else []
    head = [
        "method",
        *[f"{t}: {info['metrics'][t]}" for t in shown_tasks],
        "Δm (%)",
        "worst seed Δm",
        "rank",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    sum_mean, sum_se = (
        mean_se(list(summary["sum"]["delta"].values()))
        if "sum" in summary
        else (math.nan, math.nan)
    )
    for method in sorted(summary, key=lambda m: rank[m]):
        entry = summary[method]
        cells = [label(method)]
        for t in shown_tasks:
            m, se = mean_se([ms[t] for ms in entry["metrics"].values()])
            cells.append(f"{m:.3g} ± {se:.2g}")
        d, se = mean_se(list(entry["delta"].values()))
        cells += [f"{d:+.1f} ± {se:.1f}", f"{max(entry['delta'].values()):+.1f}", str(rank[method])]
        lines.append("| " + " | ".join(cells) + " |")
    calls = record.get("calls", [])
    budget = info.get("budget", {})
    machine = calls[-1]["machine"] if calls else {}
    # The runs' own times: one call of the suite may have run several problems.
    cpu_minutes = sum(r["seconds"] for r in record["runs"] if not r["smoke"]) / 60
    text = [
        f"**{info['title']}.** {len(tasks)} tasks; Δm against each task trained alone, "
        f"mean ± standard error over seeds {', '.join(map(str, seeds))}; lower is better.",
        f"Budget: Adam, lr {budget.get('lr')}, batch {budget.get('batch_size')}, "
        f"{budget.get('epochs')} epochs. {cpu_minutes:.0f} min of CPU time on "
        f"{machine.get('cpu', '?')}, torch {machine.get('torch', '?')}, one thread per run.",
        "",
        *lines,
    ]
    if not math.isnan(sum_mean):
        text.append("")
        text.append(verdict(summary, sum_mean, sum_se))
        text.append("")
        text.append(tied_with_best(summary))
    archived = sorted((RESULTS / "archive").glob(f"{info['name']}_*.md"))
    if archived:
        links = ", ".join(f"`archive/{path.name}`" for path in archived)
        text += ["", f"Earlier rounds of this problem, at other budgets: {links}."]
    study = study_table(record)
    if study:
        text += ["", "## Defaults of the recommended method, varied", "", study]
    return "\n".join(text) + "\n"


def tied_with_best(summary: Mapping[str, Mapping[str, Any]]) -> str:
    """Which methods' mean Δm is within twice the standard error of the best one's."""
    rank = ranks(summary)
    best = min(rank, key=rank.__getitem__)
    b, b_se = mean_se(list(summary[best]["delta"].values()))
    tied = []
    for method in sorted(summary, key=rank.__getitem__):
        if method == best:
            continue
        m, se = mean_se(list(summary[method]["delta"].values()))
        if abs(m - b) <= 2 * math.hypot(se, b_se):
            tied.append(label(method))
    return (
        f"Within noise of the best, {label(best)}: {', '.join(tied) or 'none'} (their "
        "intervals overlap; the ranks among them are not evidence)."
    )


def verdict(summary: Mapping[str, Mapping[str, Any]], s: float, s_se: float) -> str:
    better, worse = [], []
    for method, entry in summary.items():
        if method == "sum":
            continue
        m, se = mean_se(list(entry["delta"].values()))
        if abs(m - s) > 2 * math.hypot(se, s_se):
            (better if m < s else worse).append(label(method))
    parts = [
        "Beyond seed noise (the difference of the means above twice its standard error): "
        f"better than a plain sum: {', '.join(better) or 'none'}; "
        f"worse: {', '.join(worse) or 'none'}. The others are within noise of a plain sum."
    ]
    return " ".join(parts)


def load_all() -> dict[str, dict[str, Any]]:
    """The results of every problem that has them."""
    return {p: r for p in PROBLEMS if (r := load(p)) is not None}


def comparison(record: dict[str, Any], method: str, against: str = "sum") -> tuple[str, str]:
    """``(verdict, figures)``: how ``method`` compares with ``against`` on one problem.

    The verdict is "better", "worse" (the difference of the mean Δm beyond twice its standard
    error) or "within noise"; the figures give both means and both worst seeds.
    """
    summary = summarize(record)
    ours, theirs = (list(summary[x]["delta"].values()) for x in (method, against))
    m, se = mean_se(ours)
    s, s_se = mean_se(theirs)
    apart = abs(m - s) > 2 * math.hypot(se, s_se)
    verdict = ("better" if m < s else "worse") if apart else "within noise"
    return verdict, (
        f"{m:+.0f} ± {se:.0f} % against {s:+.0f} ± {s_se:.0f} %, worst seed "
        f"{max(ours):+.0f} % against {max(theirs):+.0f} %"
    )


def mean_ranks(records: Mapping[str, dict[str, Any]]) -> dict[str, float]:
    """Each method's rank by mean Δm, averaged over the problems (methods run on all)."""
    summaries = {
        p: {m: v for m, v in summarize(r).items() if m in LABELS} for p, r in records.items()
    }
    all_ranks = {p: ranks(s) for p, s in summaries.items() if s}
    methods = [m for m in LABELS if all(m in r for r in all_ranks.values())]
    return {m: statistics.fmean(r[m] for r in all_ranks.values()) for m in methods}


def summary_table(records: Mapping[str, dict[str, Any]], speed: dict[str, Any] | None) -> str:
    summaries = {
        p: {m: v for m, v in summarize(r).items() if m in LABELS} for p, r in records.items()
    }
    summaries = {p: s for p, s in summaries.items() if s}
    if not summaries:
        return "No results yet.\n"
    all_ranks = {p: ranks(s) for p, s in summaries.items()}
    methods = [m for m in LABELS if all(m in s for s in summaries.values())]
    mean_rank = {m: statistics.fmean(all_ranks[p][m] for p in summaries) for m in methods}
    head = ["method", "mean rank", *[f"Δm {p} (%)" for p in summaries], "step time / sum"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in sorted(methods, key=lambda m: mean_rank[m]):
        cells = [label(m), f"{mean_rank[m]:.1f}"]
        for s in summaries.values():
            d, se = mean_se(list(s[m]["delta"].values()))
            cells.append(f"{d:+.0f} ± {se:.0f}")
        cells.append(step_time(speed, m))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def step_time(speed: dict[str, Any] | None, method: str) -> str:
    if not speed:
        return ""
    wanted = "static-size" if method == "tuned" else method
    ratios = [
        row["ratio"]
        for problem, entry in speed["problems"].items()
        if problem in PROBLEMS
        for row in entry["rows"]
        if row["method"] == wanted
    ]
    if not ratios:
        return ""
    return f"{min(ratios):.2f}–{max(ratios):.2f}" if len(ratios) > 1 else f"{ratios[0]:.2f}"


def load_scaling() -> dict[int, dict[str, Any]]:
    """The scaling study's results by K, when every K has them."""
    records = {k: load(name) for k, name in SCALING.items()}
    return {k: r for k, r in records.items() if r is not None} if all(records.values()) else {}


def scaling_methods(records: Mapping[int, dict[str, Any]]) -> list[str]:
    """The methods run at every K with complete seeds, a plain sum first."""
    summaries = [summarize(r) for r in records.values()]
    common = [m for m in LABELS if all(m in s for s in summaries)]
    return sorted(common, key=lambda m: m != "sum")


def _speed_row(speed: dict[str, Any] | None, problem: str, method: str) -> dict[str, Any] | None:
    entry = (speed or {}).get("problems", {}).get(problem, {})
    return next((row for row in entry.get("rows", []) if row["method"] == method), None)


def scaling_table(records: Mapping[int, dict[str, Any]], speed: dict[str, Any] | None) -> str:
    """Δm and step time of each method of the scaling study at K = 10, 20 and 40 tasks."""
    if not records:
        return "No results of the scaling study yet.\n"
    ks = sorted(records)
    summaries = {k: summarize(records[k]) for k in ks}
    methods = scaling_methods(records)
    head = ["method", *[f"Δm, K={k} (%)" for k in ks], *[f"step / sum, K={k}" for k in ks]]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m in methods:
        cells = [label(m)]
        for k in ks:
            d, se = mean_se(list(summaries[k][m]["delta"].values()))
            cells.append(f"{d:+.1f} ± {se:.1f}")
        for k in ks:
            row = _speed_row(speed, SCALING[k], m)
            cells.append(f"{row['ratio']:.2f}" if row else "")
        lines.append("| " + " | ".join(cells) + " |")
    text = ["\n".join(lines), ""]
    sums = [(k, _speed_row(speed, SCALING[k], "sum")) for k in ks]
    if all(row for _, row in sums):
        text.append(
            "A plain sum's step takes "
            + ", ".join(f"{1000 * row['step_seconds']:.1f} ms at K={k}" for k, row in sums if row)
            + " (median over interleaved rounds, one torch thread)."
        )
    for k in ks:
        better = [
            label(m) for m in methods if m != "sum" and comparison(records[k], m)[0] == "better"
        ]
        text.append(
            f"Better than a plain sum beyond seed noise at K={k}: {', '.join(better) or 'none'}."
        )
    return "\n".join(text) + "\n"


def scaling_figure(records: Mapping[int, dict[str, Any]], speed: dict[str, Any] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ks = sorted(records)
    summaries = {k: summarize(records[k]) for k in ks}
    fig, (quality, cost) = plt.subplots(1, 2, figsize=(10, 3.6))
    for m in scaling_methods(records):
        name = label(m).replace("`", "")
        stats = [mean_se(list(summaries[k][m]["delta"].values())) for k in ks]
        quality.errorbar(
            ks,
            [d for d, _ in stats],
            yerr=[se for _, se in stats],
            marker="o",
            capsize=3,
            label=name,
        )
        rows = [_speed_row(speed, SCALING[k], m) for k in ks]
        if all(rows):
            cost.plot(ks, [row["ratio"] for row in rows if row], marker="o", label=name)
    quality.set_xlabel("number of tasks K")
    quality.set_ylabel("Δm against each task alone (%)")
    quality.set_xticks(ks)
    quality.grid(alpha=0.3)
    cost.set_xlabel("number of tasks K")
    cost.set_ylabel("step time / plain sum's")
    cost.set_xticks(ks)
    cost.grid(alpha=0.3)
    cost.legend(fontsize=7)
    fig.suptitle(
        "many_tasks with K tasks: mean ± standard error over seeds (lower is better)", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(FIGURES / "suite_scaling.png", dpi=80)
    plt.close(fig)


def figures(records: Mapping[str, dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    FIGURES.mkdir(parents=True, exist_ok=True)
    for problem, record in records.items():
        summary = {m: v for m, v in summarize(record).items() if m in LABELS}
        if not summary:
            continue
        order = sorted(summary, key=lambda m: statistics.fmean(summary[m]["delta"].values()))
        means = [mean_se(list(summary[m]["delta"].values())) for m in order]
        fig, ax = plt.subplots(figsize=(10, 0.28 * len(order) + 1.8))
        y = range(len(order))
        ax.barh(
            list(y),
            [m for m, _ in means],
            xerr=[0 if math.isnan(se) else se for _, se in means],
            color=["#999999" if o in ("sum", "tuned") else "#4477aa" for o in order],
        )
        names = [
            "static weights (tuned)" if o == "tuned" else label(o).replace("`", "") for o in order
        ]
        ax.set_yticks(list(y), names, fontsize=8)
        ax.invert_yaxis()
        ax.axvline(0, color="black", lw=0.8)
        ax.set_xlabel(
            "Δm against each task trained alone (%): mean ± standard error over seeds\n"
            "lower is better; grey: a plain sum and tuned static weights"
        )
        ax.set_title(record["problem"]["title"], fontsize=9)
        fig.tight_layout()
        fig.savefig(FIGURES / f"suite_{problem}.png", dpi=80)
        plt.close(fig)
        tasks = record["problem"]["tasks"][:4]
        fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.2), squeeze=False)
        runs = [r for r in record["runs"] if not r["smoke"] and r["seed"] == 0]
        for ax, task in zip(axes[0], tasks, strict=False):
            for r in runs:
                if r["method"] in CURVES or r["method"] == f"alone:{task}":
                    name = "the task alone" if r["method"].startswith("alone:") else r["method"]
                    ax.plot(range(1, len(r["curves"][task]) + 1), r["curves"][task], label=name)
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{task}: {record['problem']['metrics'][task]}")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(
            f"{problem}, seed 0: validation metric per epoch (lower is better)", fontsize=9
        )
        fig.tight_layout()
        fig.savefig(FIGURES / f"suite_{problem}_curves.png", dpi=80)
        plt.close(fig)


# ------------------------------------------------------------------------ the failure logs


def failure_runs(problem: str = "user_regime") -> list[dict[str, Any]]:
    """The per-step logs of ``problem``'s runs (the failing seed of the previous default's)."""
    runs = json.loads(FAILURES.read_text())["runs"] if FAILURES.is_file() else []
    return [r for r in runs if r["problem"] == problem]


def _windows(values: Sequence[float], size: int) -> list[float]:
    return [statistics.fmean(values[i : i + size]) for i in range(0, len(values), size)]


def failure_figure(path: Path) -> None:
    """Per-step logs of the failing seed: losses, multipliers, trunk gradient and update."""
    runs = failure_runs()
    if not runs:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed = failure_seed(runs)
    chosen = [r for r in runs if r["seed"] == seed]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.5))
    for r in chosen:
        log, per = r["log"], r["steps_per_epoch"]
        x = [i / per for i in range(0, len(log["loss"]), per)]
        x = [(i + 0.5) for i in range(len(_windows(log["trunk_grad"], per)))]
        name = label(r["method"]).replace("`", "")
        tasks = r["tasks"]
        sent = [
            [raw * m for raw, m in zip(row_r, row_m, strict=True)]
            for row_r, row_m in zip(log["raw"], log["mult"], strict=True)
        ]
        share = [row[-1] / max(sum(row), 1e-30) for row in sent]
        axes[0][0].plot(x, _windows([row[0] for row in log["loss"]], per), label=name)
        axes[0][1].plot(x, _windows(share, per), label=name)
        axes[1][0].semilogy(x, _windows(log["trunk_grad"], per), label=name)
        axes[1][1].semilogy(x, _windows(log["update"], per), label=name)
    axes[0][0].set_ylabel(f"{tasks[0]} loss (batch mean)")
    axes[0][1].set_ylabel(f"{tasks[-1]}'s share of what reaches the trunk")
    axes[1][0].set_ylabel("gradient norm on the trunk's parameters")
    axes[1][1].set_ylabel("norm of the trunk's update per step")
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{chosen[0]['problem']}, seed {seed}: per-epoch means of per-step logs")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def failure_seed(runs: Sequence[dict[str, Any]]) -> int:
    """The seed on which the previous default ends worst against its own other seeds."""
    dbmtl = [r for r in runs if r["method"] == "dbmtl"]
    if not dbmtl:
        return int(runs[0]["seed"])
    return int(max(dbmtl, key=lambda r: r["metrics"][r["tasks"][-1]])["seed"])


def outputs() -> dict[Path, str]:
    records = {p: r for p in PROBLEMS if (r := load(p)) is not None}
    speed_path = RESULTS / "suite_speed.json"
    speed = json.loads(speed_path.read_text()) if speed_path.is_file() else None
    others = (*OTHER_PROBLEMS, *FIELD_PROBLEMS)
    tabled = {**records, **{p: r for p in others if (r := load(p)) is not None}}
    out = {RESULTS / f"{p}.md": f"# {p}\n\n{problem_table(r)}" for p, r in tabled.items()}
    out[RESULTS / "suite.md"] = (
        "# Benchmark suite: summary\n\nMean rank over the problems (by mean Δm), Δm per problem "
        "(mean ± standard error over seeds) and the step time relative to a plain sum (range "
        "over the problems). Per problem: `benchmarks/results/<problem>.md`.\n\n"
        + summary_table(records, speed)
    )
    scaling = load_scaling()
    if scaling:
        out[RESULTS / "many_tasks_scaling.md"] = (
            "# many_tasks: scaling with the number of tasks\n\n"
            "The first K of the same 40 tasks, the same data, model and budget; Δm against each "
            "task trained alone, mean ± standard error over seeds; step time relative to a plain "
            "sum at the same K.\n\n" + scaling_table(scaling, speed)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    stale = []
    for path, text in outputs().items():
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(text)
    if args.check:
        if stale:
            print(f"stale: {stale}; run python benchmarks/render_suite.py")
            return 1
        return 0
    figures({p: r for p in (*PROBLEMS, *FIELD_PROBLEMS) if (r := load(p)) is not None})
    failure_figure(FIGURES / "suite_failure_modes.png")
    scaling = load_scaling()
    if scaling:
        speed_path = RESULTS / "suite_speed.json"
        scaling_figure(
            scaling, json.loads(speed_path.read_text()) if speed_path.is_file() else None
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
