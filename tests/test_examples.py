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
from types import ModuleType

import pytest
import torch

import balanced_losses as bl
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


def _lib() -> ModuleType:
    """The demo's shared code, ``examples/_pointer_countdown_lib.py``."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        import _pointer_countdown_lib as lib
    finally:
        sys.path.remove(str(ROOT / "examples"))
    return lib


DEMO_DEFAULTS = [
    "sum",
    "demo-normalizer-none",
    "demo-normalizer-sqrt",
    "uncertainty-weighting",
    "calibrated-weighting",
]


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
    assert len(progress) == out.count("training `") == len(DEMO_DEFAULTS), out
    assert all(re.search(r" elapsed, ETA \d+ (s|min)", line) for line in progress), progress
    assert progress[0].lstrip().startswith("[sum] epoch 1/1  val MAE pointer ")
    # Each method says what it builds: the catalog's label, or the demo's configuration.
    assert "training `calibrated-weighting`: CalibratedWeighting" in out
    assert "training `demo-normalizer-none`: LossNormalizer(correction='none'" in out
    for method in DEMO_DEFAULTS:
        assert f"| {method} |" in out
    # --figure puts the PNG where asked; --out still takes the JSON.
    assert figure.stat().st_size > 1000
    assert f"training curves: {figure}" in out
    assert not (tmp_path / "pointer_countdown.png").exists()
    record = json.loads((tmp_path / "pointer_countdown.json").read_text())
    assert record["smoke"] is True
    assert [r["method"] for r in record["methods"]] == DEMO_DEFAULTS
    for run in record["methods"]:
        assert set(run["val_mae"]) == {"pointer", "countdown"}
        assert math.isfinite(run["ratio_init"])
        assert math.isfinite(run["ratio_end"])
    for key in ("cpu", "cpu_count", "torch", "torch_threads", "load_average_1_5_15_min"):
        assert key in record["machine"]
    assert (record["threads"], record["machine"]["torch_threads"]) == (1, 1)


def test_demo_reference_run_uses_keys_the_demo_accepts() -> None:
    """The committed run behind the README's table names methods the demo still builds."""
    record = json.loads((ROOT / "examples" / "results" / "pointer_countdown.json").read_text())
    methods = [r["method"] for r in record["methods"]]
    assert methods == DEMO_DEFAULTS
    assert _lib().resolve_methods(methods) == methods


@pytest.mark.slow
def test_end_to_end_smoke(tmp_path: Path) -> None:
    """The three models at tiny sizes, one round: every row ran and measured something."""
    _run("benchmarks/end_to_end.py", "--smoke", "--out", tmp_path)
    record = json.loads((tmp_path / "end_to_end_cpu_smoke.json").read_text())
    assert record["smoke"] is True
    assert record["device_type"] == "cpu"
    assert [c["model"] for c in record["configs"]] == ["nyuv2", "celeba", "gru"]
    assert [c["shape"]["tasks"] for c in record["configs"]] == [3, 40, 3]
    # By default the balancers at the features and every aggregator of the catalog.
    aggregators = {m.key for m in bl.catalog.methods("features") if m.options == {}}
    assert aggregators - {"gradient-balancer", "calibrated-balancer", "dbmtl"} < set(
        record["methods"]
    )
    ours = [bl.catalog.get(key).label.strip("`") for key in record["methods"]]
    theirs = ["torchjd.autojac UPGrad", "torchjd.autogram UPGrad"] if record["torchjd"] else []
    for config in record["configs"]:
        rows = {row["method"]: row for row in config["rows"]}
        assert list(rows) == ["sum", *ours, *theirs]
        for row in rows.values():
            assert math.isfinite(row["ratio"])
            assert row["ratio"] > 0
            assert row["peak"] > 0


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
    # A plain sum, then every feature-level method of the catalog, named by its label.
    ours = [m.label.strip("`") for m in bl.catalog.methods("features")]
    assert list(rows)[: 1 + len(ours)] == ["sum", *ours]
    assert {rows[name]["family"] for name in ours} == {"ours"}
    assert rows["UPGrad(balance_norms=True)"]["aggregator"] == "UPGrad"
    for row in rows.values():
        assert math.isfinite(row["ratio"])
        assert row["peak"] > 0
    assert "| IMTLG | " in table
    assert "| CalibratedBalancer | " in table
    if importlib.util.find_spec("torchjd") is not None:
        assert rows["torchjd.IMTLG"]["family"] == "torchjd"
        assert rows["IMTLG"]["torchjd_over_ours"] > 0
        assert "torchjd_over_ours" not in rows["UPGrad(balance_norms=True)"]
        assert "torchjd.GradientBalancer" not in rows  # TorchJD has no peer of it
        assert "TorchJD's step time / ours" in table


