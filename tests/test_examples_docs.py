"""The examples run (in their few-step smoke mode), the docs' figures regenerate, and every
public class carries a runnable ``>>>`` example (the doctests themselves run through
``--doctest-modules``)."""

from __future__ import annotations

import ast
import csv
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import balanced_losses

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
    assert "loss/sum=" in lines[-1]  # log_dict's plain sum of the raw losses


@pytest.mark.slow
@needs_examples
def test_monitor_example_writes_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    logdir = tmp_path / "runs"
    run_script(EXAMPLES / "monitor_tensorboard.py", "--logdir", str(logdir), cwd=tmp_path)
    events = list(logdir.glob("events.out.tfevents.*"))
    assert len(events) == 1
    assert events[0].stat().st_size > 0


@needs_examples
def test_monitor_example_logs_what_the_real_gradient_monitor_measures(monkeypatch, capsys):
    """The example with the real diagnostics.GradientMonitor, watched by a recording subclass."""
    from balanced_losses.diagnostics import GradientMonitor

    measured: list[dict[str, float]] = []
    instances: list[GradientMonitor] = []

    class Recording(GradientMonitor):
        def __init__(self, params, **kwargs):
            super().__init__(params, **kwargs)
            self.params = list(params)
            instances.append(self)

        def step(self, losses, params=None):
            report = super().step(losses, params)
            if report is not None:
                # Independently of diagnostics: each loss's gradient on the watched parameters.
                by_hand = {}
                for task, loss in losses.items():
                    grads = torch.autograd.grad(loss, self.params, retain_graph=True)
                    by_hand[task] = torch.sqrt(sum(g.square().sum() for g in grads)).item()
                measured.append(by_hand)
            return report

    example = runpy.run_path(str(EXAMPLES / "monitor_tensorboard.py"), run_name="example")
    # main() reads the name from its own module globals (run_path returns a copy of them).
    monkeypatch.setitem(example["main"].__globals__, "GradientMonitor", Recording)
    logged = example["main"](
        [
            "--steps",
            "5",
            "--every",
            "2",
            "--log-every",
            "5",
            "--no-tensorboard",
            "--batch-size",
            "4",
        ]
    )
    (monitor,) = instances
    assert monitor.steps == 5
    assert monitor.every == 2
    assert len(measured) == 3  # steps 1, 3 and 5
    # The monitor watches the shared encoder, where the tasks compete.
    encoder = list(monitor.params)
    assert len(encoder) == 4  # two Linear layers: weights and biases
    assert all(p.shape[0] == 32 for p in encoder)
    for task in ("pointer", "countdown"):
        assert logged[f"gradient/grad_norm/{task}"] == pytest.approx(measured[-1][task], rel=1e-5)
        assert measured[-1][task] > 0
    shares = [logged[f"gradient/grad_share/{t}"] for t in ("pointer", "countdown")]
    assert sum(shares) == pytest.approx(1.0)
    assert "step     5" in capsys.readouterr().out


TWO_TASKS = ("pointer", "countdown")


def _check_lightning_run(
    tmp_path: Path, weighting: str | None, state: str, *, feature_level: bool = False
) -> list[dict[str, str]]:
    """Run the Lightning example (``None``: its default weighting); return its logged rows."""
    pytest.importorskip("lightning")
    logdir = tmp_path / "logs"
    chosen = ["--weighting", weighting] if weighting is not None else []
    out = run_script(
        EXAMPLES / "lightning_module.py", *chosen, "--logdir", str(logdir), cwd=tmp_path
    ).stdout
    assert f"restored weighting state: {state}" in out
    (metrics,) = logdir.glob(f"two_task_{weighting or 'calibrated'}/version_*/metrics.csv")
    with metrics.open() as f:
        rows = [r for r in csv.DictReader(f) if r["weight/pointer"]]
    weights = [(float(r["weight/pointer"]), float(r["weight/countdown"])) for r in rows]
    assert len(weights) == 4  # one row per step in smoke mode
    assert all(w > 0 for pair in weights for w in pair)
    with metrics.open() as f:
        assert any(r["val_loss/countdown"] for r in csv.DictReader(f))  # validation ran, logged
    # log_dict's plain sum of the raw losses, on the same rows as the weights.
    for r in rows:
        assert float(r["loss/sum"]) == pytest.approx(
            float(r["loss/pointer"]) + float(r["loss/countdown"]), rel=1e-5
        )
    # Gradient shares: logged by the feature-level methods only (attach measured them).
    if not feature_level:
        assert not any(r.get("grad_share/pointer") for r in rows)
    return rows


