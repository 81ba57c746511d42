r"""Pointer + countdown: why normalizing loss values starves the per-timestep head.

A two-head model whose losses average over 2 and 105 outputs, on synthetic data:

- input: 105 time steps x 4 channels, one "expansion" event per series whose start and end
  show up as a change of drift, volatility and volume (plus noise);
- shared encoder: bidirectional GRU, hidden 32 per direction;
- pointer head: mean-pool over time, Linear -> (start/T, end/T); Huber, delta 1;
- countdown head: Linear at every time step -> 105 outputs, bars until the event starts,
  clipped to [-20, 20]; Huber, delta 1;
- Adam, lr 1e-3, batch 32, 2048 training and 512 validation samples.

The same model (same initialization, same batches) is trained under each method: a plain sum
(``sum``), a running-mean normalizer that divides each loss by its value
(``demo-normalizer-none``: ``correction="none"``, fixed weights 0.7/0.1, momentum 0.95), the same
with ``correction="sqrt"`` (``demo-normalizer-sqrt``), uncertainty weighting
(``uncertainty-weighting``) and the package's default, ``CalibratedWeighting``
(``calibrated-weighting``). ``--methods`` takes any of these keys, ``alone:pointer`` and
``alone:countdown`` (one task alone) and every key of :mod:`balanced_losses.catalog`
(``gradient-balancer``, ``calibrated-balancer``, ``famo``, ``upgrad``, ...); ``--methods all``
trains all but the single-task ones.

The script prints the validation MAE in bars of each head after the last epoch and the
countdown/pointer ratio of the gradient norms that each task's *weighted* term sends into the
shared encoder (w_k * ||d L_k / d theta_enc||, with w_k = d total / d L_k, on 128 training
samples), at initialization and at the end. It saves the training curves to
``<out>/pointer_countdown.png`` and everything it measured to ``<out>/pointer_countdown.json``
(per method: validation MAEs, gradient ratios at initialization and at the end, wall time and
the per-epoch curves; the seed, epochs and data sizes; the CPU model, core count, torch version,
torch thread count and load average). ``examples/output/`` (next to this script, whatever the
working directory) is not tracked by git.

The README's demo table is rendered from the committed reference run
``examples/results/pointer_countdown.json`` (``python benchmarks/render.py``), and the docs show
its figure ``docs/figures/pointer_countdown.png``; both were written by::

    python examples/pointer_countdown.py \
        --json examples/results/pointer_countdown.json \
        --figure docs/figures/pointer_countdown.png

(the reference run predates ``--threads`` and was started with ``OMP_NUM_THREADS=1``, which
gave the same single torch thread).

Run from the repository root::

    python examples/pointer_countdown.py                # 15 epochs, the default methods
    python examples/pointer_countdown.py --epochs 20    # the benchmark's budget
    python examples/pointer_countdown.py --smoke        # a few steps, for CI

**Threads.** The script sets torch's thread count itself (``--threads``, default 1, for the
intra-op pool and, where torch still allows it, the inter-op pool) and says so on its first
line, so ``OMP_NUM_THREADS`` does not change it. One thread is the fastest setting for this
small GRU on a shared 2-core machine, and it keeps runs comparable between machines.

**Progress.** After every epoch it prints one line: the method, the epoch, both validation
MAEs, the elapsed time and an estimate of the time left for the whole run (all methods times
all epochs), e.g. ``[sum] epoch 3/15  val MAE pointer 2.31 countdown 1.20  12 s elapsed, ETA
2 min 40 s``. ``--quiet`` turns these lines off.

**Runtime, and why 15 epochs.** The five default methods fit in a few minutes on a 2-core CPU
at 15 epochs; the reference run's JSON records its wall time and machine. ``--methods all``
trains every method of the catalog as well. The benchmark suite's ``user_regime`` problem
trains the same model on the same generator for 20 epochs over five seeds (``python
benchmarks/suite.py --problems user_regime``). One seed proves nothing about a method (plain
sums vary a lot between seeds).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pointer_countdown_lib as lib
import torch

BATCH_SIZE = 32
#: The default output folder: next to this script, ignored by git (see .gitignore).
DEFAULT_OUT = Path(__file__).resolve().parent / "output"

DEFAULT_METHODS = [
    "sum",
    "demo-normalizer-none",
    "demo-normalizer-sqrt",
    "uncertainty-weighting",
    "calibrated-weighting",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods",
        nargs="+",
        default=DEFAULT_METHODS,
        metavar="NAME",
        help=f"method keys to train, or `all` (default: {DEFAULT_METHODS}; the keys: "
        f"{lib.method_keys(baselines=True)})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="folder for pointer_countdown.png and pointer_countdown.json (default: "
        "examples/output/, which git ignores)",
    )
    parser.add_argument("--json", type=Path, default=None, help="results path (overrides --out)")
    parser.add_argument("--figure", type=Path, default=None, help="PNG path (overrides --out)")
    parser.add_argument("--smoke", action="store_true", help="1 epoch of 2 steps, for CI")
    parser.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=1,
        help="torch threads (intra-op and inter-op pools; default: %(default)s, which also "
        "keeps the run the same whatever OMP_NUM_THREADS says)",
    )
    return parser.parse_args(argv)


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def set_threads(threads: int) -> str:
    """Set torch's intra-op and inter-op thread counts; return the line that says so.

    torch accepts a new inter-op count only before its inter-op pool has started (a
    ``RuntimeError`` after that); the line then says which count is in force instead.
    """
    torch.set_num_threads(threads)
    with contextlib.suppress(RuntimeError):  # the inter-op pool has started already
        torch.set_num_interop_threads(threads)
    interop = torch.get_num_interop_threads()
    plural = "s" if threads != 1 else ""
    return (
        f"using {torch.get_num_threads()} torch thread{plural} (--threads {threads}; "
        f"{interop} inter-op thread{'s' if interop != 1 else ''}); "
        f"{os.cpu_count()} CPUs on this machine"
    )


def duration(seconds: float) -> str:
    """``42 s``, ``2 min 40 s``, ``1 h 05 min``."""
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class Progress:
    """One line per epoch with the time elapsed and the time left for the whole run.

    The estimate assumes every remaining epoch (of this method and the ones after it) takes as
    long as the mean epoch so far; methods differ by about 10% in step time on this model.
    """

    def __init__(self, n_methods: int, epochs: int) -> None:
        self.total = n_methods * epochs
        self.epochs = epochs
        self.done = 0
        self.started = time.perf_counter()

    def epoch_done(self, method: str, epoch: int, figures: dict[str, float]) -> str:
        self.done += 1
        elapsed = time.perf_counter() - self.started
        left = elapsed / self.done * (self.total - self.done)
        return (
            f"[{method}] epoch {epoch}/{self.epochs}  val MAE pointer "
            f"{figures['val_pointer']:.2f} countdown {figures['val_countdown']:.2f}  "
            f"{duration(elapsed)} elapsed, ETA {duration(left)}"
        )


def format_table(results: list[lib.RunResult]) -> str:
    lines = [
        "| method | pointer MAE (bars) | countdown MAE (bars) "
        "| countdown/pointer grad ratio at init | at end |",
        "|---|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r.method} | {r.val_mae['pointer']:.2f} | {r.val_mae['countdown']:.2f} "
        f"| {r.ratio_init:.3g} | {r.ratio_end:.3g} |"
        for r in results
    ]
    return "\n".join(lines)


def probe_size(args: argparse.Namespace) -> int:
    """Training samples on which the gradient ratios are measured."""
    return 8 if args.smoke else 128


def results_to_json(
    results: list[lib.RunResult],
    args: argparse.Namespace,
    *,
    argv: list[str],
    epochs: int,
    n_train: int,
    n_val: int,
    wall_seconds: float,
) -> dict[str, Any]:
    """Everything the run measured, with what is needed to reproduce and place it."""
    return {
        "script": "examples/pointer_countdown.py",
        "command": " ".join(["python", "examples/pointer_countdown.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "seed": args.seed,
        "epochs": epochs,
        "n_train": n_train,
        "n_val": n_val,
        "batch_size": BATCH_SIZE,
        "probe_size": probe_size(args),
        # The script sets torch's thread count (--threads): OMP_NUM_THREADS no longer decides it
        # (benchmarks/render.py then leaves it out of the command it prints).
        "threads": args.threads,
        "sets_own_threads": True,
        "wall_seconds": wall_seconds,
        "machine": lib.machine_info(),
        "methods": [
            {
                **lib.result_to_dict(r),
                "description": lib.describe(r.method),
            }
            for r in results
        ],
    }


#: Legend labels of the plain sum and of the demo's own configurations; the other keys are named
#: as :func:`_pointer_countdown_lib.describe` names them (a catalog method by its label).
LEGEND = {
    "sum": "plain sum",
    "demo-normalizer-none": 'LossNormalizer("none"), 0.7/0.1',
    "demo-normalizer-sqrt": 'LossNormalizer("sqrt"), 0.7/0.1',
}


def legend(key: str) -> str:
    """How the figure names a method key."""
    return LEGEND.get(key) or lib.describe(key)


CAPTION = (
    "Lower is better in the first two panels; in the third, 1 (dashed) means both tasks send "
    "equally large gradients into the shared encoder, below 1 the countdown head gets less."
)


def plot(results: list[lib.RunResult], path: Path, *, title: str) -> None:
    """Three panels over the epochs, a shared legend and a caption that says what to read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")  # 20 and 0.01, not 2x10^1 and 10^-2
    # Minor ticks of a log axis: label 2, 3 and 5 times a power of ten, leave the rest bare.
    minor = FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else "")
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.6))
    panels = [
        ("val_pointer", "pointer head", "validation MAE (bars, log scale)"),
        ("val_countdown", "countdown head", "validation MAE (bars, log scale)"),
        (
            "ratio",
            "gradient balance in the shared encoder",
            "countdown / pointer gradient-norm ratio\n(dimensionless, log scale)",
        ),
    ]
    for ax, (key, panel_title, ylabel) in zip(axes, panels, strict=True):
        for r in results:
            ax.plot(
                r.history["epoch"],
                r.history[key],
                marker=".",
                label=legend(r.method),
            )
        values = [v for r in results for v in r.history[key] if math.isfinite(v)]
        if values and min(values) > 0:
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(plain)
            ax.yaxis.set_minor_formatter(minor if max(values) / min(values) < 100 else "")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch (0 = at initialization)")
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
    axes[2].axhline(1.0, color="black", lw=0.8, ls="--")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="upper center",
        bbox_to_anchor=(0.5, 0.955),
        ncol=min(len(labels), 6),
        fontsize=9,
        frameon=False,
    )
    fig.suptitle(title, fontsize=12, y=0.99)
    fig.text(0.5, 0.015, CAPTION, ha="center", va="bottom", fontsize=9.5, wrap=True)
    fig.tight_layout(rect=(0, 0.05, 1, 0.91))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    print(set_threads(args.threads), flush=True)
    methods = lib.resolve_methods(None if args.methods == ["all"] else args.methods)
    if not methods:
        print("no method to train")
        return 1
    epochs, max_steps, n_train, n_val = args.epochs, None, 2048, 512
    if args.smoke:
        epochs, max_steps, n_train, n_val = 1, 2, 64, 32
    data = (
        lib.make_data(n_train, seed=10_000 + args.seed),
        lib.make_data(n_val, seed=20_000 + args.seed),
    )
    started = time.perf_counter()
    progress = Progress(len(methods), epochs)
    results = []
    for name in methods:
        print(f"training `{name}`: {lib.describe(name)}", flush=True)

        def report(epoch: int, figures: dict[str, float], name: str = name) -> None:
            line = progress.epoch_done(name, epoch, figures)
            if not args.quiet:
                print(f"  {line}", flush=True)

        result = lib.train(
            name,
            seed=args.seed,
            epochs=epochs,
            max_steps=max_steps,
            data=data,
            batch_size=BATCH_SIZE,
            probe_size=probe_size(args),
            on_epoch=report,
        )
        print(f"  done in {result.seconds:.0f} s", flush=True)
        results.append(result)
    elapsed = time.perf_counter() - started
    print()
    print(f"Validation after {epochs} epochs, seed {args.seed} ({elapsed:.0f} s in all):")
    print(format_table(results))
    path = args.figure or args.out / "pointer_countdown.png"
    plot(results, path, title=f"pointer/countdown demo, seed {args.seed}, {epochs} epochs")
    print(f"\ntraining curves: {path}")
    json_path = args.json or args.out / "pointer_countdown.json"
    record = results_to_json(
        results,
        args,
        argv=argv,
        epochs=epochs,
        n_train=n_train,
        n_val=n_val,
        wall_seconds=elapsed,
    )
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"results: {json_path}")
    bad = [r.method for r in results if not all(math.isfinite(v) for v in r.val_mae.values())]
    if bad:
        print(f"non-finite validation MAE for {bad}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
