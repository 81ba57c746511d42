"""The op-count proxy of the Gramian solvers' GPU cost: benchmarks/solver_ops.py counts what the
committed benchmarks/results/solver_ops.json says, and counts what it should."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "solver_ops.py"
RESULTS = ROOT / "benchmarks" / "results" / "solver_ops.json"

pytestmark = pytest.mark.skipif(
    not SCRIPT.is_file(), reason="benchmarks/ is not here (tests copied out of the source tree)"
)


def _solver_ops() -> ModuleType:
    spec = importlib.util.spec_from_file_location("solver_ops", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _minor(version: str) -> str:
    return ".".join(version.split(".")[:2])


def test_committed_counts_are_what_the_solvers_dispatch() -> None:
    """A solver change that changes its op counts must come with the regenerated results."""
    recorded = json.loads(RESULTS.read_text())["torch"]
    if _minor(recorded) != _minor(torch.__version__):
        pytest.skip(f"counted with torch {recorded}; other releases dispatch other ops")
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]


def test_counts_a_known_function() -> None:
    """``g.sum(0) / g.trace()`` dispatches three ops from Python: sum, trace and div; under
    them the profiler sees ``sum``'s ``as_strided`` and ``fill_`` and ``trace``'s ``empty`` (in
    torch 2.13; other releases may nest other ops, so only a lower bound on those)."""
    count_ops = _solver_ops().count_ops
    gram = torch.eye(3)

    def fn(g: torch.Tensor) -> torch.Tensor:
        return g.sum(0) / g.trace()

    fn(gram)
    ops, top = count_ops(fn, gram)
    assert top == 3
    assert ops >= top
    if _minor(torch.__version__) == "2.13":
        assert ops == 6


def test_counts_nothing_for_nothing() -> None:
    count_ops = _solver_ops().count_ops

    def identity(g: torch.Tensor) -> torch.Tensor:
        return g

    assert count_ops(identity, torch.eye(3)) == (0, 0)
