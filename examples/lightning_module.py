"""A PyTorch Lightning `LightningModule` that balances two tasks with a `balanced_losses` weighting.

The weighting is a submodule of the LightningModule, so

- its learned parameters (UncertaintyWeighting's log-variances) are in `self.parameters()` and
  reach the optimizer without extra code;
- its state (CalibratedBalancer's gradient norms, step count and frozen multipliers, learned
  parameters, or LossNormalizer's running means and counts) is saved in Lightning checkpoints
  and restored by `load_from_checkpoint`, which the script checks at the end;
- Lightning's `train()`/`eval()` switching freezes its statistics during validation.

What is logged comes from `self.weighting.log_dict()`, called in `on_train_batch_end` (after
backward and the optimizer step) on the steps Lightning writes to its logger (every
`log_every_n_steps`) and only there, so the other steps never wait for the device: each task's
raw loss, their plain sum `loss/sum` (the number to compare with a validation loss; the
weighting's total `loss/total` is what it differentiates), the weights and, for a feature-level
method, each task's share of the gradient sent into the encoder (`grad_share/<task>`).
Lightning writes a metric's last value again on the steps after it was logged: once
CalibratedBalancer has frozen its weights (and logs no shares any more), the `grad_share`
columns repeat the last shares it measured.

The default, `--weighting calibrated`, is CalibratedBalancer, the package's calibrate-then-freeze
method at the shared features: a feature-level method, attached to the encoder in `__init__`
(`self.weighting.attach(self, "encoder")`), so `losses` stays as it is. No heads are named,
since the pointer head takes the time-pooled features: each task's gradient at the encoder's
output is measured through its own head when the weighting is called. For its first
`--calibration-steps` steps it balances those gradients (and logs each task's share), then fixes
the multipliers it reached as loss weights.

Run::

    pip install -e ".[lightning]"
    python examples/lightning_module.py --epochs 5                          # CalibratedBalancer
    python examples/lightning_module.py --epochs 5 --weighting uncertainty  # learned weights
    python examples/lightning_module.py --epochs 5 --weighting normalizer

`BL_SMOKE=1` (or `--steps N`) runs a few steps on CPU, as CI does (calibrating over the first 2
of its 4 steps); `--fast-dev-run` runs Lightning's one-batch check (which disables logging and
checkpoints).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import balanced_losses as bl

SMOKE = os.environ.get("BL_SMOKE", "") not in ("", "0")
STEPS = 105  # time steps per sample: the countdown head has one output per step
CHANNELS = 4
WEIGHTINGS = ("calibrated", "uncertainty", "normalizer")


def make_dataset(samples: int, seed: int) -> TensorDataset:
    """Synthetic data: an event between two positions; targets are its scaled start/end and,
    per step, the number of steps until it starts."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, STEPS, CHANNELS, generator=gen)
    start = torch.randint(10, STEPS - 30, (samples,), generator=gen)
    end = start + torch.randint(5, 25, (samples,), generator=gen)
    steps = torch.arange(STEPS)
    x[..., 0] += 2.0 * ((steps >= start[:, None]) & (steps < end[:, None]))
    pointer = torch.stack([start, end], dim=1).float() / STEPS
    countdown = (start[:, None] - steps).float()
    return TensorDataset(x, pointer, countdown)


