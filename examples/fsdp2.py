"""Multi-task training sharded with FSDP2 (`fully_shard`), balanced by a balanced_losses weighting.

The trunk and each head are sharded with `fully_shard`; a root module (`TrainStep`) holds the
model and the weighting and returns the weighting's total from its forward, and is sharded last:

- a weighting with learned parameters (UncertaintyWeighting's log-variances) is then sharded
  with the model, its gradients reduced over the ranks, its parameters stepped by the optimizer,
  and it must be called inside the root's forward (where FSDP has gathered its parameters);
- GradNorm is built after `fully_shard(trunk)`, on the trunk's parameters as FSDP registered them;
- a feature-level method (CalibratedBalancer here) routes the trunk's output
  through `branch` in the forward; once it has fixed its weights, `branch` routes nothing;
- the weighting's buffers are synchronized by the weighting itself (`sync_dist=True`), so all
  ranks hold the same statistics and weights.

Run on 2 processes, either with torchrun (gloo on CPU, NCCL on GPUs):

    torchrun --nproc-per-node 2 examples/fsdp2.py --weighting gradnorm

or as a plain script that spawns 2 CPU processes itself:

    python examples/fsdp2.py                  # CalibratedBalancer
    python examples/fsdp2.py --weighting uncertainty
    python examples/fsdp2.py --smoke          # 4 steps of every weighting (calibrating over 2)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

import balanced_losses as bl

TASKS = ("kind", "position")
CLASSES = 5
WEIGHTINGS = ("calibrated", "gradnorm", "uncertainty")


class MultiTask(nn.Module):
    """A shared trunk and two heads: a 5-way classification and a 3-output regression."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, hidden), nn.Tanh(), nn.Linear(hidden, hidden))
        self.heads = nn.ModuleDict(
            {"kind": nn.Linear(hidden, CLASSES), "position": nn.Linear(hidden, 3)}
        )


class TrainStep(nn.Module):
    """The FSDP root: runs the model, computes the losses and returns the weighting's total."""

    def __init__(self, model: MultiTask, weighting: bl.Weighting, feature_level: bool) -> None:
        super().__init__()
        self.model, self.weighting, self.feature_level = model, weighting, feature_level

    def forward(
        self, x: Tensor, kind: Tensor, position: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        feats = self.model.trunk(x)
        views = self.weighting.branch(feats) if self.feature_level else dict.fromkeys(TASKS, feats)
        losses = {
            "kind": F.cross_entropy(self.model.heads["kind"](views["kind"]), kind),
            "position": F.mse_loss(self.model.heads["position"](views["position"]), position),
        }
        return self.weighting(losses), losses


def build(weighting: str, calibration_steps: int) -> tuple[TrainStep, bl.Weighting]:
    torch.manual_seed(0)  # the same initial model on every rank
    model = MultiTask()
    fully_shard(model.trunk)
    for head in model.heads.values():
        fully_shard(head)
    if weighting == "gradnorm":
        # After fully_shard: the trunk's last layer as FSDP registered it (sharded DTensors).
        method: bl.Weighting = bl.GradNorm(TASKS, model.trunk[-1].parameters(), lr=0.02)
    elif weighting == "uncertainty":
        method = bl.UncertaintyWeighting(TASKS)
    else:
        # Its gradient norms are averaged over the ranks (sync_dist): every rank freezes the same
        # weights.
        method = bl.CalibratedBalancer(TASKS, steps=calibration_steps)
    root = TrainStep(model, method, feature_level=weighting == "calibrated")
    fully_shard(root)  # shards what is left: the weighting's own parameters, if any
    return root, method


def batch(rank: int, step: int, size: int = 32) -> tuple[Tensor, Tensor, Tensor]:
    """This rank's part of the global batch of a step (each rank draws different samples)."""
    gen = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(size, 8, generator=gen)
    return x, x[:, :CLASSES].argmax(dim=1), 30.0 * x[:, 5:] + 5.0


def full(value: Any) -> Any:
    """A plain tensor from a DTensor (a collective: every rank must call it)."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def train(
    weighting: str, steps: int, calibration_steps: int, device: torch.device
) -> dict[str, float]:
    rank = dist.get_rank()
    root, method = build(weighting, calibration_steps)
    # root.parameters(): the model's and the weighting's learned parameters, all sharded.
    optimizer = torch.optim.AdamW(root.parameters(), lr=1e-3)
    for step in range(steps):
        x, kind, position = (t.to(device) for t in batch(rank, step))
        optimizer.zero_grad()
        total, _losses = root(x, kind, position)  # the losses, for logging
        total.backward()
        optimizer.step()
    # The weights: computed from the (gathered) parameters or the synchronized buffers.
    weights = dict(zip(method.tasks, method.last_weights.tolist(), strict=True))
    # The weighting's state: DTensors (sharded learned parameters) gathered to plain tensors.
    state = {k: full(v) for k, v in method.state_dict().items()}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, state)
    same = all(
        torch.equal(v, other[k]) if isinstance(v, Tensor) else v == other[k]
        for other in gathered
        for k, v in state.items()
    )
    if not same:
        raise RuntimeError(f"{weighting}: the ranks hold different weighting states")
    if rank == 0:
        frozen = isinstance(method, bl.CalibratedBalancer) and method.frozen
        phase = f" (fixed after {calibration_steps} steps)" if frozen else ""
        print(f"{weighting}: weights after {steps} steps {weights}{phase}; identical on all ranks")
    return weights


def run(args: argparse.Namespace) -> None:
    use_cuda = torch.cuda.is_available() and args.device != "cpu"
    device = (
        torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if use_cuda
        else torch.device("cpu")
    )
    if use_cuda:
        torch.cuda.set_device(device)
    for weighting in WEIGHTINGS if args.smoke else (args.weighting,):
        train(weighting, args.steps, args.calibration_steps, device)


def _spawned(rank: int, init_file: str, world: int, args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        run(args)
        # No rank tears gloo down while another still has collectives in flight.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    # Leave without running the interpreter's teardown: in torch 2.13 a spawned FSDP2 worker
    # sometimes aborted there ("terminate called without an active exception") after its work
    # was done, failing the run. Everything is printed and the process group is destroyed.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weighting", choices=WEIGHTINGS, default="calibrated")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--calibration-steps", type=int, default=100, help="CalibratedBalancer's `steps`"
    )
    parser.add_argument("--device", choices=("auto", "cpu"), default="auto")
    parser.add_argument("--nproc", type=int, default=2, help="processes to spawn without torchrun")
    parser.add_argument("--smoke", action="store_true", help="4 steps of every weighting on CPU")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.calibration_steps, args.device = 4, 2, "cpu"
    if "RANK" in os.environ:  # started by torchrun: one process per rank already
        cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group("nccl" if cuda else "gloo")
        try:
            run(args)
            dist.barrier()
        finally:
            dist.destroy_process_group()
        return
    args.device = "cpu"  # spawned processes share this machine's CPU (gloo)
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_spawned, args=(os.path.join(tmp, "init"), args.nproc, args), nprocs=args.nproc)


if __name__ == "__main__":
    main()
