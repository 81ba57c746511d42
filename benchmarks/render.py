"""Render every published table and figure of the README and the docs from the results JSON.

The numbers in ``README.md``, ``docs/*.md`` and ``benchmarks/results/*.md`` are never typed by
hand: each sits in a generated block, between

    <!-- generated: NAME (source: PATH.json; regenerate: python benchmarks/render.py) -->
    <!-- end generated: NAME -->

and this script rewrites every block from the JSON that the measuring script wrote:

- ``benchmarks/results/<problem>.json`` and ``suite_speed.json``: ``benchmarks/suite.py`` (the
  benchmark suite's training quality, step time and memory);
- ``benchmarks/results/aggregators_speed.json``: ``benchmarks/aggregators_speed.py`` (step time
  and memory of the feature-level methods, ours and TorchJD's);
- ``benchmarks/results/init_gradients.json``: ``benchmarks/init_gradients.py`` (gradients at
  initialization);
- ``examples/results/pointer_countdown.json``: ``examples/pointer_countdown.py`` (the demo).

Usage (from the repository root; the suite's blocks and the labels read ``balanced_losses``)::

    python benchmarks/render.py            # rewrite the blocks and benchmarks/results/*.md
    python benchmarks/render.py --check    # exit 1, listing what differs, if anything would change

``tests/test_generated_docs.py`` runs the check.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import re
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

AGGREGATORS_SPEED = "benchmarks/results/aggregators_speed.json"
INIT = "benchmarks/results/init_gradients.json"
DEMO = "examples/results/pointer_countdown.json"

#: Labels of the demo's own configurations (``examples/_pointer_countdown_lib.py``); the other
#: methods are named as the suite's tables name them (the catalog's labels, ``plain sum``).
DEMO_LABELS = {
    "demo-normalizer-none": '`LossNormalizer(correction="none")`, weights 0.7/0.1',
    "demo-normalizer-sqrt": '`LossNormalizer(correction="sqrt")`, same weights',
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


def label(method: str) -> str:
    """How the demo's tables name a method key."""
    return DEMO_LABELS.get(method) or _suite().label(method)


def command_text(record: dict[str, Any]) -> str:
    """The command that wrote ``record``, with the ``OMP_NUM_THREADS`` it ran under if it mattered.

    A record with ``sets_own_threads`` comes from a script that sets torch's thread count itself
    (the demo's ``--threads``), which overrides the variable: the command alone reproduces it.
    Other records, and the demo's from before ``--threads``, keep the prefix they ran with.
    """
    omp = record.get("machine", {}).get("omp_num_threads")
    prefix = f"OMP_NUM_THREADS={omp} " if omp and not record.get("sets_own_threads") else ""
    return prefix + record["command"]


# ----------------------------------------------------------------------------------- the blocks


SUITE_PROBLEMS = ("pointer_countdown", "digits", "ucr", "many_tasks")
SUITE = tuple(f"benchmarks/results/{p}.json" for p in SUITE_PROBLEMS)


def _suite() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render_suite

    return render_suite


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
        "the verdict against a plain sum) and the figures.\n\n"
        + rs.summary_table(records, speed)
        + "\n"
        + _default().ranked_above_default(
            {**records, **_default().load((*_default().DEVELOPMENT, *_default().HELD_OUT))}
        )
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


def _default() -> Any:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render_default

    return render_default


DEVELOPMENT_SOURCES = tuple(
    f"benchmarks/results/{p}.json" for p in (*SUITE_PROBLEMS, "user_regime")
)
HELD_OUT_SOURCES = tuple(
    f"benchmarks/results/{p}.json"
    for p in ("newcomer_digits", "blood_pressure", "power_demand", "gait", "vowels", "leaves")
)
DEFAULT_SOURCES = (*DEVELOPMENT_SOURCES, *HELD_OUT_SOURCES, "benchmarks/results/suite_speed.json")


