"""How much gradient each task of the pointer/countdown problem sends, at initialization.

The quantities ``docs/why.md`` discusses, measured on the demo's own problem
(``examples/_pointer_countdown_lib.py``: same data, same model, same initialization per seed,
the same 128-sample probe batch as the demo's gradient ratios) before any training step:

- each task's loss value and the share of its elements in Huber's linear regime
  (``|residual| > delta``, where the per-element derivative is capped at ``delta``);
- the mean per-element derivative magnitude ``|l'|`` of each task;
- the countdown/pointer ratio of the gradient norms with respect to each head's own outputs,
  and with respect to the shared encoder's parameters, under:
  a plain sum; the ``"sqrt"`` reduction-factor correction; and each loss divided by its own
  (detached) value, which is what a running-mean normalizer converges to.

Writes ``<out>/init_gradients.json``; ``python benchmarks/render.py`` renders the table in
``docs/why.md`` from it. Takes seconds::

    OMP_NUM_THREADS=1 python benchmarks/init_gradients.py
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import _pointer_countdown_lib as lib
import torch

import balanced_losses as bl

PROBE_SIZE = 128  # the demo's probe batch for its gradient ratios
DELTA = 1.0  # both heads' Huber delta (lib.POINTER_LOSS, lib.COUNTDOWN_LOSS)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return parser.parse_args(argv)


def _norm(grads: tuple[torch.Tensor, ...]) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads))


def measure(seed: int) -> dict[str, Any]:
    """Every quantity for one seed's initialization, on the demo's probe batch."""
    train = lib.make_data(2048, seed=10_000 + seed)  # the demo's training set for this seed
    probe = train.index(slice(0, PROBE_SIZE))
    torch.manual_seed(seed)  # the demo's initialization for this seed
    model = lib.PointerCountdownNet()
    feats = model.encode(probe.x)
    preds = model.heads(dict.fromkeys(lib.TASKS, feats))
    losses = lib.task_losses(preds, probe)
    targets = {
        "pointer": probe.pointer,
        "countdown": probe.countdown.clamp(-lib.CLIP, lib.CLIP),
    }
    shared = model.shared_parameters()
    out: dict[str, Any] = {"seed": seed, "loss": {}, "linear_share": {}, "mean_abs_derivative": {}}
    at_outputs, at_encoder = {}, {}
    for task in lib.TASKS:
        residual = (preds[task] - targets[task]).detach()
        out["loss"][task] = float(losses[task].detach())  # a reading, no graph
        out["linear_share"][task] = float((residual.abs() > DELTA).double().mean())
        out["mean_abs_derivative"][task] = float(residual.clamp(-DELTA, DELTA).abs().mean())
        (g_out,) = torch.autograd.grad(losses[task], preds[task], retain_graph=True)
        at_outputs[task] = _norm((g_out,))
        at_encoder[task] = _norm(torch.autograd.grad(losses[task], shared, retain_graph=True))
    factors = bl.functional.reduction_factors(lib.OUTPUT_SIZES, "sqrt")
    sqrt_gain = float(factors["countdown"]) / float(factors["pointer"])
    # A running-mean normalizer converges to L_k / L_k (detached): each gradient divided by
    # its own loss value, so the ratio is multiplied by L_pointer / L_countdown.
    value_gain = out["loss"]["pointer"] / out["loss"]["countdown"]
    plain_out = at_outputs["countdown"] / at_outputs["pointer"]
    plain_enc = at_encoder["countdown"] / at_encoder["pointer"]
    out["ratio"] = {
        "outputs_sum": plain_out,
        "encoder_sum": plain_enc,
        "outputs_sqrt": plain_out * sqrt_gain,
        "encoder_sqrt": plain_enc * sqrt_gain,
        "outputs_divided_by_value": plain_out * value_gain,
        "encoder_divided_by_value": plain_enc * value_gain,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    per_seed = [measure(seed) for seed in args.seeds]
    record = {
        "script": "benchmarks/init_gradients.py",
        "command": " ".join(["python", "benchmarks/init_gradients.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "probe_size": PROBE_SIZE,
        "delta": DELTA,
        "output_sizes": dict(lib.OUTPUT_SIZES),
        "closed_form_ratio_outputs": math.sqrt(
            lib.OUTPUT_SIZES["pointer"] / lib.OUTPUT_SIZES["countdown"]
        ),
        "machine": lib.machine_info(),
        "seeds": per_seed,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "init_gradients.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    for key in per_seed[0]["ratio"]:
        values = [s["ratio"][key] for s in per_seed]
        print(f"{key:>26}: {statistics.fmean(values):.4g} (per seed {values})")
    for key in ("loss", "linear_share", "mean_abs_derivative"):
        print(key, [s[key] for s in per_seed])
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
