"""Per-step cost of the feature-level methods, ours at the features and TorchJD's peers.

Ours are the feature-level methods of :mod:`balanced_losses.catalog` (``GradientBalancer``,
``CalibratedBalancer``, ``DBMTL``, the aggregators ``UPGrad``, ``IMTLG``, ... and their named
configurations), built at their defaults: they act on the tasks' gradients at the shared
features inside the one backward pass, ``views = agg.branch(feats)``,
``agg(losses).backward()``. TorchJD's peers, its aggregators of the same class names, act on
the shared *parameters*: ``mtl_backward`` computes the ``K`` rows of the Jacobian of the losses
with respect to every trunk parameter, and ``jac_to_grad`` combines them. All are timed against
a plain ``sum(losses)`` on the same model.

The model: the demo's trunk (bidirectional GRU over 105 time steps, 4 input channels; hidden 32
per direction) or a wider one (hidden 128), with ``K`` = 3 or 10 linear heads of different
sizes: even-numbered heads predict at every time step (1 or 2 outputs per step), odd-numbered
ones read the features mean-pooled over time (2 or 4 outputs); mean squared errors to targets
scaled by 0.1, 1 and 10 in turn, so the losses differ by up to 10^4. A step is forward, the
combination, backward and an Adam step.

Time and memory with the helpers of ``benchmarks/timing.py``: every method has its own copy of
the model (same initialization) and optimizer; after a warmup, each round runs one step of
every method of a (trunk, K) configuration in an order that rotates from round to round, in one
process; the time ratio is the median over rounds of (method's step time /
the same round's ``sum`` step time), with its interquartile range. Memory: one more step of
each method under ``torch.profiler``, the peak of live CPU tensor bytes above the step's
starting level. "TorchJD / ours": the median over rounds of TorchJD's step time divided by the
same round's step time of our aggregator of the same name (above 1: ours is faster).

Writes ``<out>/aggregators_speed.json`` (every row, the settings, the machine) and renders
``<out>/aggregators_speed.md`` from it with ``benchmarks/render.py``.

Usage (from the repository root)::

    OMP_NUM_THREADS=1 python benchmarks/aggregators_speed.py   # 25 rounds: about 6 minutes
    python benchmarks/aggregators_speed.py --smoke             # seconds, for CI

On the shared 2-core development machine a round of the four configurations took about 13 s
with 20 methods (the wide trunk with K = 10 and TorchJD's Jacobians take most of it): the default
25 rounds took 344 s in all, under the 10 minutes a full run should take.

TorchJD (``pip install torchjd``) is optional: without it, or without an aggregator's solver
(cvxpy for CAGrad and NashMTL), those rows are skipped with a printed note.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import inspect
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import _pointer_countdown_lib as lib
import render
import timing
import torch
from torch import Tensor, nn

import balanced_losses as bl

try:
    import torchjd.aggregation as tja
    from torchjd.autojac import jac_to_grad, mtl_backward
except ImportError:  # TorchJD is optional: its rows are skipped
    tja = None

TRUNKS = {"demo": 32, "wide": 128}  # name -> GRU hidden size per direction
TASK_COUNTS = (3, 10)
#: The per-step time targets for our methods, as a ratio to a plain sum, by K.
TARGETS = {3: 1.10, 10: 1.25}
#: CAGrad's radius scale and FairGrad's alpha: our defaults, which TorchJD's peers get too (its
#: CAGrad and FairGrad have no default), so that each pair solves the same problem.
CAGRAD_C = inspect.signature(bl.CAGrad).parameters["c"].default
FAIRGRAD_ALPHA = inspect.signature(bl.FairGrad).parameters["alpha"].default
LOSS_SCALES = (0.1, 1.0, 10.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trunks", nargs="+", choices=list(TRUNKS), default=list(TRUNKS))
    parser.add_argument("--tasks", nargs="+", type=int, default=list(TASK_COUNTS), metavar="K")
    parser.add_argument("--rounds", type=int, default=25)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument(
        "--smoke", action="store_true", help="demo trunk, K = 3, two rounds, batch 4: for CI"
    )
    return parser.parse_args(argv)


# ---------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Head:
    """One task's head: per time step or pooled over time, its outputs and its loss scale."""

    name: str
    per_step: bool
    outputs: int  # per time step when per_step, else per sample
    scale: float  # the task's targets are multiplied by this: losses on different scales

    @property
    def output_size(self) -> int:
        return (lib.T if self.per_step else 1) * self.outputs


