"""Watch what each task sends into the shared layers, from a plain PyTorch training loop.

A two-head model (a shared per-time-step encoder, a pointer head with 2 outputs on the pooled
features, a countdown head with one output per time step) trains on a `LossNormalizer` total.
Every `--log-every` steps the script logs, to TensorBoard's `SummaryWriter` when `tensorboard`
is installed and to stdout otherwise:

- `normalizer.log_dict()`: each task's raw loss, their plain sum `loss/sum`, the normalized
  total `loss/total` and the weight the normalizer applied to each task;
- when `balanced_losses.diagnostics` is available, what its `GradientMonitor` measured on the
  shared encoder every `--every` steps: each task's gradient norm and share.

Run::

    pip install -e ".[tensorboard]"
    python examples/monitor_tensorboard.py --steps 500 --logdir runs/monitor
    tensorboard --logdir runs

`BL_SMOKE=1` (or a small `--steps`) runs a few steps, as CI does.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import balanced_losses as bl

try:  # The gradient diagnostics are optional here: without them the weights are logged alone.
    from balanced_losses.diagnostics import GradientMonitor
except ImportError:
    GradientMonitor = None

SMOKE = os.environ.get("BL_SMOKE", "") not in ("", "0")
STEPS = 105  # time steps per sample: the countdown head has one output per step
CHANNELS = 4


class TwoHeadModel(nn.Module):
    """A shared per-step encoder, a pointer head (2 outputs) and a countdown head (1 per step)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(CHANNELS, hidden), nn.Tanh(), nn.Linear(hidden, hidden)
        )
        self.pointer_head = nn.Linear(hidden, 2)
        self.countdown_head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        feats = torch.tanh(self.encoder(x))  # (batch, steps, hidden)
        pointer = self.pointer_head(feats.mean(dim=1))  # (batch, 2)
        countdown = self.countdown_head(feats).squeeze(-1)  # (batch, steps)
        return pointer, countdown


def make_batch(batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Synthetic data: an event between two positions; targets are its scaled start/end and,
    per step, the (clipped) number of steps until it starts."""
    x = torch.randn(batch_size, STEPS, CHANNELS, generator=generator)
    start = torch.randint(10, STEPS - 30, (batch_size,), generator=generator)
    end = start + torch.randint(5, 25, (batch_size,), generator=generator)
    steps = torch.arange(STEPS)
    inside = (steps >= start[:, None]) & (steps < end[:, None])
    x[..., 0] += 2.0 * inside  # the event is visible in channel 0
    pointer = torch.stack([start, end], dim=1).float() / STEPS
    countdown = (start[:, None] - steps).float()  # bars until the event; clipped by the loss
    return x, pointer, countdown


def log_scalars(writer: Any, values: Mapping[str, float], step: int) -> None:
    """Send scalars to TensorBoard, or print them when there is no writer."""
    if writer is not None:
        for tag, value in values.items():
            writer.add_scalar(tag, value, step)
    else:
        shown = "  ".join(f"{tag}={value:.4g}" for tag, value in values.items())
        print(f"step {step:5d}  {shown}")


def open_writer(logdir: Path | None, enabled: bool) -> Any:
    """A SummaryWriter when tensorboard is installed and wanted, else None (print instead)."""
    if not enabled:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard needs the `tensorboard` package
        print("tensorboard is not installed; printing instead (pip install tensorboard)")
        return None
    writer = SummaryWriter(log_dir=None if logdir is None else str(logdir))
    print(f"logging to {writer.log_dir}; view with: tensorboard --logdir {writer.log_dir}")
    return writer


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6 if SMOKE else 500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--every",
        type=int,
        default=2 if SMOKE else 50,
        help="measure per-task gradients every N steps",
    )
    parser.add_argument("--log-every", type=int, default=1 if SMOKE else 50)
    parser.add_argument("--logdir", type=Path, default=None)
    parser.add_argument("--no-tensorboard", action="store_true", help="print instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    model = TwoHeadModel()
    sizes = {"pointer": 2, "countdown": STEPS}
    normalizer = bl.LossNormalizer(list(sizes), output_sizes=sizes, correction="sqrt")
    pointer_loss = bl.HuberLoss(delta=1.0)
    countdown_loss = bl.HuberLoss(delta=1.0, target_clip=(-20.0, 20.0))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    monitor = None
    if GradientMonitor is not None:
        # Measured on the shared encoder: where the tasks compete.
        monitor = GradientMonitor(list(model.encoder.parameters()), every=args.every)
    else:
        print("balanced_losses.diagnostics is not available; logging the weights only")
    writer = open_writer(args.logdir, enabled=not args.no_tensorboard)

    last: dict[str, float] = {}
    for step in range(1, args.steps + 1):
        x, y_pointer, y_countdown = make_batch(args.batch_size, generator)
        pred_pointer, pred_countdown = model(x)
        losses = {
            "pointer": pointer_loss(pred_pointer, y_pointer),
            "countdown": countdown_loss(pred_countdown, y_countdown),
        }
        if monitor is not None:
            # Before backward: the monitor differentiates each loss on its own, on its steps only.
            monitor.step(losses)
        total = normalizer(losses)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

        if step % args.log_every == 0 or step == args.steps:
            # Floats, read with one host-device sync: only on logging steps. (This loop picks
            # its logging steps itself, the last one included, so `every` stays 1.)
            last = normalizer.log_dict()
            if monitor is not None:
                last.update({f"gradient/{k}": float(v) for k, v in monitor.as_dict().items()})
            log_scalars(writer, last, step)
    if writer is not None:
        writer.close()
    return last


if __name__ == "__main__":
    main()
