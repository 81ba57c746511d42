"""A plain training loop with torch.autocast (float16) and torch.amp.GradScaler, balanced by DBMTL.

DBMTL is a feature-level method: the shared features go through `dbmtl.branch` before the
heads, and each head reads its own view. The order within a step:

    with torch.autocast(device, dtype=torch.float16):
        views = dbmtl.branch(trunk(x))          # inside autocast, like the rest of the forward
        outputs = heads(views)
    losses = {...}                              # in float32, from the outputs cast up
    total = dbmtl(losses)                       # the real (unscaled) losses
    scaler.scale(total).backward()              # the balancer measures scaled feature gradients
    scaler.step(optimizer)                      # unscales; skips the step on inf/NaN gradients
    scaler.update()

The weighting sees the losses before scaling, so its loss statistics are the real ones. In the
backward pass the feature gradients carry the scaler's factor; DBMTL's gradient half rescales
each task by a ratio of two norms that both carry it, so the factor cancels. The weighting has
no parameters of its own here (DBMTL has none), so the optimizer takes the model's only.

In torch 2.13, CPU autocast supports float16 and `GradScaler("cpu")` works, so the same loop
runs on CPU and on CUDA:

    python examples/amp_loop.py                  # CPU, float16 autocast + GradScaler
    python examples/amp_loop.py --device cuda    # the same on a GPU
    python examples/amp_loop.py --smoke          # a few steps, as CI runs it
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


class TwoHeads(nn.Module):
    """A shared trunk, a classification head and a regression head (3 outputs)."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, hidden), nn.GELU(), nn.Linear(hidden, hidden))
        self.kind = nn.Linear(hidden, CLASSES)
        self.position = nn.Linear(hidden, 3)

    def forward(self, x: Tensor, weighting: bl.Weighting) -> dict[str, Tensor]:
        views = weighting.branch(self.trunk(x))
        return {"kind": self.kind(views["kind"]), "position": self.position(views["position"])}


def make_batch(gen: torch.Generator, size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic data: the class is the argmax of 5 inputs; the position is a scaled linear map."""
    x = torch.randn(size, 8, generator=gen)
    kind = x[:, :CLASSES].argmax(dim=1)
    position = 50.0 * x[:, 5:] + 10.0  # a large-valued target: its loss dwarfs the other's
    return x, kind, position


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--smoke", action="store_true", help="a few steps (as CI runs it)")
    args = parser.parse_args(argv)
    if args.smoke or SMOKE:
        args.steps, args.log_every = 6, 2

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = TwoHeads().to(device)
    dbmtl = bl.DBMTL(TASKS).to(device)  # buffers only: nothing for the optimizer
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type)
    gen = torch.Generator().manual_seed(0)

    logged: dict[str, float] = {}
    for step in range(1, args.steps + 1):
        x, kind, position = (t.to(device) for t in make_batch(gen, args.batch_size))
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.float16):
            out = model(x, dbmtl)
        # Losses in float32: the float16 outputs cast up, so a large squared error cannot overflow.
        losses = {
            "kind": F.cross_entropy(out["kind"].float(), kind),
            "position": F.mse_loss(out["position"].float(), position),
        }
        total = dbmtl(losses)
        scaler.scale(total).backward()
        scaler.step(optimizer)
        scaler.update()
        if step % args.log_every == 0 or step == args.steps:
            # .item() syncs with the device: only on logging steps.
            logged = {f"loss/{t}": loss.item() for t, loss in losses.items()}
            logged |= {f"weight/{t}": w.item() for t, w in dbmtl.weights.items()}
            logged["scale"] = scaler.get_scale()
            print(f"step {step:4d} " + " ".join(f"{k}={v:.4g}" for k, v in logged.items()))
    return logged


if __name__ == "__main__":
    main()