def make_heads(k: int) -> list[Head]:
    """``k`` heads: per-step and pooled in turn, 1/2 or 2/4 outputs, loss scales 0.1, 1, 10."""
    heads = []
    for i in range(k):
        per_step = i % 2 == 0
        width = 1 + (i // 2) % 2
        heads.append(
            Head(f"task{i}", per_step, width if per_step else 2 * width, LOSS_SCALES[i % 3])
        )
    return heads


class MultiHeadNet(nn.Module):
    """The demo's shared bidirectional GRU with one linear head per task."""

    def __init__(self, hidden: int, heads: list[Head]) -> None:
        super().__init__()
        self.encoder = nn.GRU(lib.CHANNELS, hidden, batch_first=True, bidirectional=True)
        self.specs = heads
        self.heads = nn.ModuleList(nn.Linear(2 * hidden, h.outputs) for h in heads)

    def encode(self, x: Tensor) -> Tensor:
        """Shared features, (B, T, 2 * hidden)."""
        return self.encoder(x)[0]

    def losses(self, views: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
        """Each head on its view (pooled over time or not), mean squared error to its target."""
        out = []
        for spec, head, view, target in zip(self.specs, self.heads, views, targets, strict=True):
            pred = head(view if spec.per_step else view.mean(dim=1))
            out.append(nn.functional.mse_loss(pred, target))
        return out


def make_targets(batch: lib.Batch, heads: list[Head]) -> list[Tensor]:
    """Per-step heads regress the (clipped, /20) countdown, pooled ones the event boundaries."""
    countdown = batch.countdown.clamp(-lib.CLIP, lib.CLIP) / lib.CLIP
    targets = []
    for i, h in enumerate(heads):
        if h.per_step:
            base = torch.stack([countdown + 0.1 * (i + j) for j in range(h.outputs)], dim=-1)
        else:
            base = batch.pointer.repeat(1, h.outputs // 2) + 0.1 * i
        targets.append(h.scale * base)
    return targets


# ---------------------------------------------------------------------------------- the steps

#: Everything between the losses and the optimizer step: fills the parameters' ``.grad``.
Backward = Callable[[MultiHeadNet, Tensor, list[Tensor]], None]


class Runner:
    """One method's model and optimizer, stepping through fixed batches (``timing.Stepper``)."""

    def __init__(
        self,
        hidden: int,
        heads: list[Head],
        batches: list[tuple[Tensor, list[Tensor]]],
        backward: Backward,
        weighting: bl.Weighting | None = None,
    ) -> None:
        torch.manual_seed(0)
        self.model = MultiHeadNet(hidden, heads)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.weighting = weighting
        self.backward = backward
        self.batches = itertools.cycle(batches)

    def step(self) -> float:
        x, targets = next(self.batches)
        start = time.perf_counter()
        feats = self.model.encode(x)
        if self.weighting is not None:  # every method of ours branches the features
            views = self.weighting.branch(feats)
            losses = self.model.losses([views[h.name] for h in self.model.specs], targets)
        else:
            losses = self.model.losses([feats] * len(targets), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(self.model, feats, losses)
        self.optimizer.step()
        if self.weighting is not None:
            # The loop's call after each step: the losses are computed only if the method asks.
            self.weighting.after_step(lambda: self.recompute(x, targets))
        return time.perf_counter() - start

    def recompute(self, x: Tensor, targets: list[Tensor]) -> dict[str, Tensor]:
        """Each task's loss on the batch under the current parameters."""
        feats = self.model.encode(x)
        losses = self.model.losses([feats] * len(targets), targets)
        return {h.name: loss for h, loss in zip(self.model.specs, losses, strict=True)}


def plain_sum(model: MultiHeadNet, feats: Tensor, losses: list[Tensor]) -> None:
    torch.stack(losses).sum().backward()


def ours_backward(weighting: bl.Weighting) -> Backward:
    """The weighting's total; its backward combines the tasks' gradients at the features."""
    names = list(weighting.tasks)

    def backward(model: MultiHeadNet, feats: Tensor, losses: list[Tensor]) -> None:
        weighting(dict(zip(names, losses, strict=True))).backward()

    return backward


def torchjd_backward(aggregator: Any) -> Backward:
    """TorchJD 0.18: the Jacobian on the trunk's parameters, aggregated into their ``.grad``."""

    def backward(model: MultiHeadNet, feats: Tensor, losses: list[Tensor]) -> None:
        mtl_backward(losses, features=feats)
        jac_to_grad(model.encoder.parameters(), aggregator)

    return backward


def _solver_missing(factory: Callable[[], Any]) -> str | None:
    """The ImportError TorchJD raises when an aggregator's solver is not installed, if any."""
    try:
        factory()
    except ImportError as error:
        return str(error)
    return None


def torchjd_peers(names: list[str], k: int) -> tuple[dict[str, Callable[[], Any]], list[str]]:
    """TorchJD's aggregators of our class ``names`` by name, and notes on those that cannot run.

    A name TorchJD does not have (``GradientBalancer``, ``DBMTL``, ...) has no peer.
    """
    if tja is None:
        return {}, ["TorchJD is not installed: no TorchJD rows"]
    options: dict[str, dict[str, Any]] = {
        "CAGrad": {"c": CAGRAD_C},
        "FairGrad": {"alpha": FAIRGRAD_ALPHA},
        "NashMTL": {"n_tasks": k},
    }
    factories: dict[str, Callable[[], Any]] = {}
    for name in names:
        cls = getattr(tja, name, None)
        if cls is not None:
            factories[name] = functools.partial(cls, **options.get(name, {}))
    missing = {name: _solver_missing(factory) for name, factory in factories.items()}
    notes = [f"torchjd.{name} skipped: {why}" for name, why in missing.items() if why]
    return {name: f for name, f in factories.items() if missing[name] is None}, notes


@dataclass(frozen=True)
class Row:
    """A row of the table: how to build its backward (and its weighting, for ours)."""

    name: str
    family: str  # "baseline", "ours" or "torchjd"
    make: Callable[[], tuple[Backward, bl.Weighting | None]]
    aggregator: str | None = None  # the class name: ours and TorchJD's of one name pair up


def method_plan(k: int) -> tuple[list[Row], list[str]]:
    """The rows of one configuration with ``k`` tasks, and notes on those skipped.

    A plain sum, every feature-level method of the catalog (named by its label: the class, and
    the options that differ from its defaults), then TorchJD's peers of their classes.
    """
    tasks = [h.name for h in make_heads(k)]
    ours = bl.catalog.methods("features")

    def build(method: bl.catalog.Method) -> Callable[[], tuple[Backward, bl.Weighting]]:
        def make() -> tuple[Backward, bl.Weighting]:
            weighting = method.build(tasks, seed=0)
            return ours_backward(weighting), weighting

        return make

    def theirs(factory: Callable[[], Any]) -> Callable[[], tuple[Backward, None]]:
        return lambda: (torchjd_backward(factory()), None)

    jd, notes = torchjd_peers(list(dict.fromkeys(m.name for m in ours)), k)
    plan = [Row("sum", "baseline", lambda: (plain_sum, None))]
    plan += [Row(m.label.strip("`"), "ours", build(m), m.name) for m in ours]
    plan += [Row(f"torchjd.{n}", "torchjd", theirs(f), n) for n, f in jd.items()]
    return plan, notes


def measure(
    hidden: int, k: int, args: argparse.Namespace
) -> tuple[list[dict[str, Any]], list[str]]:
    heads = make_heads(k)
    data = lib.make_data(8 * args.batch_size, seed=1)
    batches = []
    for i in range(0, len(data), args.batch_size):
        part = data.index(slice(i, i + args.batch_size))
        batches.append((part.x, make_targets(part, heads)))
    plan, notes = method_plan(k)
    runners = {}
    for method in plan:
        backward, weighting = method.make()
        runners[method.name] = Runner(hidden, heads, batches, backward, weighting)
    times = timing.interleave(runners, rounds=args.rounds, warmup=args.warmup)
    rows = timing.cost_rows(runners, times)
    for method, row in zip(plan, rows, strict=True):
        row["family"] = method.family
        if method.aggregator is None:
            continue
        row["aggregator"] = method.aggregator
        theirs = f"torchjd.{method.aggregator}"
        if method.name == method.aggregator and theirs in times:
            # Per round, as the ratios to the sum: both steps ran in the same round.
            per_round = zip(times[theirs], times[method.name], strict=True)
            ratio, iqr = timing.median_iqr([t / o for t, o in per_round])
            row["torchjd_over_ours"] = ratio
            row["torchjd_over_ours_iqr"] = iqr
    return rows, notes


def to_json(
    results: list[dict[str, Any]],
    notes: list[str],
    args: argparse.Namespace,
    *,
    argv: list[str],
    machine_start: dict[str, Any],
    seconds: float,
) -> dict[str, Any]:
    """Everything measured, with the settings and the machine, for ``render.py``."""
    return {
        "script": "benchmarks/aggregators_speed.py",
        "command": " ".join(["python", "benchmarks/aggregators_speed.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "time_steps": lib.T,
        "targets": {str(k): v for k, v in TARGETS.items()},
        "cagrad_c": CAGRAD_C,
        "fairgrad_alpha": FAIRGRAD_ALPHA,
        "torchjd": timing.package_version("torchjd"),
        "balanced_losses": bl.__version__,
        "notes": notes,
        "wall_seconds": seconds,
        "load_average_1_5_15_min_at_start": machine_start["load_average_1_5_15_min"],
        "machine": lib.machine_info(),
        "configs": results,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    machine_start = lib.machine_info()
    if args.smoke:
        args.trunks, args.tasks = ["demo"], [3]
        args.rounds, args.warmup, args.batch_size = 2, 1, 4
    started = time.perf_counter()
    results, notes = [], []
    for trunk in args.trunks:
        hidden = TRUNKS[trunk]
        for k in args.tasks:
            print(f"{trunk} trunk, K = {k}: {args.rounds} rounds", flush=True)
            rows, config_notes = measure(hidden, k, args)
            notes += [n for n in config_notes if n not in notes]
            results.append(
                {
                    "trunk": trunk,
                    "gru_hidden": hidden,
                    "tasks": k,
                    "heads": [asdict(h) for h in make_heads(k)],
                    "rows": rows,
                }
            )
    for note in notes:
        print(f"note: {note}")
    record = to_json(
        results,
        notes,
        args,
        argv=argv,
        machine_start=machine_start,
        seconds=time.perf_counter() - started,
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "aggregators_speed_smoke" if args.smoke else "aggregators_speed"
    json_path = args.out / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=1) + "\n")
    md_path = args.out / f"{stem}.md"
    text = render.aggregators_speed_markdown(record, source=render.relative(json_path))
    md_path.write_text(text)
    print(text)
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
