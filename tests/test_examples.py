"""The demo and the benchmarks run end to end (smoke mode) and write what they promise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str | Path) -> str:
    env = dict(os.environ)
    # The worktree's sources first, as the scripts would be run from a fresh checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    done = subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, f"{script} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_demo_smoke(tmp_path: Path) -> None:
    out = _run("examples/pointer_countdown.py", "--smoke", "--out", tmp_path)
    for method in ("sum", "normalizer", "normalizer-sqrt", "uncertainty"):
        assert f"| {method} |" in out
    assert (tmp_path / "pointer_countdown.png").stat().st_size > 1000


@pytest.mark.slow
def test_quality_smoke(tmp_path: Path) -> None:
    out = _run("benchmarks/quality.py", "--smoke", "--jobs", "1", "--out", tmp_path)
    table = (tmp_path / "quality_smoke.md").read_text()
    for method in ("pointer-alone", "countdown-alone", "sum", "normalizer", "uncertainty"):
        assert f"| {method} |" in table
    assert "delta_m" in out
    assert (tmp_path / "quality_smoke.png").stat().st_size > 1000


@pytest.mark.slow
def test_speed_smoke(tmp_path: Path) -> None:
    _run("benchmarks/speed.py", "--smoke", "--out", tmp_path)
    table = (tmp_path / "speed_smoke.md").read_text()
    assert "| sum | " in table
    assert "wide" in table
    assert "| uncertainty |" in table


def test_registry_skips_missing_classes(capsys: pytest.CaptureFixture[str]) -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _pointer_countdown_lib as lib
    finally:
        sys.path.remove(str(ROOT / "examples"))
    lib.REGISTRY["needs-missing"] = lib.Method(
        "needs-missing", lambda ctx: lib.Strategy(ctx.tasks), "test", ("NoSuchWeighting",)
    )
    try:
        chosen = lib.resolve_methods(["sum", "needs-missing"])
    finally:
        del lib.REGISTRY["needs-missing"]
    assert chosen == ["sum"]
    assert "needs-missing (NoSuchWeighting)" in capsys.readouterr().out


def test_weighted_ratio_uses_effective_weights_without_touching_state() -> None:
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _pointer_countdown_lib as lib
    finally:
        sys.path.remove(str(ROOT / "examples"))
    import torch

    batch = lib.make_data(8, seed=0)
    model = lib.PointerCountdownNet(hidden=4)
    ctx = lib.MethodContext(lib.TASKS, dict(lib.OUTPUT_SIZES), model, 0)
    plain = lib.weighted_gradient_ratio(model, lib.REGISTRY["sum"].factory(ctx), batch)
    strategy = lib.REGISTRY["normalizer"].factory(ctx)
    normalized = lib.weighted_gradient_ratio(model, strategy, batch)
    losses = lib.task_losses(model(batch.x), batch)
    # First step of the value-only normalizer: w_k = weight_k / L_k (correction "none").
    expected = {
        "pointer": 0.7 / losses["pointer"].item(),
        "countdown": 0.1 / losses["countdown"].item(),
    }
    assert normalized["w_pointer"] == pytest.approx(expected["pointer"], rel=1e-5)
    assert normalized["w_countdown"] == pytest.approx(expected["countdown"], rel=1e-5)
    assert plain["w_pointer"] == plain["w_countdown"] == 1.0
    assert plain["ratio"] == pytest.approx(plain["countdown"] / plain["pointer"], rel=1e-9)
    assert normalized["ratio"] == pytest.approx(
        plain["ratio"] * expected["countdown"] / expected["pointer"], rel=1e-5
    )
    # The probe ran on a copy: the strategy's own statistics have seen nothing.
    assert strategy.weighting is not None
    assert torch.equal(strategy.weighting.count, torch.zeros(2, dtype=torch.long))
