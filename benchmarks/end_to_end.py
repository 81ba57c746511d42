"""Whole training steps of realistic multi-task models: the package's methods, TorchJD and a sum.

Three models, in the shapes the field trains, on random inputs and targets of those shapes
(enough for speed and memory, which do not depend on the values; no quality is measured here):

- ``nyuv2``: a dense-prediction encoder-decoder in the NYUv2 shape. A convolutional encoder to
  1/8 resolution is shared; three decoders (3x3 conv, upsampling to the input size, 1x1 conv)
  predict 13-class segmentation (cross-entropy), depth (L1) and surface normals (one minus the
  cosine similarity). Full size: 288 x 384 inputs, batch 8, 256 shared channels.
- ``celeba``: a 40-task classifier in the CelebA shape: a ResNet-18 trunk (BasicBlocks 2-2-2-2)
  pooled to one vector, a linear head per attribute with a binary cross-entropy. Full size:
  64 x 64 inputs, batch 256, widths 64-512.
- ``gru``: the demo's model, the bidirectional GRU of ``benchmarks/aggregators_speed.py`` over
  105 time steps with three heads.

The shared features are the trunk's output (the encoder's map, the pooled vector, the GRU's
sequence); the package's methods branch there (``views = method.branch(feats)``), TorchJD's
``autojac`` takes the Jacobian of the losses with respect to the trunk's parameters
(``mtl_backward`` then ``jac_to_grad`` with ``UPGrad``) and its ``autogram`` engine builds the
Gramian at the trunk's parameters without storing the Jacobian (``Engine(trunk).compute_gramian``,
``UPGradWeighting``, then ``losses.backward(weights)``). A step is forward, the combination,
backward and an Adam step.

``--size reduced`` (the default on the CPU) scales every model down so that the CPU runs all of
them in minutes: 72 x 96 inputs, batch 2 and a quarter of the channels for ``nyuv2``; 32 x 32,
batch 32 and a quarter of the widths for ``celeba``; batch 8 for ``gru``. ``--size full`` is the
shapes above (the default on a GPU).

Time and memory are measured as in ``benchmarks/aggregators_speed.py``, with the helpers of
``benchmarks/timing.py``: each method has its own copy of the model and optimizer, every round
runs one step of each in a rotating order in one process, and the time ratio is the median over
rounds of the method's step over the same round's plain-sum step. On a GPU a step's time is
taken between two ``torch.cuda.synchronize()`` calls, and its peak memory is
``torch.cuda.max_memory_allocated`` above the step's starting level; on the CPU the peak of live
tensor bytes under ``torch.profiler``.

Usage (from the repository root)::

    python benchmarks/end_to_end.py                        # CPU, reduced sizes
    python benchmarks/end_to_end.py --device cuda          # GPU, full sizes
    python benchmarks/end_to_end.py --smoke --out /tmp/x   # seconds, for the slow test

Writes ``<out>/end_to_end_<device>.json``; ``benchmarks/render.py`` renders it into
``docs/conflicts.md``.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aggregators_speed as speed
import timing
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import balanced_losses as bl

try:
    from torchjd.aggregation import UPGrad as JDUPGrad
    from torchjd.aggregation import UPGradWeighting
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward
except ImportError:  # TorchJD is optional: its rows are skipped
    Engine = None

MODELS = ("nyuv2", "celeba", "gru")
#: The package's methods timed by default: the loss balancers at the features and the
#: aggregators (catalog keys).
DEFAULT_METHODS = (
    "gradient-balancer",
    "calibrated-balancer",
    "dbmtl",
    "upgrad",
    "mgda",
    "cagrad",
    "imtlg",
    "aligned-mtl",
    "nash-mtl",
    "fair-grad",
    "pcgrad",
    "con-fig",
)
#: The issue's goals on a GPU: the balancers' and every aggregator's step time as a ratio to a
#: plain sum's, by K, and peak memory.
GOALS = {"balancers": 1.03, "aggregators_k3": 1.10, "aggregators_k40": 1.25, "memory": 1.10}


# ---------------------------------------------------------------------------------- the models


class MultiTaskModel(nn.Module):
    """A shared trunk, one head per task, and each task's loss on its view of the features."""

    tasks: list[str]
    trunk: nn.Module

    def encode(self, x: Tensor) -> Tensor:
        return self.trunk(x)

    def losses(self, views: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
        raise NotImplementedError


def _conv(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
    )


class DenseNet(MultiTaskModel):
    """NYUv2 shape: encoder to 1/8 resolution; segmentation, depth and normals decoders."""

    OUTPUTS: ClassVar[dict[str, int]] = {"segmentation": 13, "depth": 1, "normals": 3}

    def __init__(self, width: int) -> None:
        super().__init__()
        self.tasks = list(self.OUTPUTS)
        w = width
        self.trunk = nn.Sequential(
            _conv(3, w, 2), _conv(w, w), _conv(w, 2 * w, 2), _conv(2 * w, 2 * w),
            _conv(2 * w, 4 * w, 2), _conv(4 * w, 4 * w),
        )  # fmt: skip
        self.heads = nn.ModuleList(
            nn.ModuleDict({"mix": _conv(4 * w, w), "out": nn.Conv2d(w, n, 1)})
            for n in self.OUTPUTS.values()
        )

    def losses(self, views: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
        seg, depth, normals = (
            head["out"](F.interpolate(head["mix"](view), scale_factor=8.0, mode="bilinear"))
            for head, view in zip(self.heads, views, strict=True)
        )
        return [
            F.cross_entropy(seg, targets[0]),
            F.l1_loss(depth, targets[1]),
            1.0 - F.cosine_similarity(normals, targets[2], dim=1).mean(),
        ]


class _Block(nn.Module):
    """ResNet's BasicBlock (He et al. 2016): two 3x3 convolutions and a shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(cin, cout, stride),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.short = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.short(x))


class AttributeNet(MultiTaskModel):
    """CelebA shape: a ResNet-18 trunk pooled to one vector, 40 binary heads."""

    def __init__(self, width: int, k: int = 40) -> None:
        super().__init__()
        self.tasks = [f"attr{i}" for i in range(k)]
        widths = [width, 2 * width, 4 * width, 8 * width]
        layers: list[nn.Module] = [_conv(3, width)]
        cin = width
        for i, cout in enumerate(widths):
            layers += [_Block(cin, cout, 1 if i == 0 else 2), _Block(cout, cout, 1)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(cin, 1) for _ in self.tasks)

    def losses(self, views: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
        return [
            F.binary_cross_entropy_with_logits(head(view).squeeze(-1), target)
            for head, view, target in zip(self.heads, views, targets, strict=True)
        ]


class SequenceNet(MultiTaskModel):
    """The demo's bidirectional GRU and heads (``benchmarks/aggregators_speed.py``)."""

    def __init__(self, heads: list[speed.Head]) -> None:
        super().__init__()
        self.net = speed.MultiHeadNet(speed.TRUNKS["demo"], heads)
        self.tasks = [h.name for h in heads]
        self.trunk = self.net.encoder

    def encode(self, x: Tensor) -> Tensor:
        return self.net.encode(x)

    def losses(self, views: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
        return self.net.losses(views, targets)


@dataclass(frozen=True)
class Config:
    """One model at one size: how to build it and its fixed batches."""

    model: str
    size: str
    build: Callable[[], MultiTaskModel]
    batches: Callable[[torch.device], list[tuple[Tensor, list[Tensor]]]]
    shape: dict[str, Any]


def _images(n: int, batch: int, h: int, w: int, device: torch.device) -> list[Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 3, h, w, generator=gen).to(device) for _ in range(n)]


def make_config(model: str, size: str, smoke: bool) -> Config:
    """The model at ``size``; ``smoke`` shrinks the reduced size further (seconds in all)."""
    full = size == "full"
    if model == "nyuv2":
        h, w, batch, width = (288, 384, 8, 64) if full else (72, 96, 2, 16)
        if smoke:
            h, w, width = 32, 48, 8

        def dense_batches(device: torch.device) -> list[tuple[Tensor, list[Tensor]]]:
            gen = torch.Generator().manual_seed(1)
            out = []
            for x in _images(2, batch, h, w, device):
                seg = torch.randint(0, 13, (batch, h, w), generator=gen).to(device)
                depth = torch.rand(batch, 1, h, w, generator=gen).to(device)
                normals = F.normalize(torch.randn(batch, 3, h, w, generator=gen), dim=1)
                out.append((x, [seg, depth, normals.to(device)]))
            return out

        shape = {"input": [batch, 3, h, w], "shared_channels": 4 * width, "tasks": 3}
        return Config(model, size, lambda: DenseNet(width), dense_batches, shape)
    if model == "celeba":
        side, batch, width = (64, 256, 64) if full else (32, 32, 16)
        if smoke:
            side, batch, width = 16, 8, 4

        def attribute_batches(device: torch.device) -> list[tuple[Tensor, list[Tensor]]]:
            gen = torch.Generator().manual_seed(1)
            out = []
            for x in _images(2, batch, side, side, device):
                labels = torch.randint(0, 2, (40, batch), generator=gen).float().to(device)
                out.append((x, list(labels)))
            return out

        shape = {"input": [batch, 3, side, side], "features": 8 * width, "tasks": 40}
        return Config(model, size, lambda: AttributeNet(width), attribute_batches, shape)
    heads = speed.make_heads(3)
    batch = 4 if smoke else (32 if full else 8)

    def sequence_batches(device: torch.device) -> list[tuple[Tensor, list[Tensor]]]:
        data = speed.lib.make_data(2 * batch, seed=1)
        out = []
        for i in range(0, 2 * batch, batch):
            part = data.index(slice(i, i + batch))
            out.append((part.x.to(device), [t.to(device) for t in speed.make_targets(part, heads)]))
        return out

    shape = {"input": [batch, speed.lib.T, speed.lib.CHANNELS], "tasks": 3}
    return Config(model, size, lambda: SequenceNet(heads), sequence_batches, shape)


# ---------------------------------------------------------------------------------- the steps

#: Everything between the losses and the optimizer step: fills the parameters' ``.grad``.
Backward = Callable[[MultiTaskModel, Tensor, list[Tensor]], None]


class Runner:
    """One method's model and optimizer on the fixed batches (a ``timing.Stepper``)."""

    def __init__(
        self,
        config: Config,
        device: torch.device,
        batches: list[tuple[Tensor, list[Tensor]]],
        backward: Backward,
        weighting: bl.Weighting | None = None,
        engine: Callable[[MultiTaskModel], Any] | None = None,
    ) -> None:
        torch.manual_seed(0)
        self.model = config.build().to(device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-4)
        self.weighting = None if weighting is None else weighting.to(device)
        self.backward = backward
        self.device = device
        self.batches = itertools.cycle(batches)
        if engine is not None:
            engine(self.model)

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def step(self) -> float:
        x, targets = next(self.batches)
        self._sync()
        start = time.perf_counter()
        feats = self.model.encode(x)
        if self.weighting is not None:
            views = self.weighting.branch(feats)
            losses = self.model.losses([views[t] for t in self.model.tasks], targets)
        else:
            losses = self.model.losses([feats] * len(targets), targets)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward(self.model, feats, losses)
        self.optimizer.step()
        if self.weighting is not None:
            self.weighting.after_step(lambda: self._recompute(x, targets))
        self._sync()
        return time.perf_counter() - start

    def _recompute(self, x: Tensor, targets: list[Tensor]) -> dict[str, Tensor]:
        with torch.no_grad():
            feats = self.model.encode(x)
            losses = self.model.losses([feats] * len(targets), targets)
        return dict(zip(self.model.tasks, losses, strict=True))


def plain_sum(model: MultiTaskModel, feats: Tensor, losses: list[Tensor]) -> None:
    torch.stack(losses).sum().backward()


def ours(weighting: bl.Weighting) -> Backward:
    def backward(model: MultiTaskModel, feats: Tensor, losses: list[Tensor]) -> None:
        weighting(dict(zip(model.tasks, losses, strict=True))).backward()

    return backward


def autojac(model: MultiTaskModel, feats: Tensor, losses: list[Tensor]) -> None:
    """TorchJD's Jacobian at the trunk's parameters, aggregated by its UPGrad."""
    mtl_backward(losses, features=feats)
    jac_to_grad(model.trunk.parameters(), JDUPGrad())


class Autogram:
    """TorchJD's Gramian at the trunk's parameters (hooks, no Jacobian), UPGrad's weights."""

    def __init__(self) -> None:
        self.engine: Any = None
        self.weighting = UPGradWeighting()

    def attach(self, model: MultiTaskModel) -> None:
        self.engine = Engine(model.trunk, batch_dim=None)

    def __call__(self, model: MultiTaskModel, feats: Tensor, losses: list[Tensor]) -> None:
        stacked = torch.stack(losses)
        weights = self.weighting(self.engine.compute_gramian(stacked))
        stacked.backward(weights)


@dataclass(frozen=True)
class Row:
    name: str
    family: str  # "baseline", "ours" or "torchjd"
    make: Callable[[list[str]], tuple[Backward, bl.Weighting | None, Any]]


def method_plan(keys: list[str]) -> tuple[list[Row], list[str]]:
    """A plain sum, the package's methods of ``keys``, TorchJD's two engines with UPGrad."""
    plan = [Row("sum", "baseline", lambda tasks: (plain_sum, None, None))]
    for key in keys:
        method = bl.catalog.get(key)

        def make(tasks: list[str], method: bl.catalog.Method = method) -> tuple[Any, ...]:
            weighting = method.build(tasks, seed=0)
            return ours(weighting), weighting, None

        plan.append(Row(method.label.strip("`"), "ours", make))
    notes = []
    if Engine is None:
        notes.append("TorchJD is not installed: no TorchJD rows")
    else:
        plan.append(Row("torchjd.autojac UPGrad", "torchjd", lambda tasks: (autojac, None, None)))

        def gram(tasks: list[str]) -> tuple[Any, ...]:
            engine = Autogram()
            return engine, None, engine.attach

        plan.append(Row("torchjd.autogram UPGrad", "torchjd", gram))
    return plan, notes


def cuda_peak_bytes(runner: Runner) -> tuple[int, int]:
    """Peak allocated bytes above the step's starting level, and all bytes allocated, in one
    step on the GPU (the caching allocator's counters: what ``timing.peak_step_bytes`` reads
    from the profiler on the CPU)."""
    torch.cuda.synchronize(runner.device)
    torch.cuda.reset_peak_memory_stats(runner.device)
    start = torch.cuda.memory_allocated(runner.device)
    before = torch.cuda.memory_stats(runner.device)["allocated_bytes.all.allocated"]
    runner.step()
    after = torch.cuda.memory_stats(runner.device)["allocated_bytes.all.allocated"]
    return torch.cuda.max_memory_allocated(runner.device) - start, after - before


def measure(
    config: Config, keys: list[str], device: torch.device, rounds: int, warmup: int
) -> tuple[list[dict[str, Any]], list[str]]:
    batches = config.batches(device)
    plan, notes = method_plan(keys)
    runners = {}
    for row in plan:
        tasks = config.build().tasks
        backward, weighting, engine = row.make(tasks)
        runners[row.name] = Runner(config, device, batches, backward, weighting, engine)
    times = timing.interleave(runners, rounds=rounds, warmup=warmup)
    memory_of = cuda_peak_bytes if device.type == "cuda" else timing.peak_step_bytes
    rows = timing.cost_rows(runners, times, memory_of=memory_of)
    for row, spec in zip(rows, plan, strict=True):
        row["family"] = spec.family
    return rows, notes


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(speed.lib.machine_info()["cpu"])


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--size", choices=["reduced", "full"], default=None)
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), metavar="KEY")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one round: for tests")
    args = parser.parse_args(argv)
    if args.size is None:
        args.size = "full" if args.device == "cuda" else "reduced"
    if args.rounds is None:
        args.rounds = 1 if args.smoke else 20
    if args.smoke:
        args.warmup, args.size = 1, "reduced"
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    started = time.perf_counter()
    configs, notes = [], []
    for model in args.models:
        config = make_config(model, args.size, args.smoke)
        print(f"{model} ({args.size}): {args.rounds} rounds", flush=True)
        rows, config_notes = measure(config, args.methods, device, args.rounds, args.warmup)
        notes += [n for n in config_notes if n not in notes]
        configs.append({"model": model, "size": args.size, "shape": config.shape, "rows": rows})
        for row in rows:
            print(f"  {row['method']:>28} {row['ratio']:6.2f}x  peak {row['peak_ratio']:5.2f}x")
    record = {
        "script": "benchmarks/end_to_end.py",
        "command": " ".join(["python", "benchmarks/end_to_end.py", *argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": _device_name(device),
        "device_type": device.type,
        "smoke": args.smoke,
        "methods": args.methods,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "threads": args.threads,
        "sets_own_threads": True,
        "torch": torch.__version__,
        "torchjd": None if Engine is None else timing.package_version("torchjd"),
        "goals": GOALS,
        "notes": notes,
        "wall_seconds": time.perf_counter() - started,
        "configs": configs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"end_to_end_{device.type}{'_smoke' if args.smoke else ''}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