class TwoTaskModule(L.LightningModule):
    """Shared per-step encoder, pointer head (2 outputs), countdown head (1 output per step)."""

    def __init__(
        self,
        weighting: str = "calibrated",
        hidden: int = 32,
        lr: float = 1e-3,
        calibration_steps: int = 100,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.encoder = nn.Sequential(
            nn.Linear(CHANNELS, hidden), nn.Tanh(), nn.Linear(hidden, hidden)
        )
        self.pointer_head = nn.Linear(hidden, 2)
        self.countdown_head = nn.Linear(hidden, 1)
        self.pointer_loss = bl.HuberLoss(delta=1.0)
        self.countdown_loss = bl.HuberLoss(delta=1.0, target_clip=(-20.0, 20.0))
        # A submodule: its state goes into every Lightning checkpoint with the model's.
        if weighting == "calibrated":
            balancer = bl.CalibratedBalancer(["pointer", "countdown"], steps=calibration_steps)
            # Hooks on self.encoder; `losses` below is unchanged. Measured (no heads named): the
            # pointer head reads the pooled features, not the encoder's output itself.
            balancer.attach(self, "encoder")
            self.weighting: bl.Weighting = balancer
        elif weighting == "uncertainty":
            self.weighting = bl.UncertaintyWeighting(["pointer", "countdown"])
        elif weighting == "normalizer":
            self.weighting = bl.LossNormalizer(
                {"pointer": 2, "countdown": STEPS}, correction="sqrt"
            )
        else:
            raise ValueError(f"`weighting` must be one of {WEIGHTINGS}, got {weighting!r}")

    def losses(self, batch: tuple[Tensor, Tensor, Tensor]) -> dict[str, Tensor]:
        x, y_pointer, y_countdown = batch
        feats = torch.tanh(self.encoder(x))
        return {
            "pointer": self.pointer_loss(self.pointer_head(feats.mean(dim=1)), y_pointer),
            "countdown": self.countdown_loss(self.countdown_head(feats).squeeze(-1), y_countdown),
        }

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        losses = self.losses(batch)
        return self.weighting(losses)

    def on_train_batch_end(self, outputs: object, batch: object, batch_idx: int) -> None:
        # After backward and the optimizer step, on the steps Lightning writes to its logger (it
        # writes once `global_step` is a multiple of `log_every_n_steps`; a value logged on
        # another step would be written later under the wrong step). One host-device sync there.
        if self.global_step % self.trainer.log_every_n_steps == 0:
            self.log_dict(self.weighting.log_dict())

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        # Lightning has put the module, weighting included, in eval mode: statistics are frozen.
        losses = self.losses(batch)
        self.log_dict({f"val_loss/{task}": loss for task, loss in losses.items()})

    def configure_optimizers(self) -> torch.optim.Optimizer:
        # self.parameters() includes the weighting's learned parameters, if it has any.
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="calibrated")
    parser.add_argument(
        "--calibration-steps",
        type=int,
        default=2 if SMOKE else 100,
        help="CalibratedBalancer's `steps`",
    )
    parser.add_argument("--epochs", type=int, default=1 if SMOKE else 5)
    parser.add_argument(
        "--steps",
        type=int,
        default=4 if SMOKE else -1,
        help="stop after this many optimizer steps (-1: run all epochs)",
    )
    parser.add_argument("--samples", type=int, default=256 if SMOKE else 2048)
    parser.add_argument("--fast-dev-run", action="store_true")
    parser.add_argument("--logdir", type=Path, default=Path("lightning_logs"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    L.seed_everything(args.seed, verbose=False)
    # A CPU example: Lightning's advice to use more loader workers is noise here.
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    train = DataLoader(make_dataset(args.samples, args.seed), batch_size=32, shuffle=True)
    val = DataLoader(make_dataset(args.samples // 4, args.seed + 1), batch_size=64)
    model = TwoTaskModule(weighting=args.weighting, calibration_steps=args.calibration_steps)
    quick = SMOKE or 0 < args.steps <= 50
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        # A short run is one truncated epoch, so that validation still runs at its end.
        max_epochs=1 if quick else args.epochs,
        max_steps=args.steps,
        limit_train_batches=args.steps if quick else 1.0,
        fast_dev_run=args.fast_dev_run,
        logger=CSVLogger(args.logdir, name=f"two_task_{args.weighting}"),
        log_every_n_steps=1 if quick else 50,
        limit_val_batches=2 if quick else 1.0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=not quick,
        enable_model_summary=not quick,
    )
    trainer.fit(model, train, val)
    weighting = model.weighting
    last = weighting.last_weights.tolist()
    weights = {t: round(w, 4) for t, w in zip(weighting.tasks, last, strict=True)}
    print(f"weights at the last step: {weights}")
    if args.fast_dev_run:
        return {f"weight/{task}": w for task, w in weights.items()}

    # The weighting's state travels in the Lightning checkpoint.
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "last.ckpt"
        trainer.save_checkpoint(path)
        restored = TwoTaskModule.load_from_checkpoint(path, map_location="cpu")
    saved = model.weighting.state_dict()
    loaded = restored.weighting.state_dict()
    same = all(
        torch.equal(value, loaded[key]) if isinstance(value, torch.Tensor) else value == loaded[key]
        for key, value in saved.items()
    )
    if saved.keys() != loaded.keys() or not same:
        raise RuntimeError("the weighting's state did not survive the checkpoint round trip")
    print(f"checkpoint round trip restored weighting state: {sorted(saved)}")
    if trainer.logger is not None:
        print(f"metrics written to {trainer.logger.log_dir}/metrics.csv")
    return {k: float(v) for k, v in trainer.logged_metrics.items()}


if __name__ == "__main__":
    main()