def _problem_list(names: Sequence[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def block_default_answer() -> str:
    """The one short answer every page gives: which method, why, when not, how to check."""
    rd = _default()
    records = rd.load((*rd.DEVELOPMENT, *rd.HELD_OUT))
    report = rd.default_report(records)
    checks = report["checks"]
    n, held = len(checks), len(report["held_out"])
    measured = (
        f"{n} problems we measured ({n - held} where it was chosen, {held} held out and run "
        "once after the choice; all but the five of round 1 registered before any method ran "
        "on them)"
    )
    criteria = (
        "not worse than a plain sum beyond seed noise, no seed diverged (a task worse than a "
        "constant prediction and than the task trained alone) and a worst seed no worse than "
        "a plain sum's"
    )
    if not report["failing"]:
        why = f"On each of the {measured} it held: {criteria}."
    else:
        why = (
            f"Of the {measured}, it held on {n - len(report['failing'])}: {criteria}. It did "
            "not on "
            + "; ".join(rd.failing_sentence(records, p) for p in report["failing"])
            + " (Choosing a method, `docs/choosing.md`, shows why and what does better there)."
        )
    why += (
        f" It beat a plain sum beyond noise on {len(report['better'])} of the {n}. "
        + rd.cost_sentence(records)
    )
    return "\n".join(
        [
            f"1. **Use `{rd.DEFAULT_CLASS}` at its defaults.** {why}",
            f"2. **When a plain sum is as good.** {rd.imbalance_sentence(records)}",
            "3. **Check your model in a minute.** Before training, "
            "`bl.diagnostics.gradient_report(losses, model.encoder.parameters())` prints each "
            "task's gradient norm at the shared encoder; compare the largest with the smallest.",
            "4. **Other methods** (gradient aggregators, learned weights, the field's "
            "methods) and every figure behind this answer: Choosing a method "
            "(`docs/choosing.md`).",
        ]
    )


def block_default_study() -> str:
    rd = _default()
    records = rd.load(rd.DEVELOPMENT)
    return (
        "Δm against each task trained alone (%), mean ± standard error over seeds 0-4, the worst "
        "seed, and the seeds that diverged (a task worse than a constant prediction and than "
        "the task trained alone); ✗: not worse than a plain sum beyond seed noise, no diverged "
        "seed and a worst seed no worse than a plain sum's do not all hold. Step / sum: the "
        "largest step-time ratio to a plain sum over the problems of the table (for the "
        "calibrated methods, their calibrating and their frozen steps weighed over each budget), "
        "one torch thread, `python benchmarks/suite.py --speed`. `python "
        "benchmarks/suite.py --problems pointer_countdown digits ucr many_tasks user_regime "
        f"--reuse --methods {' '.join(m for m in rd.STUDY if m != 'tuned')}` reproduces the "
        "runs.\n\n" + rd.study_block(records)
    )


FAILURE_SOURCES = (
    "benchmarks/results/failure_modes.json",
    "benchmarks/results/user_regime.json",
    "benchmarks/results/digits.json",
)


def block_failure_modes() -> str:
    rd, rs = _default(), _suite()
    runs = rs.failure_runs()
    seeds = " ".join(str(s) for s in sorted({r["seed"] for r in runs}, reverse=True)) or "0"
    return (
        rd.failure_text()
        + f"\n\n`python benchmarks/failure_modes.py --problem user_regime --seeds {seeds} "
        "--methods sum dbmtl dbmtl-smoothed gradient-balancer gradient-balancer-max "
        "calibrated-balancer` "
        "reproduces the logs (`benchmarks/results/failure_modes.json`); `python "
        "benchmarks/render_suite.py` draws the figure."
    )


def block_held_out() -> str:
    rd = _default()
    records = rd.load(rd.HELD_OUT)
    if not records:
        return "Not run yet.\n"
    return (
        "The same columns, on the problems held out (each committed before any method ran on "
        f"it). `python benchmarks/suite.py --problems {' '.join(rd.HELD_OUT)}` reproduces "
        "them.\n\n"
        + rd.study_block(records)
        + rd.floor_sentence(records)
        + "\n\n"
        + rd.feature_layout_sentence()
    )


def block_method_list() -> str:
    """Every method of the package by family, from its catalog (nothing typed by hand)."""

    def names(level: str) -> str:
        found = [f"`{m.name}`" for m in _catalog().methods(level) if not m.options]
        return ", ".join(found[:-1]) + " and " + found[-1]

    return (
        f"Every feature-level method takes the same lines: {names('features')}, each computed "
        "from the tasks' gradients at the features in the same single backward pass "
        "(`docs/conflicts.md`). The loss-level methods need only the losses: "
        f"{names('loss')} replace the sum in the same way "
        "(`bl.catalog.methods()` lists them all, and builds any of them by key)."
    )


def block_round_two() -> str:
    rd = _default()
    return rd.round_two_text(rd.load((*rd.DEVELOPMENT, *rd.HELD_OUT)))


def block_round_three() -> str:
    rd = _default()
    return rd.round_three_text(
        rd.load(tuple(p for p in (*rd.DEVELOPMENT, *rd.HELD_OUT) if p not in rd.ROUND_4))
    )


def block_round_four() -> str:
    rd = _default()
    return rd.round_four_text(rd.load((*rd.DEVELOPMENT, *rd.HELD_OUT)))


def block_demo_table() -> str:
    record = load(DEMO)
    lines = [
        "| method | pointer MAE (bars) | countdown MAE (bars) "
        "| countdown/pointer grad ratio at init | at end |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {label(run['method'])} | {run['val_mae']['pointer']:.2f} "
        f"| {run['val_mae']['countdown']:.2f} | {run['ratio_init']:.3g} | {run['ratio_end']:.3g} |"
        for run in record["methods"]
    ]
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
            f"| {label(run['method'])} | {curve[0]:.1f} | {curve[1]:.1f} "
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


#: The suite's problem on the demo's own generator, model and losses.
USER_REGIME = "benchmarks/results/user_regime.json"


def block_normalizer_vs_alone() -> str:
    """What the package's running-mean normalizer did to the countdown head, over the seeds.

    From the suite's ``user_regime`` runs: the countdown head's validation MAE against the same
    seed's countdown head trained alone, Δm against a plain sum's, and the diverged seeds.
    """
    rd, rs = _default(), _suite()
    method = "loss-normalizer"
    record = load(USER_REGIME)
    alone = rd.alone_metrics(record)
    metrics = rs.summarize(record)[method]["metrics"]
    ratios = {s: m["countdown"] / alone[s]["countdown"] for s, m in sorted(metrics.items())}
    worse = [s for s, r in ratios.items() if r > 1]
    verdict, figures = rs.comparison(record, method)
    diverged = rd.diverged_seeds(record, method)
    cls = _catalog().get(method).cls
    correction = inspect.signature(cls).parameters["correction"].default
    budget = record["problem"]["budget"]
    text = (
        f"On the benchmark suite's `user_regime` problem, the demo's generator, model and losses "
        f"({budget['epochs']} epochs, seeds {seeds_text(sorted(ratios))}), `{cls.__name__}` at "
        f'its defaults (`correction="{correction}"`, each loss divided by its running mean) '
        f"ended the countdown head at {min(ratios.values()):.2f} to "
        f"{max(ratios.values()):.1f} times the validation MAE of the countdown head trained "
        f"alone with the same seed: worse than alone in {len(worse)} of {len(ratios)} seeds"
        + (f" ({seeds_text(worse)})" if worse else "")
        + ". Δm against each task trained alone, the normalizer's against a plain sum's: "
        + figures
        + (
            f"; {verdict} than a plain sum beyond seed noise."
            if verdict != "within noise"
            else "; the difference is within seed noise."
        )
    )
    if diverged:
        text += (
            f" In seed{'s' * (len(diverged) > 1)} {seeds_text(diverged)} a task ended worse "
            "than a constant prediction and than that task trained alone."
        )
    return (
        text + f" From `{USER_REGIME}`; `python benchmarks/suite.py --problems user_regime` "
        "reproduces the runs."
    )


def _catalog() -> Any:
    """``balanced_losses.catalog``, imported when a block needs it."""
    import balanced_losses.catalog

    return balanced_losses.catalog


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
    """Milliseconds per call of each aggregator's weight solver (ours and TorchJD's), per device.

    Rows written before TorchJD's were timed have no ``impl``: they are ours. A K or a solver a
    record did not time shows as ``-``.
    """
    records = [load(path) for path in SOLVER_TIMING]
    ks = sorted({row["k"] for r in records for row in r["rows"]})
    cell = {
        (i, row["solver"], row.get("impl", "ours"), row["k"]): row["ms"]
        for i, r in enumerate(records)
        for row in r["rows"]
    }
    lines = [
        "| solver | " + " | ".join(f"{r['device']}, K = {k}" for r in records for k in ks) + " |",
        "|---|" + "---:|" * (len(ks) * len(records)),
    ]
    solvers = list(dict.fromkeys(row["solver"] for r in records for row in r["rows"]))
    for solver in solvers:
        for impl in ("ours", "torchjd"):
            cells = [
                "-" if (i, solver, impl, k) not in cell else f"{cell[i, solver, impl, k]:.2f}"
                for i in range(len(records))
                for k in ks
            ]
            if all(c == "-" for c in cells):
                continue
            label = solver if impl == "ours" else f"TorchJD `{solver}Weighting`"
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Median milliseconds per call over "
        + " and ".join(f"{r['repeats']} calls ({r['device']}, torch {r['torch']})" for r in records)
        + "; `python benchmarks/solver_timing.py --device cpu` (or `cuda`) writes them.",
    ]
    return "\n".join(lines)


SOLVER_OPS = "benchmarks/results/solver_ops.json"


def _listed(names: list[str]) -> str:
    """``a``, ``b`` and ``c``, each in backticks."""
    quoted = [f"`{name}`" for name in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]


def block_solver_ops() -> str:
    """Aten ops one solve dispatches on the accelerator path, per aggregator and K."""
    record = load(SOLVER_OPS)
    rows = record["rows"]
    goal, goal_k = record["goal"]["top_level_ops"], record["goal"]["k"]
    ks = sorted({row["k"] for row in rows})
    aggregators = list(dict.fromkeys(row["aggregator"] for row in rows))
    cell = {(row["aggregator"], row["k"]): row for row in rows}
    lines = [
        "| aggregator | " + " | ".join(f"K = {k}" for k in ks) + " |",
        "|---|" + "---:|" * len(ks),
    ]
    for agg in aggregators:
        cells = [f"{cell[agg, k]['top_level_ops']} ({cell[agg, k]['ops']})" for k in ks]
        lines.append(f"| `{agg}` | " + " | ".join(cells) + " |")
    over = [
        agg
        for agg in aggregators
        if any(cell[agg, k]["top_level_ops"] > goal for k in ks if k <= goal_k)
    ]
    worst = {agg: max(cell[agg, k]["top_level_ops"] for k in ks if k <= goal_k) for agg in over}
    within = [agg for agg in aggregators if agg not in over]
    goal_text = f"the goal of at most {goal} top-level operations at K ≤ {goal_k}"
    if not over:
        verdict = f"Every aggregator meets {goal_text}."
    elif not within:
        verdict = f"Every aggregator exceeds {goal_text}"
    else:
        verdict = f"{_listed(within)} meet{'s' * (len(within) == 1)} {goal_text}; {_listed(over)}"
        verdict += f" exceed{'s' * (len(over) == 1)} it"
    if over:
        verdict += " (the most there: " + ", ".join(f"`{a}` {worst[a]}" for a in over) + ")."
    lines += [
        "",
        "Top-level aten operations of one call (all aten operations, nested ones included, in"
        f" brackets), counted by `torch.profiler` on the CPU with host shortcuts off (torch"
        f" {record['torch']}); `{record['command']}` writes them. {verdict}",
    ]
    return "\n".join(lines)


END_TO_END = "benchmarks/results/end_to_end_cpu.json"
_MODEL_TITLES = {"nyuv2": "NYUv2 shape", "celeba": "CelebA shape", "gru": "demo GRU"}


def block_end_to_end() -> str:
    """Whole training steps of three models, each method against a plain sum, and memory."""
    record = load(END_TO_END)
    configs = record["configs"]
    heads = [
        f"{_MODEL_TITLES[c['model']]}, K = {c['shape']['tasks']}"
        + f" ({'x'.join(str(n) for n in c['shape']['input'])})"
        for c in configs
    ]
    lines = [
        "| method | " + " | ".join(heads) + " |",
        "|---|" + "---:|" * len(heads),
    ]
    methods = list(dict.fromkeys(r["method"] for c in configs for r in c["rows"]))
    for method in methods:
        cells = []
        for c in configs:
            row = next((r for r in c["rows"] if r["method"] == method), None)
            cells.append("-" if row is None else f"{row['ratio']:.2f} ({row['peak_ratio']:.2f})")
        label = f"TorchJD `{method[8:]}`" if method.startswith("torchjd.") else f"`{method}`"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Step time as a ratio to a plain sum's (median over {record['rounds']} interleaved"
        f" rounds after {record['warmup']} warm-up rounds) and, in brackets, peak memory above"
        f" the step's start as a ratio to the sum's; {record['device']}, {record['threads']}"
        f" threads, torch {record['torch']}, TorchJD {record['torchjd']},"
        f" {record['configs'][0]['size']} sizes, random inputs and targets of the models'"
        f" shapes. `{command_text(record)}` writes them.",
    ]
    return "\n".join(lines)


