"""The benchmark suite's machinery: problems, methods, trainers, one run, the results files.

``benchmarks/suite.py`` (quality runs) and ``benchmarks/suite_speed.py`` (step time) both build
on this module; neither imports the other's internals. What is measured and how is described in
``suite.py``'s docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from candidates import CANDIDATES  # noqa: E402
from problems import ConstantModel, Problem, Split, TaskModel  # noqa: E402

import balanced_losses as bl  # noqa: E402

PROBLEMS = ("pointer_countdown", "digits", "ucr", "many_tasks")
#: ``many_tasks`` with other numbers of tasks, for the scaling study (not in the mean ranks).
SCALING = {"many_tasks_k10": 10, "many_tasks_k40": 40}
SEEDS = (0, 1, 2, 3, 4)
RESULTS = HERE / "results"


#: A development problem outside the mean ranks: the demo's own generator, where the previous
#: default lost a seed (``problems/user_regime.py``).
EXTRA = ("user_regime",)
#: Held-out problems: committed before any method ran on them, run once the default was chosen
#: on the development problems (``PROBLEMS`` and ``EXTRA``), to confirm it.
HELD_OUT = ("newcomer_digits", "blood_pressure", "power_demand", "gait", "vowels", "leaves")
#: The field's own benchmarks, run with every method; held out from the default's choice too
#: (committed before any method ran on them). ``qm9_paper`` is QM9 at the papers' budget.
FIELD = ("qm9",)
PAPER_BUDGETS = ("qm9_paper",)


def load_problem(name: str) -> Problem:
    if name in SCALING:
        from problems.many_tasks import make

        return make(SCALING[name])
    if name == "qm9_paper":
        from problems.qm9 import PAPER

        return PAPER
    module = importlib.import_module(f"problems.{name}")
    problem: Problem = module.PROBLEM
    return problem


# ------------------------------------------------------------------------------------ methods


class Trainer:
    """One method's training step on a problem's model (a plain sum by default)."""

    def __init__(self, problem: Problem, model: TaskModel, lr: float) -> None:
        self.problem = problem
        self.model = model
        self.weighting: bl.Weighting | None = None
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def add_parameters(self, params: Sequence[torch.nn.Parameter], lr: float) -> None:
        if params:
            self.optimizer.add_param_group({"params": list(params), "lr": lr})

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        return sum(losses.values(), torch.zeros(()))

    def backward(self, losses: dict[str, Tensor]) -> None:
        self.total(losses).backward()

    def step(self, batch: Split) -> dict[str, Tensor]:
        self.optimizer.zero_grad(set_to_none=True)
        losses = self.problem.losses(self.model(batch.x), batch)
        self.backward(losses)
        self.optimizer.step()
        self.after_step(batch)
        return losses

    def after_step(self, batch: Split) -> None:
        """Called after each optimizer step (FAMO's update)."""

    def epoch_end(self) -> None:
        """Called after each epoch (DWA's step)."""


class Alone(Trainer):
    def __init__(self, problem: Problem, model: TaskModel, lr: float, task: str) -> None:
        super().__init__(problem, model, lr)
        self.task = task

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        return losses[self.task]


class Static(Trainer):
    """Fixed weights: a plain sum with factors."""

    def __init__(
        self, problem: Problem, model: TaskModel, lr: float, weights: Mapping[str, float]
    ) -> None:
        super().__init__(problem, model, lr)
        self.factors = dict(weights)

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        return sum((self.factors[t] * loss for t, loss in losses.items()), torch.zeros(()))


class Weighted(Trainer):
    """A method of the package: ``weighting(losses)``, attached at the trunk if feature-level."""

    def __init__(
        self, problem: Problem, model: TaskModel, lr: float, weighting: bl.Weighting
    ) -> None:
        super().__init__(problem, model, lr)
        self.weighting = weighting.to(next(model.parameters()).device)
        # DBMTL(balance_features=False) is loss-level: nothing to attach.
        if callable(getattr(weighting, "attach", None)) and getattr(
            weighting, "balance_features", True
        ):
            weighting.attach(model, "trunk", head_names(model, problem.tasks))  # type: ignore[operator]
        # Learned weights (uncertainty, IMTL-L) train with the model's optimizer.
        self.add_parameters([p for p in weighting.parameters() if p.requires_grad], lr)

    def total(self, losses: dict[str, Tensor]) -> Tensor:
        assert self.weighting is not None
        return self.weighting(losses)

    def after_step(self, batch: Split) -> None:
        assert self.weighting is not None
        # The losses after the step are computed only for a method that asks (FAMO).
        self.weighting.after_step(lambda: self.problem.losses(self.model(batch.x), batch))

    def epoch_end(self) -> None:
        assert self.weighting is not None
        self.weighting.epoch_end()


def head_names(model: TaskModel, tasks: Sequence[str]) -> dict[str, str] | None:
    """The heads to name to ``attach``: submodules called ``<task>`` or ``heads.<task>``.

    Named heads take the trunk's output as it is and cost no extra pass; a model without them
    (the pointer head reads a mean over time) is attached without heads, which measures each
    task's gradient through its head. Both give the same gradients (tests/test_attach.py).
    """
    modules = dict(model.named_modules())
    names = {t: next((n for n in (t, f"heads.{t}") if n in modules), None) for t in tasks}
    found = {t: n for t, n in names.items() if n is not None}
    return found if len(found) == len(tasks) else None


class TorchJD(Trainer):
    """A TorchJD aggregator on the trunk's parameters: ``mtl_backward`` then ``jac_to_grad``."""

    def __init__(self, problem: Problem, model: TaskModel, lr: float, aggregator: Any) -> None:
        super().__init__(problem, model, lr)
        self.aggregator = aggregator
        self.features: list[Tensor] = []
        model.trunk.register_forward_hook(self._keep)

    def _keep(self, module: Any, args: Any, output: Any) -> None:
        self.features = [output] if isinstance(output, Tensor) else list(output)

    def backward(self, losses: dict[str, Tensor]) -> None:
        from torchjd.autojac import jac_to_grad, mtl_backward

        mtl_backward([losses[t] for t in self.problem.tasks], features=self.features)
        jac_to_grad(list(self.model.trunk.parameters()), self.aggregator)


def _package(problem: Problem, model: TaskModel) -> dict[str, Callable[[], bl.Weighting]]:
    """Every configuration of the package's catalog, by key, built for ``problem``'s model."""
    trunk = [p for p in model.trunk.parameters() if p.requires_grad]

    def builder(method: bl.catalog.Method) -> Callable[[], bl.Weighting]:
        return lambda: method.build(
            list(problem.tasks),
            output_sizes=dict(problem.output_sizes),
            shared_parameters=trunk,
            seed=0,
        )

    return {method.key: builder(method) for method in bl.catalog.methods()}


#: TorchJD's aggregators run as peers (class names in ``torchjd.aggregation``).
TORCHJD = {
    "torchjd-upgrad": "UPGrad",
    "torchjd-mgda": "MGDA",
    "torchjd-pcgrad": "PCGrad",
    "torchjd-imtlg": "IMTLG",
    "torchjd-aligned-mtl": "AlignedMTL",
    "torchjd-cagrad": "CAGrad",
}
#: The static weight vectors of the ``tuned`` baseline (see the module docstring).
STATIC = ("static-initial-loss", "static-sqrt-size", "static-size")
#: The package's methods (the catalog: each class's defaults and the named configurations).
PACKAGE_LOSS = tuple(m.key for m in bl.catalog.methods("loss"))
PACKAGE_FEATURES = tuple(m.key for m in bl.catalog.methods("features"))


#: Variants of the recommended method's defaults, for the robustness study on problem 1
#: (``--methods`` accepts them; ``methods_of`` does not list them).
VARIANTS: dict[str, Callable[[list[str]], bl.Weighting]] = {
    "dbmtl-momentum-0": lambda tasks: bl.DBMTL(tasks, momentum=0.0),
    "dbmtl-momentum-0.99": lambda tasks: bl.DBMTL(tasks, momentum=0.99),
    "dbmtl-log-only": lambda tasks: bl.DBMTL(tasks, balance_features=False),
    "gradient-balancer-max": lambda tasks: bl.GradientBalancer(tasks, target="max"),
    "gradient-balancer-momentum-0.99": lambda tasks: bl.GradientBalancer(tasks, momentum=0.99),
    "gradient-balancer-momentum-0": lambda tasks: bl.GradientBalancer(tasks, momentum=0.0),
    **CANDIDATES,
    # Speed only: CalibratedBalancer frozen after one step, what every step after the
    # calibration costs (suite_speed.py measures it next to the calibrating phase).
    "calibrated-balancer-frozen": lambda tasks: bl.CalibratedBalancer(tasks, steps=1),
    # The same for CalibratedWeighting: a fixed weighted sum once its calibration is over.
    "calibrated-weighting-frozen": lambda tasks: bl.CalibratedWeighting(tasks, steps=1),
}
#: Variants of the study that change the learning rate alone: name -> (method, learning rate).
#: The single-task baselines keep the budget's rate, so Δm shows what the change costs.
LR_VARIANTS: dict[str, tuple[str, float]] = {
    "dbmtl-lr-3e-4": ("dbmtl", 3e-4),
    "dbmtl-lr-3e-3": ("dbmtl", 3e-3),
    "sum-lr-3e-4": ("sum", 3e-4),
    "sum-lr-3e-3": ("sum", 3e-3),
}


#: The methods of the scaling study (``SCALING``): a plain sum, the recommended feature-level
#: methods, the loss-level ones that read only the losses, and TorchJD's UPGrad, whose cost
#: grows with the number of tasks.
SCALING_METHODS = (
    "sum",
    "gradient-balancer",
    "dbmtl",
    "upgrad-balanced",
    "loss-normalizer",
    "uncertainty-weighting",
    "famo",
    "torchjd-upgrad",
)


#: The constant-prediction baseline: no training; a run with a task worse than it diverged.
CONSTANT = "constant"


#: What runs on the problems outside the four of the mean ranks: the baselines, the default
#: and the methods it was chosen against.
CONFIRMATION_METHODS = (
    "sum",
    *STATIC,
    "loss-normalizer",
    "uncertainty-weighting",
    "famo",
    "gradient-balancer",
    "calibrated-balancer",
    "dbmtl",
    "upgrad-balanced",
    "fair-grad",
)


def methods_of(problem: Problem) -> list[str]:
    """Every method run on ``problem``, the baselines first."""
    names = [CONSTANT, *(f"alone:{t}" for t in problem.tasks)]
    if problem.name in (*EXTRA, *HELD_OUT):
        return names + list(CONFIRMATION_METHODS)
    if problem.name in SCALING:
        return names + [
            m for m in SCALING_METHODS if not m.startswith("torchjd-") or _has_torchjd()
        ]
    names += ["sum", *STATIC, *PACKAGE_LOSS, *PACKAGE_FEATURES]
    if _has_torchjd():
        names += list(TORCHJD)
    return names


def _has_torchjd() -> bool:
    return importlib.util.find_spec("torchjd") is not None


def _static_weights(problem: Problem, name: str, first: dict[str, Tensor]) -> dict[str, float]:
    sizes = problem.output_sizes
    if name == "static-initial-loss":
        raw = {t: 1.0 / max(float(first[t]), 1e-12) for t in problem.tasks}
    elif name == "static-sqrt-size":
        raw = {t: math.sqrt(sizes[t]) for t in problem.tasks}
    else:
        raw = {t: float(sizes[t]) for t in problem.tasks}
    mean = statistics.fmean(raw.values())
    return {t: v / mean for t, v in raw.items()}


def make_trainer(
    problem: Problem, method: str, model: TaskModel, first: dict[str, Tensor]
) -> Trainer:
    lr = problem.budget.lr
    if method in LR_VARIANTS:
        method, lr = LR_VARIANTS[method]
    if method == "sum":
        return Trainer(problem, model, lr)
    if method.startswith("alone:"):
        return Alone(problem, model, lr, method.split(":", 1)[1])
    if method in STATIC:
        return Static(problem, model, lr, _static_weights(problem, method, first))
    package = _package(problem, model)
    if method in package:
        return Weighted(problem, model, lr, package[method]())
    if method in VARIANTS:
        return Weighted(problem, model, lr, VARIANTS[method](list(problem.tasks)))
    if method in TORCHJD:
        from torchjd import aggregation

        # CAGrad's c: 0.4, the package's default and the paper's choice for its benchmarks.
        kwargs = {"c": 0.4} if TORCHJD[method] == "CAGrad" else {}
        return TorchJD(problem, model, lr, getattr(aggregation, TORCHJD[method])(**kwargs))
    raise KeyError(f"unknown method `{method}`; expected one of {methods_of(problem)}")


# ---------------------------------------------------------------------------------- training


@dataclass(frozen=True)
class Job:
    problem: str
    method: str
    seed: int
    smoke: bool
    #: Where the run trains: ``"cpu"`` (the suite's results) or an accelerator (``qm9_paper``).
    device: str = "cpu"


def batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=generator)
    for i in range(0, n, batch_size):
        yield order[i : i + batch_size]