@needs_examples
def test_lightning_example_calibrates_then_fixes_the_weights_by_default(tmp_path):
    """The default, CalibratedBalancer attached to the encoder: in smoke mode it balances the
    gradients at the encoder for 2 steps (a plain sum, the shares logged), then trains on the
    weights it reached, fixed; its state survives the checkpoint."""
    rows = _check_lightning_run(
        tmp_path,
        None,
        "['_extra_state', 'count', 'ema', 'frozen_scale', 'steps_done']",
        feature_level=True,
    )
    calibrating, fixed = rows[:2], rows[2:]
    for r in calibrating:
        shares = float(r["grad_share/pointer"]), float(r["grad_share/countdown"])
        assert sum(shares) == pytest.approx(1.0)
        assert all(0 < share < 1 for share in shares)
        # The balancing acts in backward: the total is the plain sum.
        assert float(r["loss/total"]) == pytest.approx(float(r["loss/sum"]), rel=1e-6)
    weights = {(r["weight/pointer"], r["weight/countdown"]) for r in fixed}
    assert len(weights) == 1  # fixed: the same weights on every later step
    for r in fixed:
        # The fixed weights act on the gradient; the total keeps the plain sum's value.
        assert float(r["loss/total"]) == pytest.approx(float(r["loss/sum"]), rel=1e-6)
    # The countdown's loss (and gradient) is the larger: its multiplier went below the pointer's.
    (pointer, countdown) = next(iter(weights))
    assert float(countdown) < 1 < float(pointer)


@pytest.mark.slow
@needs_examples
def test_lightning_example_with_uncertainty_weighting(tmp_path):
    _check_lightning_run(tmp_path, "uncertainty", "['_extra_state', 'log_vars']")


@pytest.mark.slow
@needs_examples
def test_lightning_example_with_loss_normalizer(tmp_path):
    _check_lightning_run(
        tmp_path,
        "normalizer",
        "['_extra_state', 'count', 'ema', 'micro_step', 'pending_count', 'pending_sum']",
    )


@pytest.mark.slow
def test_docs_figures_regenerate(tmp_path):
    pytest.importorskip("matplotlib")
    if not (DOCS / "make_figures.py").is_file():
        pytest.skip("docs/ is not here (tests copied out of the source tree)")
    run_script(DOCS / "make_figures.py", "--out", str(tmp_path), cwd=tmp_path)
    made = sorted(p.name for p in tmp_path.glob("*.png"))
    # pointer_countdown.png is the demo's own output (examples/pointer_countdown.py), copied;
    # suite_*.png are benchmarks/render_suite.py's, from the suite's results.
    committed = sorted(
        p.name
        for p in (DOCS / "figures").glob("*.png")
        if p.name != "pointer_countdown.png" and not p.name.startswith("suite_")
    )
    assert made == committed
    assert made  # the docs show at least one figure


def _amp_lines(*args: str, tmp_path: Path) -> list[dict[str, float]]:
    """The amp example's log lines in smoke mode (steps 1, 3 and 5), as dicts of floats."""
    out = run_script(EXAMPLES / "amp_loop.py", "--smoke", *args, cwd=tmp_path).stdout
    lines = [line for line in out.splitlines() if line.startswith("step")]
    assert len(lines) == 3  # log_dict(every=2): steps 1, 3 and 5
    return [{k: float(v) for k, v in (i.split("=") for i in line.split()[2:])} for line in lines]


@needs_examples
def test_amp_loop_example_trains_with_float16_and_grad_scaler(tmp_path):
    """The default, CalibratedBalancer: calibrating over steps 1-4 in smoke mode (the balancing
    in the scaled backward), then fixed weights on steps 5 and 6."""
    first, calibrating, fixed = _amp_lines(tmp_path=tmp_path)
    assert fixed["scale"] > 1  # GradScaler("cpu") is enabled and scaling
    # While calibrating the total is the plain sum; attach routed the heads' inputs, so the
    # balancer saw both tasks' gradients at the trunk.
    assert calibrating["loss/total"] == pytest.approx(calibrating["loss/sum"], rel=1e-3)
    shares = [calibrating[f"grad_share/{task}"] for task in ("kind", "position")]
    assert all(0 < share < 1 for share in shares)
    assert sum(shares) == pytest.approx(1.0, abs=1e-3)  # printed with 4 significant digits
    # The large-valued regression sends the larger gradient into the trunk: its multiplier is
    # lowered, the classification's lifted, whatever the scaler's factor.
    assert calibrating["weight/position"] < 1 < calibrating["weight/kind"]
    # Fixed: nothing measured at the trunk any more; the weights act on the gradient and the
    # total keeps the plain sum's value.
    assert not any(key.startswith("grad_share/") for key in fixed)
    assert fixed["loss/total"] == pytest.approx(fixed["loss/sum"], rel=1e-3)
    assert fixed["weight/position"] < 1 < fixed["weight/kind"]
    assert fixed["loss/sum"] > fixed["loss/position"]
    assert first["weight/kind"] > 0


