"""Feed balanced_losses' Huber losses and loss normalization into TorchJD's Jacobian descent.

TorchJD (``pip install balanced-losses[torchjd]``) combines per-task gradients on the shared
parameters with an aggregator such as UPGrad. It takes one loss per task, so the balancing done
here is per-task scaling: either the reduction-factor correction alone (a fixed sqrt(N) factor
per task) or LossNormalizer's weights (running-mean normalization times that correction). The
weights are constants of the backward pass, so scaling each loss by them is exactly what the
normalizer's total would give each task.

    python examples/torchjd_interop.py --steps 200 --balance normalizer

Use a balanced_losses weighting with a plain ``backward()`` when one backward pass must do (it
is cheaper and works with DDP and AMP as usual); use TorchJD's aggregators when the tasks'
gradients conflict and you want them resolved per parameter update, at the cost of one
Jacobian row per task.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor, nn
from torchjd.aggregation import UPGrad
from torchjd.autojac import jac_to_grad, mtl_backward

from balanced_losses import HuberLoss, LossNormalizer
from balanced_losses.functional import reduction_factors

OUTPUT_SIZES = {"pointer": 2, "countdown": 24}


class TwoHeads(nn.Module):
    """A shared encoder with a 2-output pointer head and a 24-output countdown head."""

    def __init__(self, inputs: int = 8, hidden: int = 32) -> None:
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh())
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, n) for t, n in OUTPUT_SIZES.items()})

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        features = self.encoder(x)
        return features, {t: head(features) for t, head in self.heads.items()}


def make_batch(generator: torch.Generator, batch: int = 32) -> tuple[Tensor, dict[str, Tensor]]:
    x = torch.randn(batch, 8, generator=generator)
    pointer = torch.stack([x[:, 0].sigmoid(), x[:, 1].sigmoid()], dim=1)
    # Large residuals: the countdown loss sits in Huber's linear regime, where its gradient per
    # element is capped at delta however large the loss.
    countdown = 10 * x[:, 2:3] + torch.arange(24.0) - 12.0
    return x, {"pointer": pointer, "countdown": countdown}


def balance_losses(
    raw: dict[str, Tensor], balance: str, normalizer: LossNormalizer | None
) -> list[Tensor]:
    """Scale each task's loss by its balancing weight, in ``OUTPUT_SIZES`` order."""
    if balance == "normalizer":
        assert normalizer is not None
        normalizer(raw)  # updates the running means; last_weights are this step's constants
        weights = dict(zip(normalizer.tasks, normalizer.last_weights.clone(), strict=True))
    else:
        factors = reduction_factors(OUTPUT_SIZES, "sqrt")
        weights = {t: torch.tensor(factors[t]) for t in OUTPUT_SIZES}
    return [weights[t] * raw[t] for t in OUTPUT_SIZES]


def train(steps: int, balance: str, seed: int = 0) -> dict[str, float]:
    """Train with UPGrad for ``steps`` steps; return the last raw loss of each task."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = TwoHeads()
    huber = HuberLoss(delta=1.0, target_clip=(-20.0, 20.0))
    normalizer = LossNormalizer(OUTPUT_SIZES, correction="sqrt")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    aggregator = UPGrad()
    raw: dict[str, Tensor] = {}
    for _ in range(steps):
        x, targets = make_batch(generator)
        features, outputs = model(x)
        raw = {t: huber(outputs[t], targets[t]) for t in OUTPUT_SIZES}
        scaled = balance_losses(raw, balance, normalizer)
        optimizer.zero_grad()
        mtl_backward(scaled, features=features)
        jac_to_grad(model.encoder.parameters(), aggregator)
        optimizer.step()
    return {t: loss.item() for t, loss in raw.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="training steps (default 20)")
    parser.add_argument(
        "--balance",
        choices=["normalizer", "factors"],
        default="normalizer",
        help="LossNormalizer weights, or the reduction-factor correction alone",
    )
    args = parser.parse_args()
    first = train(1, args.balance)
    last = train(args.steps, args.balance)
    for task in OUTPUT_SIZES:
        print(
            f"{task:>9}: loss {first[task]:.4f} at step 1 -> {last[task]:.4f} at step {args.steps}"
        )


if __name__ == "__main__":
    main()