def start(problem: Problem, method: str, train: Split, seed: int) -> Trainer:
    """The seed's initial model (the same for every method) and the method's trainer on it."""
    torch.manual_seed(seed)
    # Initialized on the CPU whatever the device, so every device starts from the same weights.
    model = problem.model().to(train.x.device)
    with torch.no_grad():
        # The losses at initialization, for the static weights of the ``tuned`` baseline.
        probe = train.take(torch.arange(min(len(train), 256)))
        first = problem.losses(model(probe.x), probe)
    return make_trainer(problem, method, model, first)


def init_gradient_norms(problem: Problem, train: Split, seed: int) -> dict[str, float]:
    """Each task's gradient norm on the trunk's parameters at the seed's initialization.

    What ``balanced_losses.diagnostics.gradient_report`` shows a user before training, on the
    first 256 training samples: the imbalance that the decision path's check reads.
    """
    torch.manual_seed(seed)
    model = problem.model().to(train.x.device)
    probe = train.take(torch.arange(min(len(train), 256)))
    losses = problem.losses(model(probe.x), probe)
    norms = bl.diagnostics.task_gradient_norms(losses, model.trunk.parameters())
    return {task: float(norm) for task, norm in norms.items()}


def _on(split: Split, device: str) -> Split:
    """``split`` with its tensors on ``device`` (the same split where it is already there)."""
    if split.x.device == torch.device(device):
        return split
    return Split(split.x.to(device), {t: y.to(device) for t, y in split.targets.items()})


