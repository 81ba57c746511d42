"""Count the aten operations one call of each aggregator's weight solver dispatches.

On a GPU each dispatched operation is (at least) one kernel launch, and the Gramian solvers are
a long chain of tiny ones, so the number of operations one solve dispatches is a proxy for its
GPU time that needs no GPU. This counts them with ``torch.profiler`` on the CPU, on the path a
GPU takes: ``balanced_losses._numerics.HOST_SHORTCUTS`` is switched off for the measurement (as
``tests/test_aggregation_qp.py`` does), so the solvers run their fixed budget without the CPU's
early exits and LAPACK calls. There ``UPGrad``, ``MGDA`` and ``CAGrad`` enumerate their programs'
faces at K <= 10 (``balanced_losses.features._qp.ENUMERATION_MAX_K``) and run active-set sweeps
above.

For each rule and K in (2, 3, 5, 10, 20, 40), on a fixed-seed float32 Gramian of K gradients
that share a direction, the rule runs once to warm up, then once under the profiler. Two counts:

- ``ops``: every profiler event whose name starts with ``aten::``, nested ones included. A
  composite op is counted with the ops it decomposes into (``aten::matmul`` with the
  ``aten::mm`` it calls, ``aten::zeros`` with ``aten::empty`` and ``aten::zero_``).
- ``top_level_ops``: the ``aten::`` events with no ``aten::`` event among their ancestors in
  the profiler's event tree: the operations the Python code dispatches. This is the
  kernel-launch proxy. Each one is a trip through the dispatcher from Python, and on a GPU at
  most a few kernels (a composite may launch several, a view or an ``empty`` none), so launches
  and host overhead grow with it, while ``ops`` also counts the dispatcher's internal
  redispatches, which cost no launch of their own.

The tree is the profiler's own (``kineto_results.experimental_event_tree()``, each node with its
``children``), walked once; ``prof.events()`` with its ``cpu_parent`` links gives the same
``top_level_ops`` but is some 50 times slower to build and leaves out a few nested events.

Each rule is called as its class calls it, with the class's defaults: ``cagrad_weights(g,
c=0.4)``, ``nash_mtl_weights(g, max_norm=1.0)``, ``fairgrad_weights(g, alpha=1.0)``, and PCGrad
with its per-step random orders (``pcgrad_orders`` for seed 0, step 0) drawn inside the measured
call, as ``PCGrad`` draws them each step. The counts are deterministic: the fixed-budget path
has no data-dependent branch.

Usage (from the repository root)::

    python benchmarks/solver_ops.py            # writes benchmarks/results/solver_ops.json
    python benchmarks/solver_ops.py --check    # exit 1 if the committed file's counts differ

``tests/test_solver_ops.py`` runs the check, and ``benchmarks/render.py`` renders the
``solver-ops`` block of ``docs/conflicts.md`` from the file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.profiler import ProfilerActivity, profile

from balanced_losses import _numerics, aggregation

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "solver_ops.json"
COMMAND = "python benchmarks/solver_ops.py"
KS = (2, 3, 5, 10, 20, 40)
#: The issue's goal for the kernel-launch proxy: at most this many top-level ops at K <= 10.
GOAL_OPS = 60
GOAL_K = 10


def _pcgrad(gramian: Tensor) -> Tensor:
    """What ``PCGrad`` runs each step: draw the orders, then the weights."""
    seed = torch.tensor(0, dtype=torch.int64)
    step = torch.tensor(0, dtype=torch.int64)
    orders = aggregation.pcgrad_orders(gramian.shape[0], seed, step, gramian.device)
    return aggregation.pcgrad_weights(gramian, orders)


#: Each rule as its class calls it, with the class's defaults.
RULES: dict[str, Callable[[Tensor], Tensor]] = {
    "UPGrad": aggregation.upgrad_weights,
    "MGDA": aggregation.mgda_weights,
    "CAGrad": lambda g: aggregation.cagrad_weights(g, 0.4),
    "IMTLG": aggregation.imtlg_weights,
    "AlignedMTL": aggregation.aligned_mtl_weights,
    "NashMTL": lambda g: aggregation.nash_mtl_weights(g, max_norm=1.0),
    "FairGrad": lambda g: aggregation.fairgrad_weights(g, 1.0),
    "PCGrad": _pcgrad,
    "ConFIG": aggregation.config_weights,
}


def gramian(k: int, n: int = 64) -> Tensor:
    """A fixed-seed float32 ``(k, k)`` Gramian of ``k`` gradients sharing one direction."""
    gen = torch.Generator().manual_seed(k)
    shared = torch.randn(1, n, generator=gen)
    jac = 0.5 * shared + torch.randn(k, n, generator=gen)
    return jac @ jac.T


def _count(nodes: list[Any], inside_aten: bool) -> tuple[int, int]:
    ops = top = 0
    stack = [(node, inside_aten) for node in nodes]
    while stack:
        node, inside = stack.pop()
        aten = node.name.startswith("aten::")
        ops += aten
        top += aten and not inside
        stack.extend((child, inside or aten) for child in node.children)
    return ops, top


def count_ops(fn: Callable[..., Any], *args: Any) -> tuple[int, int]:
    """``(ops, top_level_ops)`` of one call ``fn(*args)``: all ``aten::`` events, and those
    with no ``aten::`` event among their ancestors. Run ``fn`` once before to warm it up."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn(*args)
    assert prof.profiler is not None
    results = prof.profiler.kineto_results
    assert results is not None
    return _count(results.experimental_event_tree(), inside_aten=False)


def measure() -> list[dict[str, Any]]:
    """One row per rule and K, on the accelerator path (host shortcuts off)."""
    rows = []
    saved = _numerics.HOST_SHORTCUTS
    _numerics.HOST_SHORTCUTS = False
    try:
        for name, rule in RULES.items():
            for k in KS:
                gram = gramian(k)
                rule(gram)  # warm up
                ops, top = count_ops(rule, gram)
                rows.append({"aggregator": name, "k": k, "ops": ops, "top_level_ops": top})
    finally:
        _numerics.HOST_SHORTCUTS = saved
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--check", action="store_true", help="write nothing; exit 1 if the counts differ"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows = measure()
    if args.check:
        committed = json.loads(args.out.read_text())["rows"] if args.out.is_file() else None
        if committed != rows:
            old = {(r["aggregator"], r["k"]): r for r in committed or []}
            for row in rows:
                was = old.get((row["aggregator"], row["k"]))
                if was != row:
                    print(f"{row['aggregator']} K={row['k']}: committed {was}, now {row}")
            print(f"{args.out} is out of date: run `{COMMAND}`")
            return 1
        print(f"{args.out} matches")
        return 0
    record = {
        "rows": rows,
        "goal": {"top_level_ops": GOAL_OPS, "k": GOAL_K},
        "torch": torch.__version__,
        "command": COMMAND,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    for row in rows:
        print(f"{row['aggregator']:>10} K={row['k']:<3} {row['top_level_ops']:6} {row['ops']:7}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