QM9 = "benchmarks/results/qm9.json"
QM9_PUBLISHED = "benchmarks/results/qm9_published.json"


def _spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long lists without ties."""
    rx = {i: r for r, i in enumerate(sorted(range(len(xs)), key=xs.__getitem__))}
    ry = {i: r for r, i in enumerate(sorted(range(len(ys)), key=ys.__getitem__))}
    n = len(xs)
    d2 = sum((rx[i] - ry[i]) ** 2 for i in range(n))
    return 1.0 - 6.0 * d2 / (n * (n * n - 1))


def _qm9() -> tuple[dict[str, Any], dict[str, dict[str, Any]], dict[str, int], dict[str, Any]]:
    """The QM9 record, its per-method summary, the ranks and the published table."""
    rs = _suite()
    record = load(QM9)
    summary = {m: v for m, v in rs.summarize(record).items() if m in rs.LABELS}
    return record, summary, rs.ranks(summary), load(QM9_PUBLISHED)


def block_qm9_table() -> str:
    """Every method's Δm on QM9 at the CPU budget, next to the papers' published Δm."""
    rs = _suite()
    record, summary, rank, published = _qm9()
    info = record["problem"]
    theirs = {row["method"]: row for row in published["rows"]}
    seeds = sorted({s for v in summary.values() for s in v["delta"]})
    lines = [
        "| method | Δm (%), this budget | worst seed | rank | published Δm (%) |",
        "|---|---:|---:|---:|---:|",
    ]
    for method in sorted(summary, key=rank.__getitem__):
        d, se = rs.mean_se(list(summary[method]["delta"].values()))
        worst = max(summary[method]["delta"].values())
        paper = theirs.get(method)
        cells = [
            rs.label(method),
            f"{d:+.1f} ± {se:.1f}",
            f"{worst:+.1f}",
            str(rank[method]),
            "-" if paper is None else f"{paper['delta_m']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    common = [m for m in theirs if m in summary]
    ours = [statistics.fmean(summary[m]["delta"].values()) for m in common]
    rho = _spearman(ours, [theirs[m]["delta_m"] for m in common]) if len(common) > 2 else math.nan
    budget = info["budget"]
    cpu = sum(r["seconds"] for r in record["runs"] if not r["smoke"]) / 3600
    default = _default().DEFAULT
    d, se = rs.mean_se(list(summary[default]["delta"].values())) if default in summary else (0, 0)
    s_mean, s_se = rs.mean_se(list(summary["sum"]["delta"].values()))
    return "\n".join(
        [
            f"**{info['title']}.** Δm against each task trained alone, mean ± standard error over"
            f" seeds {seeds_text(seeds)}; lower is better. Budget: Adam, lr {budget['lr']}, batch"
            f" {budget['batch_size']}, {budget['epochs']} epochs; {cpu:.1f} h of CPU time, one"
            " thread per run. `python benchmarks/suite.py --problems qm9 --seeds 0 1 2`"
            " reproduces it and adds TorchJD's peers, which these runs lack (the command that"
            " ran them, with its `--methods` list, is in the results file);"
            " `benchmarks/results/qm9.md` has the verdicts against a plain sum.",
            "",
            *lines,
            "",
            f"The default, {rs.label(default)}, ranks {rank.get(default, '-')} of {len(rank)}"
            f" ({d:+.1f} ± {se:.1f} against a plain sum's {s_mean:+.1f} ± {s_se:.1f}).",
            f"On the {len(common)} methods both tables have, the rank correlation (Spearman)"
            f" between the orders is {rho:+.2f}. The published column is at the papers' budget"
            f" ({published['budget']}), from `{QM9_PUBLISHED}`.",
        ]
    )


def block_qm9_summary() -> str:
    """One line for the README: where the default and a plain sum land on QM9."""
    rs = _suite()
    _, summary, rank, _ = _qm9()
    default = _default().DEFAULT
    best = min(rank, key=rank.__getitem__)
    parts = {}
    for method in (default, "sum", best):
        d, se = rs.mean_se(list(summary[method]["delta"].values()))
        parts[method] = f"Δm {d:+.1f} ± {se:.1f} %"
    seeds = sorted({s for v in summary.values() for s in v["delta"]})
    return (
        f"On QM9, the field's 11-task benchmark, which the default was not chosen on ({len(seeds)}"
        f" seeds at a CPU budget, {len(rank)} methods): {rs.label(default)} ranks"
        f" {rank[default]} ({parts[default]}), a plain sum {rank['sum']} ({parts['sum']}), the"
        f" best is {rs.label(best)} ({parts[best]}); the table is in [choosing a method]"
        "(docs/choosing.md#qm9-the-fields-benchmark)."
    )


# ------------------------------------------------------------------------------ the machinery


@dataclass(frozen=True)
class Block:
    sources: tuple[str, ...]
    render: Callable[[], str]


BLOCKS: dict[str, Block] = {
    "default-answer": Block(DEFAULT_SOURCES, block_default_answer),
    "default-study": Block(DEFAULT_SOURCES, block_default_study),
    "held-out": Block((*DEFAULT_SOURCES, "benchmarks/results/failure_modes.json"), block_held_out),
    "failure-modes": Block(FAILURE_SOURCES, block_failure_modes),
    "default-round-2": Block(DEFAULT_SOURCES, block_round_two),
    "default-round-3": Block(DEFAULT_SOURCES, block_round_three),
    "default-round-4": Block(DEFAULT_SOURCES, block_round_four),
    "method-list": Block(("src/balanced_losses/catalog.py",), block_method_list),
    "suite-summary": Block((*SUITE, *DEFAULT_SOURCES[4:]), block_suite_summary),
    "suite-scaling": Block((*SCALING, "benchmarks/results/suite_speed.json"), block_suite_scaling),
    "demo-table": Block((DEMO,), block_demo_table),
    "demo-curves": Block((DEMO,), block_demo_curves),
    "init-gradients": Block((INIT,), block_init_gradients),
    "normalizer-vs-alone": Block((USER_REGIME,), block_normalizer_vs_alone),
    "aggregators-cost": Block((AGGREGATORS_SPEED,), block_aggregators_cost),
    "solver-timing": Block(SOLVER_TIMING, block_solver_timing),
    "solver-ops": Block((SOLVER_OPS,), block_solver_ops),
    "end-to-end": Block((END_TO_END,), block_end_to_end),
    "qm9-table": Block((QM9, QM9_PUBLISHED), block_qm9_table),
    "qm9-summary": Block((QM9,), block_qm9_summary),
}
#: Files made whole from one JSON each.
FILES: dict[str, tuple[str, Callable[[], str]]] = {
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