def run(job: Job) -> dict[str, Any]:
    """Train one method for one seed; the run's record."""
    torch.set_num_threads(1)
    problem = load_problem(job.problem)
    train, val = (_on(split, job.device) for split in problem.data(smoke=job.smoke))
    if job.method == CONSTANT:
        metrics = problem.evaluate(ConstantModel(problem.constant_outputs(train)), val)
        return {
            "init_grad_norms": init_gradient_norms(problem, train, job.seed),
            "problem": job.problem,
            "method": job.method,
            "seed": job.seed,
            "smoke": job.smoke,
            "epochs": 0,
            "steps": 0,
            "metrics": metrics,
            "curves": {t: [v] for t, v in metrics.items()},
            "seconds": 0.0,
            "warnings": [],
        }
    trainer = start(problem, job.method, train, job.seed)
    model = trainer.model
    budget = problem.budget
    epochs, max_steps = (1, 2) if job.smoke else (budget.epochs, None)
    generator = torch.Generator().manual_seed(1000 + job.seed)  # the same batches per seed
    curves: dict[str, list[float]] = {t: [] for t in problem.tasks}
    started, steps = time.perf_counter(), 0
    with warnings_as_notes() as notes:
        for _ in range(epochs):
            for index in batches(len(train), budget.batch_size, generator):
                trainer.step(train.take(index))
                steps += 1
                if max_steps is not None and steps >= max_steps:
                    break
            trainer.epoch_end()
            for task, value in problem.evaluate(model, val).items():
                curves[task].append(value)
    seconds = time.perf_counter() - started
    return {
        "problem": job.problem,
        "method": job.method,
        "seed": job.seed,
        "smoke": job.smoke,
        **({"device": job.device} if job.device != "cpu" else {}),
        "epochs": epochs,
        "steps": steps,
        "metrics": {t: values[-1] for t, values in curves.items()},
        "curves": curves,
        "seconds": seconds,
        "warnings": notes,
        # What loading the data dropped, by reason, where the problem reports it.
        **({"dropped": dict(problem.dropped)} if hasattr(problem, "dropped") else {}),
    }


