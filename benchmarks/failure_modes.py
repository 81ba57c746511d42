"""Per-step logs of how a method treats each task: the study behind the default's choice.

For one problem, each method and seed trains exactly as in ``benchmarks/suite.py`` (same
initial weights, same batches, same budget) while every step records:

- each task's raw loss on the batch;
- each task's raw gradient norm at the shared features, :math:`\\lVert \\partial L_k /
  \\partial h \\rVert` (measured by the method itself where it measures it, by
  :func:`balanced_losses.diagnostics.task_gradient_norms` otherwise);
- the multiplier the method applies to that raw gradient (for ``DBMTL``: :math:`s_k / L_k`,
  the log transform's :math:`1/L_k` times the gradient half's factor), so that each task
  sends multiplier x raw norm into the trunk;
- the norm of the whole gradient on the trunk's parameters and of the optimizer's update of
  them (the parameters' change over the step).

Validation metrics are recorded after every epoch. Results go to
``benchmarks/results/failure_modes.json``; ``python benchmarks/render_suite.py`` draws them.

Usage::

    python benchmarks/failure_modes.py --problem user_regime --methods sum dbmtl --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import suite  # noqa: E402
from candidates import SmoothedDBMTL  # noqa: E402

import balanced_losses as bl  # noqa: E402

OUT = suite.RESULTS / "failure_modes.json"


def _raw_and_multipliers(
    weighting: bl.Weighting | None, losses: dict[str, Tensor], feats: Tensor, tasks: list[str]
) -> tuple[list[float], list[float]]:
    """Each task's raw gradient norm at the features and what the method multiplies it by."""
    values = torch.stack([losses[t].detach() for t in tasks]).double()
    if isinstance(weighting, bl.DBMTL):
        # The gradient half measures the log terms' gradients, g_k / L_k.
        inner = weighting.balancer
        raw = inner.grad_norms.double() * values
        mult = inner.last_weights.double() / values
    elif isinstance(weighting, SmoothedDBMTL):
        per_loss = weighting.normalizer.last_weights.double()  # 1 / m_k
        raw = weighting.grad_norms.double() / per_loss
        mult = weighting.last_weights.double() * per_loss
    elif isinstance(weighting, bl.GradientBalancer):
        raw = weighting.grad_norms.double()
        mult = weighting.last_weights.double()
    else:
        raise TypeError(type(weighting))
    return raw.tolist(), mult.tolist()


def train_logged(problem_name: str, method: str, seed: int) -> dict[str, Any]:
    """Train ``method`` on ``problem_name`` for ``seed`` as the suite does, logging every step."""
    torch.set_num_threads(1)
    problem = suite.load_problem(problem_name)
    train, val = problem.data()
    tasks = list(problem.tasks)
    torch.manual_seed(seed)
    model = problem.model()
    kept: dict[str, Tensor] = {}
    # Registered before any method attaches: this sees the trunk's own output.
    model.trunk.register_forward_hook(lambda _m, _a, out: kept.__setitem__("h", out))
    with torch.no_grad():
        probe = train.take(torch.arange(min(len(train), 256)))
        first = problem.losses(model(probe.x), probe)
    trainer = suite.make_trainer(problem, method, model, first)
    weighting = trainer.weighting
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]
    budget = problem.budget
    generator = torch.Generator().manual_seed(1000 + seed)
    log: dict[str, list[Any]] = {"loss": [], "raw": [], "mult": [], "trunk_grad": [], "update": []}
    curves: dict[str, list[float]] = {t: [] for t in tasks}
    for _ in range(budget.epochs):
        for index in suite.batches(len(train), budget.batch_size, generator):
            batch = train.take(index)
            trainer.optimizer.zero_grad(set_to_none=True)
            losses = problem.losses(model(batch.x), batch)
            # Methods that measure at the features report the norms themselves, except a
            # CalibratedBalancer once frozen (nothing is measured then).
            measured_inside = isinstance(weighting, bl.GradientBalancer | bl.DBMTL) and not (
                isinstance(weighting, bl.CalibratedBalancer) and weighting.frozen
            )
            if not measured_inside:
                norms = bl.diagnostics.task_gradient_norms(losses, [kept["h"]])
                raw = [float(norms[t]) for t in tasks]
            before = [p.detach().clone() for p in trunk]
            trainer.backward(losses)
            if measured_inside:
                raw, mult = _raw_and_multipliers(weighting, losses, kept["h"], tasks)
            elif weighting is None:
                mult = [float(getattr(trainer, "factors", {}).get(t, 1.0)) for t in tasks]
            else:
                mult = weighting.last_weights.double().tolist()
            grad = math.sqrt(sum(float(p.grad.double().square().sum()) for p in trunk))
            trainer.optimizer.step()
            trainer.after_step(batch)
            update = math.sqrt(
                sum(
                    float((p.detach() - b).double().square().sum())
                    for p, b in zip(trunk, before, strict=True)
                )
            )
            log["loss"].append([_round(float(losses[t].detach())) for t in tasks])
            log["raw"].append([_round(v) for v in raw])
            log["mult"].append([_round(v) for v in mult])
            log["trunk_grad"].append(_round(grad))
            log["update"].append(_round(update))
        trainer.epoch_end()
        for task, value in problem.evaluate(model, val).items():
            curves[task].append(value)
    return {
        "problem": problem_name,
        "method": method,
        "seed": seed,
        "tasks": tasks,
        "steps_per_epoch": math.ceil(len(train) / budget.batch_size),
        "metrics": {t: v[-1] for t, v in curves.items()},
        "curves": curves,
        "log": log,
    }


def _round(value: float) -> float:
    return float(f"{value:.4g}") if math.isfinite(value) else value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--problem", default="user_regime")
    parser.add_argument("--methods", nargs="+", default=["sum", "dbmtl", "gradient-balancer"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(suite.SEEDS))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    record: dict[str, Any] = json.loads(OUT.read_text()) if OUT.is_file() else {"runs": []}
    jobs = [(args.problem, m, s) for s in args.seeds for m in args.methods]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        for result in pool.map(train_logged, *zip(*jobs, strict=True)):
            key = (result["problem"], result["method"], result["seed"])
            record["runs"] = [
                r for r in record["runs"] if (r["problem"], r["method"], r["seed"]) != key
            ] + [result]
            print(f"{key}: {result['metrics']}", flush=True)
            record["runs"].sort(key=lambda r: (r["problem"], r["method"], r["seed"]))
            OUT.write_text(json.dumps(record) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