def test_demo_accepts_every_catalog_key_and_its_baselines() -> None:
    lib = _lib()
    keys = [m.key for m in bl.catalog.methods()]
    assert lib.method_keys() == ["sum", *(m.key for m in lib.CONFIGURATIONS), *keys]
    assert lib.method_keys(baselines=True)[:2] == ["alone:pointer", "alone:countdown"]
    assert lib.resolve_methods(None) == lib.method_keys()
    assert lib.resolve_methods(["alone:countdown", "famo"]) == ["alone:countdown", "famo"]
    with pytest.raises(SystemExit, match="unknown method \\['normalizer'\\]"):
        lib.resolve_methods(["sum", "normalizer"])
    assert lib.describe("sum") == "plain sum(losses)"
    assert lib.describe("alone:pointer") == "pointer loss alone"
    assert lib.describe("upgrad-balanced") == "UPGrad(balance_norms=True)"


def test_weighted_ratio_uses_effective_weights_without_touching_state() -> None:
    lib = _lib()
    batch = lib.make_data(8, seed=0)
    model = lib.PointerCountdownNet(hidden=4)
    plain = lib.weighted_gradient_ratio(model, lib.make_strategy("sum", model, 0), batch)
    strategy = lib.make_strategy("demo-normalizer-none", model, 0)
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


@pytest.mark.parametrize("key", ["famo", "dwa", "loss-normalizer", "gradient-balancer"])
def test_the_loop_calls_every_method_s_lifecycle(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """after_step after every optimizer step, epoch_end at every epoch's end, for any method;
    the losses after the step are computed only for a method that reads them (FAMO)."""
    lib = _lib()
    cls = bl.catalog.get(key).cls
    calls: dict[str, int] = {"after_step": 0, "epoch_end": 0, "recomputed": 0}
    after_step, epoch_end = cls.after_step, cls.epoch_end
    recompute = lib.task_losses

    def counting_after_step(self: bl.Weighting, losses: object) -> None:
        assert callable(losses)
        calls["after_step"] += 1
        after_step(self, losses)

    def counting_epoch_end(self: bl.Weighting) -> None:
        calls["epoch_end"] += 1
        epoch_end(self)

    def counting_losses(*args: object) -> object:
        calls["recomputed"] += torch.is_grad_enabled() is False
        return recompute(*args)

    monkeypatch.setattr(cls, "after_step", counting_after_step)
    monkeypatch.setattr(cls, "epoch_end", counting_epoch_end)
    monkeypatch.setattr(lib, "task_losses", counting_losses)
    result = lib.train(key, epochs=2, n_train=128, n_val=16, max_steps=3, probe_size=8, hidden=4)
    assert calls["after_step"] == 6  # after every optimizer step
    assert calls["epoch_end"] == 2  # at every epoch's end
    assert calls["recomputed"] == (6 if key == "famo" else 0)
    assert all(math.isfinite(r) for r in result.history["ratio"])


def test_learned_weights_train_with_the_model_and_features_branch() -> None:
    lib = _lib()
    batch = lib.make_data(8, seed=3)
    model = lib.PointerCountdownNet(hidden=4)
    strategy = lib.make_strategy("uncertainty-weighting", model, 0)
    assert not strategy.branches
    assert strategy.weighting is not None
    (log_vars,) = strategy.extra_parameters()
    assert log_vars is strategy.weighting.log_vars
    optimizer = torch.optim.Adam([*model.parameters(), *strategy.extra_parameters()], lr=0.1)
    strategy.step(model, optimizer, batch)
    # Its parameters were in the optimizer: Adam moved them away from 0.
    assert not torch.equal(log_vars.detach(), torch.zeros(2, dtype=log_vars.dtype))
    # GradNorm trains its weights with its own optimizer, on the encoder's last layer.
    gradnorm = lib.make_strategy("grad-norm", model, 0)
    assert gradnorm.extra_parameters() == []
    assert lib.make_strategy("gradient-balancer", model, 0).branches


def test_feature_level_methods_branch_with_shipped_defaults() -> None:
    """Every feature-level method of the catalog is built by key: the weighting branches the
    encoder's output, its constructor gets the defaults (and the configuration's options; PCGrad
    the run's seed), and the probe of the effective weights leaves its state untouched."""
    lib = _lib()
    batch = lib.make_data(8, seed=0)
    for method in bl.catalog.methods("features"):
        name = method.key
        model = lib.PointerCountdownNet(hidden=4)
        strategy = lib.make_strategy(name, model, 5)
        assert type(strategy.weighting) is method.cls, name
        assert strategy.branches, name
        weighting = strategy.weighting
        for option, value in method.options.items():
            assert getattr(weighting, option) == value, name
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
    model = lib.PointerCountdownNet(hidden=4)
    assert int(lib.make_strategy("pcgrad", model, 5).weighting.seed) == 5  # the run's seed