@contextlib.contextmanager
def warnings_as_notes() -> Iterator[list[str]]:
    """Record the distinct warnings of a run (they go into its record, not to the console)."""
    import warnings

    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    for w in caught:
        text = f"{w.category.__name__}: {w.message}"
        if text not in notes:
            notes.append(text)


# ----------------------------------------------------------------------------------- results


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }


def problem_info(problem: Problem) -> dict[str, Any]:
    return {
        "name": problem.name,
        "title": problem.title,
        "tasks": list(problem.tasks),
        "metrics": dict(problem.metrics),
        "budget": dataclasses.asdict(problem.budget),
        "metric_floor": dict(getattr(problem, "metric_floor", {})),
    }


def results_path(out: Path, problem: str) -> Path:
    return out / f"{problem}.json"


def load_results(path: Path) -> dict[str, Any]:
    if path.is_file():
        record: dict[str, Any] = json.loads(path.read_text())
        return record
    return {"runs": [], "calls": []}


def save_results(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    record["runs"].sort(key=lambda r: (r["method"], r["seed"]))
    path.write_text(json.dumps(record, indent=1) + "\n")


def calibration_line(problem_name: str, smoke: bool) -> str | None:
    """Problem 1's three numbers at initialization, printed at the start of every run."""
    if problem_name != "pointer_countdown":
        return None
    from problems.pointer_countdown import PROBLEM, calibration

    train, _ = PROBLEM.data(smoke=smoke)
    torch.manual_seed(0)
    numbers = calibration(PROBLEM.model(), train.take(torch.arange(min(len(train), 128))))
    return (
        f"pointer_countdown at initialization (plain sum, seed 0): pointer loss "
        f"{numbers['pointer_loss']:.3f}, countdown loss {numbers['countdown_loss']:.2f}, "
        f"countdown/pointer gradient at the encoder {numbers['grad_ratio']:.3f}"
    )


def format_seconds(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60:02d} s" if seconds >= 60 else f"{seconds} s"
