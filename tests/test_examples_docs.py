"""The examples run (in their few-step smoke mode), the docs' figures regenerate, and every
public class carries a runnable ``>>>`` example (the doctests themselves run through
``--doctest-modules``)."""

from __future__ import annotations

import csv
import inspect
import os
import runpy
import subprocess
import sys
import types
from pathlib import Path
from typing import ClassVar

import pytest
import torch

import balanced_losses
from balanced_losses import functional

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"

needs_examples = pytest.mark.skipif(
    not EXAMPLES.is_dir(), reason="examples/ is not here (tests copied out of the source tree)"
)


def run_script(script: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a script in smoke mode, against the same balanced_losses these tests import."""
    env = dict(os.environ, BL_SMOKE="1", PYTHONUNBUFFERED="1")
    package_root = str(Path(balanced_losses.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, f"{script.name} failed:\n{result.stdout}\n{result.stderr}"
    return result


@needs_examples
def test_monitor_example_prints_losses_and_weights_without_tensorboard(tmp_path):
    out = run_script(
        EXAMPLES / "monitor_tensorboard.py", "--steps", "4", "--no-tensorboard", cwd=tmp_path
    ).stdout
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert len(lines) == 4
    for task in ("pointer", "countdown"):
        assert f"weight/{task}=" in lines[-1]
        assert f"loss/{task}=" in lines[-1]


@pytest.mark.slow
@needs_examples
def test_monitor_example_writes_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "runs"
    run_script(EXAMPLES / "monitor_tensorboard.py", "--logdir", str(logdir), cwd=tmp_path)
    events = list(logdir.glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert events[0].stat().st_size > 0


class _RecordingMonitor:
    """Stand-in for diagnostics.GradientMonitor with the API of issue 3: it differentiates each
    loss on the given parameters, which fails if the caller already ran backward."""

    instances: ClassVar[list[_RecordingMonitor]] = []

    def __init__(self, params, *, every=100):
        self.params = list(params)
        self.every = every
        self.calls = 0
        self.norms: dict[str, float] = {}
        _RecordingMonitor.instances.append(self)

    def step(self, losses):
        self.calls += 1
        if (self.calls - 1) % self.every:
            return
        for task, loss in losses.items():
            grads = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
            squares = [g.pow(2).sum() for g in grads if g is not None]
            self.norms[f"norm/{task}"] = torch.stack(squares).sum().sqrt().item()

    def as_dict(self):
        return dict(self.norms)


@needs_examples
def test_monitor_example_follows_the_gradient_monitor_api(monkeypatch, capsys):
    stub = types.ModuleType("balanced_losses.diagnostics")
    stub.GradientMonitor = _RecordingMonitor  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "balanced_losses.diagnostics", stub)
    _RecordingMonitor.instances.clear()
    example = runpy.run_path(str(EXAMPLES / "monitor_tensorboard.py"), run_name="example")
    logged = example["main"](
        ["--steps", "5", "--every", "2", "--log-every", "5", "--no-tensorboard"]
    )
    (monitor,) = _RecordingMonitor.instances
    assert monitor.calls == 5
    assert monitor.every == 2
    # The monitor watches the shared encoder, where the tasks compete.
    model_params = {id(p) for p in monitor.params}
    assert len(model_params) == 4  # two Linear layers: weights and biases
    assert logged["gradient/norm/pointer"] > 0
    assert logged["gradient/norm/countdown"] > 0
    assert "step     5" in capsys.readouterr().out


def _check_lightning_run(tmp_path: Path, weighting: str, state: str) -> None:
    pytest.importorskip("lightning")
    logdir = tmp_path / "logs"
    out = run_script(
        EXAMPLES / "lightning_module.py",
        "--weighting",
        weighting,
        "--logdir",
        str(logdir),
        cwd=tmp_path,
    ).stdout
    assert f"restored weighting state: {state}" in out
    (metrics,) = logdir.glob(f"two_task_{weighting}/version_*/metrics.csv")
    with metrics.open() as f:
        rows = list(csv.DictReader(f))
    weights = [
        (float(r["weight/pointer"]), float(r["weight/countdown"]))
        for r in rows
        if r["weight/pointer"]
    ]
    assert len(weights) == 4  # one row per step in smoke mode
    assert all(w > 0 for pair in weights for w in pair)
    assert any(r["val_loss/countdown"] for r in rows)  # validation ran and logged


@needs_examples
def test_lightning_example_with_uncertainty_weighting(tmp_path):
    _check_lightning_run(tmp_path, "uncertainty", "['log_vars']")


@pytest.mark.slow
@needs_examples
def test_lightning_example_with_loss_normalizer(tmp_path):
    _check_lightning_run(
        tmp_path, "normalizer", "['count', 'ema', 'micro_step', 'pending_count', 'pending_sum']"
    )


@pytest.mark.slow
def test_docs_figures_regenerate(tmp_path):
    pytest.importorskip("matplotlib")
    if not (DOCS / "make_figures.py").is_file():
        pytest.skip("docs/ is not here (tests copied out of the source tree)")
    run_script(DOCS / "make_figures.py", "--out", str(tmp_path), cwd=tmp_path)
    made = sorted(p.name for p in tmp_path.glob("*.png"))
    # pointer_countdown.png is the demo's own output (examples/pointer_countdown.py), copied.
    committed = sorted(
        p.name for p in (DOCS / "figures").glob("*.png") if p.name != "pointer_countdown.png"
    )
    assert made == committed
    assert made  # the docs show at least one figure


def _public_classes() -> list[str]:
    return [
        name
        for name in balanced_losses.__all__
        if inspect.isclass(getattr(balanced_losses, name, None))
    ]


@pytest.mark.parametrize("name", _public_classes())
def test_every_public_class_has_a_doctest_example(name):
    doc = inspect.getdoc(getattr(balanced_losses, name)) or ""
    assert ">>>" in doc, f"`balanced_losses.{name}` has no runnable >>> example in its docstring"


@pytest.mark.parametrize(
    "name", [n for n in functional.__all__ if inspect.isfunction(getattr(functional, n))]
)
def test_every_functional_function_has_a_doctest_example(name):
    doc = inspect.getdoc(getattr(functional, name)) or ""
    assert ">>>" in doc, f"`functional.{name}` has no runnable >>> example in its docstring"
