"""The demo and the benchmarks run end to end (smoke mode) and write what they promise."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.registry import same

ROOT = Path(__file__).resolve().parents[1]

# The release check runs a copy of tests/ against the installed wheel, without examples/.
pytestmark = pytest.mark.skipif(
    not (ROOT / "examples").is_dir(), reason="examples/ is not here (tests copied out of the tree)"
)


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
    figure = tmp_path / "figures" / "demo.png"
    out = _run("examples/pointer_countdown.py", "--smoke", "--out", tmp_path, "--figure", figure)
    # The script sets its own thread count and says so first, whatever OMP_NUM_THREADS is.
    assert out.splitlines()[0] == (
        f"using 1 torch thread (--threads 1; 1 inter-op thread); {os.cpu_count()} CPUs on this "
        "machine"
    )
    # One progress line per method and epoch, with the time left for the whole run.
    progress = [line for line in out.splitlines() if "] epoch 1/1 " in line]
    assert len(progress) == out.count("training `") >= 4, out
    assert all(re.search(r" elapsed, ETA \d+ (s|min)", line) for line in progress), progress
    assert progress[0].lstrip().startswith("[sum] epoch 1/1  val MAE pointer ")
    for method in ("sum", "normalizer", "normalizer-sqrt", "uncertainty"):
        assert f"| {method} |" in out
    # --figure puts the PNG where asked; --out still takes the JSON.
    assert figure.stat().st_size > 1000
    assert f"training curves: {figure}" in out
    assert not (tmp_path / "pointer_countdown.png").exists()
    record = json.loads((tmp_path / "pointer_countdown.json").read_text())
    assert record["smoke"] is True
    assert [r["method"] for r in record["methods"]][:4] == [
        "sum",
        "normalizer",
        "normalizer-sqrt",
        "uncertainty",
    ]
    for run in record["methods"]:
        assert set(run["val_mae"]) == {"pointer", "countdown"}
        assert math.isfinite(run["ratio_init"])
        assert math.isfinite(run["ratio_end"])
    for key in ("cpu", "cpu_count", "torch", "torch_threads", "load_average_1_5_15_min"):
        assert key in record["machine"]
    assert (record["threads"], record["machine"]["torch_threads"]) == (1, 1)


@pytest.mark.slow
def test_aggregators_speed_smoke(tmp_path: Path) -> None:
    _run("benchmarks/aggregators_speed.py", "--smoke", "--out", tmp_path)
    table = (tmp_path / "aggregators_speed_smoke.md").read_text()
    record = json.loads((tmp_path / "aggregators_speed_smoke.json").read_text())
    assert record["smoke"] is True
    assert "load_average_1_5_15_min" in record["machine"]
    (config,) = record["configs"]
    assert (config["trunk"], config["tasks"]) == ("demo", 3)
    rows = {row["method"]: row for row in config["rows"]}
    assert list(rows)[:2] == ["sum", "GradientBalancer"]
    assert {"IMTLG", "IMTLG(balance_norms=True)", "PCGrad"} <= set(rows)
    for row in rows.values():
        assert math.isfinite(row["ratio"])
        assert row["peak"] > 0
    assert "| IMTLG | " in table
    if importlib.util.find_spec("torchjd") is not None:
        assert rows["torchjd.IMTLG"]["family"] == "torchjd"
        assert rows["IMTLG"]["torchjd_over_ours"] > 0
        assert "TorchJD's step time / ours" in table


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


def test_strategy_hooks_branching_and_extra_parameters() -> None:
    """The registry's plumbing for methods that are not merged yet, with stand-in weightings."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _pointer_countdown_lib as lib
    finally:
        sys.path.remove(str(ROOT / "examples"))
    import torch
    from torch import nn

    calls: dict[str, list] = {"branch": [], "update": [], "step": []}

    class StandIn(nn.Module):
        """Learned weight per task, a branch that doubles the pointer's gradient, two hooks."""

        def __init__(self, tasks: tuple[str, ...]) -> None:
            super().__init__()
            self.tasks = tasks
            self.scale = nn.Parameter(torch.ones(len(tasks)))

        def branch(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
            calls["branch"].append(feats.shape)
            doubled = feats.detach() + 2.0 * (feats - feats.detach())  # value feats, grad x2
            return {"pointer": doubled, "countdown": feats}

        def forward(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
            return sum(self.scale[i] * losses[t] for i, t in enumerate(self.tasks))

        @property
        def weights(self) -> dict[str, torch.Tensor]:
            # d total / d L_k at the shared features: the branch doubles the pointer's.
            return {"pointer": 2.0 * self.scale[0], "countdown": self.scale[1]}

        def update(self, losses: dict[str, torch.Tensor]) -> None:
            assert all(not v.requires_grad for v in losses.values())
            calls["update"].append(sorted(losses))

        def step(self) -> None:
            calls["step"].append(True)

    def factory(ctx: lib.MethodContext) -> lib.Strategy:
        return lib.Strategy(
            ctx.tasks,
            StandIn(ctx.tasks),
            optimize_weighting=True,
            epoch_hook="step",
            step_hook="update",
        )

    lib.REGISTRY["stand-in"] = lib.Method("stand-in", factory, "test")
    try:
        result = lib.train(
            "stand-in", epochs=2, n_train=128, n_val=16, max_steps=3, probe_size=8, hidden=4
        )
    finally:
        del lib.REGISTRY["stand-in"]
    assert len(calls["update"]) == 6  # after every optimizer step
    assert len(calls["step"]) == 2  # at every epoch's end
    assert len(calls["branch"]) >= 6  # every training step branches
    assert all(math.isfinite(r) for r in result.history["ratio"])
    batch = lib.make_data(8, seed=3)
    model = lib.PointerCountdownNet(hidden=4)
    ctx = lib.MethodContext(lib.TASKS, dict(lib.OUTPUT_SIZES), model, 0)
    strategy = factory(ctx)
    optimizer = torch.optim.Adam([*model.parameters(), *strategy.extra_parameters()], lr=0.1)
    strategy.step(model, optimizer, batch)
    assert strategy.weighting is not None
    # Its parameters were in the optimizer: Adam moved them away from 1.
    assert not torch.equal(strategy.weighting.scale.detach(), torch.ones(2))
    probe = lib.weighted_gradient_ratio(model, strategy, batch)
    scale = strategy.weighting.scale.detach()
    assert probe["w_pointer"] == pytest.approx(2.0 * scale[0].item(), rel=1e-6)
    assert probe["ratio"] == pytest.approx(
        scale[1].item() * probe["countdown"] / (2.0 * scale[0].item() * probe["pointer"]),
        rel=1e-6,
    )


def test_feature_level_methods_branch_with_shipped_defaults() -> None:
    """GradientBalancer and the aggregators share one factory: the weighting branches the
    encoder's output, its constructor gets the defaults (PCGrad: the run's seed), and the probe
    of the effective weights reads the coefficients without touching the strategy's state."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _pointer_countdown_lib as lib
    finally:
        sys.path.remove(str(ROOT / "examples"))
    import torch

    import balanced_losses as bl

    expected = {
        "gradient-balancer": bl.GradientBalancer,
        "upgrad": bl.UPGrad,
        "upgrad-balanced": bl.UPGrad,
        "mgda": bl.MGDA,
        "cagrad": bl.CAGrad,
        "imtlg": bl.IMTLG,
        "aligned-mtl": bl.AlignedMTL,
        "nash-mtl": bl.NashMTL,
        "fairgrad": bl.FairGrad,
        "pcgrad": bl.PCGrad,
    }
    batch = lib.make_data(8, seed=0)
    for name, cls in expected.items():
        model = lib.PointerCountdownNet(hidden=4)
        ctx = lib.MethodContext(lib.TASKS, dict(lib.OUTPUT_SIZES), model, 5)
        strategy = lib.REGISTRY[name].factory(ctx)
        assert type(strategy.weighting) is cls, name
        assert strategy.branches, name
        weighting = strategy.weighting
        if name != "gradient-balancer":
            assert weighting.balance_norms is (name == "upgrad-balanced"), name
        before = {k: v.clone() for k, v in weighting.named_buffers()}
        probe = lib.weighted_gradient_ratio(model, strategy, batch)
        assert math.isfinite(probe["ratio"]), name
        assert probe["ratio"] > 0, name
        after = dict(weighting.named_buffers())
        assert before, name
        assert same(before, after), name
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        losses = strategy.step(model, optimizer, batch)
        assert all(math.isfinite(float(v)) for v in losses.values()), name
    pcgrad = lib.REGISTRY["pcgrad"].factory(
        lib.MethodContext(lib.TASKS, dict(lib.OUTPUT_SIZES), lib.PointerCountdownNet(hidden=4), 5)
    )
    assert int(pcgrad.weighting.seed) == 5  # the run's seed, from the context