@needs_examples
def test_amp_loop_example_with_dbmtl_divides_by_the_loss(tmp_path):
    *_, last = _amp_lines("--weighting", "dbmtl", tmp_path=tmp_path)
    assert last["scale"] > 1
    for task in ("kind", "position"):
        assert last[f"weight/{task}"] > 0
    # attach routed the heads' inputs: DBMTL saw both tasks' gradients at the trunk.
    shares = [last[f"grad_share/{task}"] for task in ("kind", "position")]
    assert all(0 < share < 1 for share in shares)
    assert sum(shares) == pytest.approx(1.0, abs=1e-3)
    assert last["loss/sum"] > last["loss/position"]
    # DBMTL divides by the loss: the large-valued regression gets the smaller weight.
    assert last["weight/position"] < last["weight/kind"]


@needs_examples
@pytest.mark.parametrize("weighting", ["calibrated", "dbmtl"])
@pytest.mark.parametrize(
    "heads",
    [
        pytest.param({"kind": "kind", "position": "position"}, id="routed"),
        pytest.param(None, id="measured"),
    ],
)
def test_amp_loop_attach_scales_the_trunk_gradient_like_the_heads(weighting, heads):
    """Under float16 autocast + GradScaler, the unscaled trunk gradient equals the unscaled
    gradient of the same step without the scaler (the example's model and data)."""
    from torch.nn import functional as F

    example = runpy.run_path(str(EXAMPLES / "amp_loop.py"), run_name="example")

    def unscaled_grads(scale: float | None) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = example["TwoHeads"]()
        balancer = example["make_weighting"](weighting)
        balancer.attach(model, "trunk", heads)
        x, kind, position = example["make_batch"](torch.Generator().manual_seed(0), 64)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
        losses = {
            "kind": F.cross_entropy(out["kind"].float(), kind),
            "position": F.mse_loss(out["position"].float(), position),
        }
        total = balancer(losses)
        if scale is None:
            total.backward()
        else:
            scaler = torch.amp.GradScaler("cpu", init_scale=scale)
            scaler.scale(total).backward()
            scaler.unscale_(torch.optim.SGD(model.parameters(), lr=0.0))
        return [model.trunk[0].weight.grad, model.kind.weight.grad]

    # float16 rounds differently with and without the scale: compared as whole tensors. DBMTL
    # divides each gradient by its loss, so its scaled gradients stay finite at GradScaler's
    # initial scale, 2^16; CalibratedBalancer's first step balances the raw gradients, whose
    # regression part overflows float16 there (GradScaler backs off in training): 2^8.
    scale = {"calibrated": 2.0**8, "dbmtl": 2.0**16}[weighting]
    for scaled, plain in zip(unscaled_grads(scale), unscaled_grads(None), strict=True):
        assert (scaled - plain).norm() < 1e-2 * plain.norm()


# About 15 s (two spawned processes, three weightings); tests/test_fsdp.py covers FSDP2 by default.
@pytest.mark.slow
@needs_examples
def test_fsdp2_example_trains_every_weighting_on_two_spawned_ranks(tmp_path):
    out = run_script(EXAMPLES / "fsdp2.py", "--smoke", cwd=tmp_path).stdout
    for weighting in ("calibrated", "gradnorm", "uncertainty"):
        assert f"{weighting}: weights after 4 steps" in out
    # CalibratedBalancer fixed its weights after 2 steps, the same on both ranks.
    assert "(fixed after 2 steps); identical on all ranks" in out
    assert out.count("identical on all ranks") == 3


# 8 s on an idle 2-core machine, 13 s under load (two Trainer runs and an evaluation): slow.
@pytest.mark.slow
@needs_examples
def test_hf_trainer_example_resumes_the_weighting_from_its_checkpoint(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    out = run_script(EXAMPLES / "hf_trainer.py", "--smoke", cwd=tmp_path).stdout
    # CalibratedBalancer's statistics, not only its task names.
    assert (
        "resume restored the weighting's state of step 2: "
        "['_extra_state', 'count', 'ema', 'frozen_scale', 'steps_done']"
    ) in out
    # Resumed during the calibration (3 steps), it finished it and froze the same weights.
    assert "resumed run ends in the uninterrupted run's weighting state: True" in out
    assert "after 4 steps, calibrated over 3: frozen True" in out
    assert "eval loss" in out
    # The Trainer's training logs carry log_dict's keys: gradient shares while it calibrates
    # (attach measured them), none once the weights are fixed.
    logs = {}
    for line in out.splitlines():
        if line.startswith("weighting logs at step "):
            step, text = line.removeprefix("weighting logs at step ").split(": ", 1)
            logs[int(step)] = ast.literal_eval(text)
    assert sorted(logs) == [2, 4]
    assert logs[2]["grad_share/topic"] + logs[2]["grad_share/salience"] == pytest.approx(1, 1e-3)
    assert logs[2]["loss/total"] == pytest.approx(logs[2]["loss/sum"], rel=1e-3)
    assert not any(key.startswith("grad_share/") for key in logs[4])
    assert logs[4]["loss/total"] == pytest.approx(logs[4]["loss/sum"], rel=1e-3)
    assert logs[4]["weight/topic"] != pytest.approx(logs[4]["weight/salience"], rel=1e-3)
