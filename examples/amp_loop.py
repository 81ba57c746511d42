"""A plain training loop with torch.autocast (float16) and torch.amp.GradScaler, balanced by
CalibratedBalancer, the package's calibrate-then-freeze method at the shared features.

CalibratedBalancer is a feature-level method, attached to the model's trunk; the model's forward
is unchanged. Both heads take the trunk's output as it is, so they are named
(`heads={"kind": "kind", "position": "position"}`): each head then receives its task's view of
the trunk's output, and the balancing happens inside the scaled backward pass. The order within
a step:

    balancer.attach(model, "trunk", heads={...})    # once, before training
    with torch.autocast(device, dtype=torch.float16):
        outputs = model(x)                          # the heads read per-task views
    losses = {...}                                  # in float32, from the outputs cast up
    total = balancer(losses)                        # the real (unscaled) losses
    scaler.scale(total).backward()                  # the balancer measures scaled gradients
    scaler.step(optimizer)                          # unscales; skips the step on inf/NaN
    scaler.update()
    logs = balancer.log_dict(every=N)               # {} but on every N-th step: no sync there

Name the heads under a GradScaler. Without them (`attach(model, "trunk")`), each task's gradient
is measured when `balancer(losses)` is called, before `scaler.scale` multiplies the total; in
this release the trunk then receives the balanced gradient without the scaler's factor, which
`scaler.step` divides out of every gradient.

The weighting sees the losses before scaling, so its loss values are the real ones. While it
calibrates (its first `--calibration-steps` steps), the feature gradients it measures carry the
scaler's factor; it rescales each task by a ratio of two norms that both carry it (the tasks'
mean norm over this task's), so the factor cancels. Then it fixes the multipliers it reached:
every later step is a weighted sum of the losses, with nothing measured at the trunk. It has no
parameters of its own, so the optimizer takes the model's only.

`--weighting dbmtl` runs the same loop with DBMTL (log-transformed losses, and their gradients
balanced at the trunk at every step): its gradient half rescales by the same kind of ratio.

In torch 2.13, CPU autocast supports float16 and `GradScaler("cpu")` works, so the same loop
runs on CPU and on CUDA:

    python examples/amp_loop.py                  # CPU, float16 autocast + GradScaler
    python examples/amp_loop.py --device cuda    # the same on a GPU
    python examples/amp_loop.py --smoke          # a few steps, calibrating over 4, as CI runs it
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import balanced_losses as bl

SMOKE = os.environ.get("BL_SMOKE", "") not in ("", "0")
CLASSES = 5
TASKS = ("kind", "position")
WEIGHTINGS = ("calibrated", "dbmtl")


class TwoHeads(nn.Module):
    """A shared trunk, a classification head and a regression head (3 outputs)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.kind = nn.Linear(hidden, CLASSES)
        self.position = nn.Linear(hidden, 3)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        feats = self.trunk(x)
        return {"kind": self.kind(feats), "position": self.position(feats)}


def make_batch(gen: torch.Generator, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic data: the class is the argmax of 5 inputs; the position is a scaled linear map."""
    x = torch.randn(size, 8, generator=gen)
    kind = x[:, :CLASSES].argmax(dim=1)
    position = 50.0 * x[:, 5:] + 10.0  # a large-valued target: its loss dwarfs the other's
    return x, kind, position


def make_weighting(name: str, calibration_steps: int = 100) -> bl.CalibratedBalancer | bl.DBMTL:
    """``CalibratedBalancer`` (``"calibrated"``) or ``DBMTL`` (``"dbmtl"``) for the two tasks."""
    if name == "calibrated":
        return bl.CalibratedBalancer(TASKS, steps=calibration_steps)
    if name == "dbmtl":
        return bl.DBMTL(TASKS)
    raise ValueError(f"`name` must be one of {WEIGHTINGS}, got {name!r}")


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="calibrated")
    parser.add_argument(
        "--calibration-steps", type=int, default=100, help="CalibratedBalancer's `steps`"
    )
    parser.add_argument("--smoke", action="store_true", help="a few steps (as CI runs it)")
    args = parser.parse_args(argv)
    if args.smoke or SMOKE:
        # Calibrating over 4 of the 6 steps: the log lines show both phases.
        args.steps, args.log_every, args.calibration_steps = 6, 2, 4

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = TwoHeads().to(device)
    balancer = make_weighting(args.weighting, args.calibration_steps).to(device)  # buffers only
    # Hooks on the trunk: in training, each head's input becomes its task's view of the features.
    balancer.attach(model, "trunk", heads={"kind": "kind", "position": "position"})
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type)
    gen = torch.Generator().manual_seed(0)

    logged: dict[str, float] = {}
    for step in range(1, args.steps + 1):
        x, kind, position = (t.to(device) for t in make_batch(gen, args.batch_size))
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16):
            out = model(x)
        # Losses in float32: the float16 outputs cast up, so a large squared error cannot overflow.
        losses = {
            "kind": F.cross_entropy(out["kind"].float(), kind),
            "position": F.mse_loss(out["position"].float(), position),
        }
        total = balancer(losses)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        # Steps 1, 1 + N, 1 + 2N, ...: the raw losses, their plain sum (`loss/sum`, the number to
        # compare with a plain-sum run), the weights and, while the balancer measures, each
        # task's share of the gradient sent into the trunk. One device sync, on those steps.
        logs = balancer.log_dict(every=args.log_every)
        if logs:
            logged = logs | {"scale": scaler.get_scale()}
            print(f"step {step:4d} " + " ".join(f"{k}={v:.4g}" for k, v in logged.items()))
    return logged


if __name__ == "__main__":
    main()
