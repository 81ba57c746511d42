"""The benchmark suite runs every problem and method (smoke), and its tables match its results."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(
    not (ROOT / "benchmarks" / "suite.py").is_file(), reason="benchmarks/ is not here"
)


def _run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "suite.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, f"suite failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


# A few steps of every method on every problem: about a minute on 2 cores.
@pytest.mark.slow
def test_smoke_runs_every_problem_and_method(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("aeon")
    out = _run("--smoke", "--jobs", "2", "--out", str(tmp_path))
    assert "countdown/pointer gradient at the encoder" in out  # problem 1's calibration line
    assert "ETA" in out
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import suite

    for name in suite.PROBLEMS:
        record = json.loads((tmp_path / f"{name}.json").read_text())
        problem = suite.load_problem(name)
        methods = {r["method"] for r in record["runs"]}
        assert methods == set(suite.methods_of(problem)), name
        for run in record["runs"]:
            assert set(run["metrics"]) == set(problem.tasks)


def test_reuse_skips_the_runs_already_done(tmp_path: Path) -> None:
    args = ["--smoke", "--jobs", "1", "--out", str(tmp_path), "--problems", "many_tasks"]
    _run(*args, "--methods", "sum")
    first = json.loads((tmp_path / "many_tasks.json").read_text())["runs"]
    out = _run(*args, "--methods", "sum", "rlw", "--reuse")
    assert "1 runs" in out  # only rlw was missing
    runs = json.loads((tmp_path / "many_tasks.json").read_text())["runs"]
    assert {r["method"] for r in runs} == {"sum", "rlw"}
    assert [r for r in runs if r["method"] == "sum"] == first


def test_tables_match_the_results() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "render_suite.py"), "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _record(metrics: dict[str, dict[int, dict[str, float]]]) -> dict[str, object]:
    runs = [
        {"method": m, "seed": s, "smoke": False, "metrics": ms}
        for m, by_seed in metrics.items()
        for s, ms in by_seed.items()
    ]
    return {"problem": {"tasks": ["a", "b"]}, "runs": runs}


def test_scaling_table_from_hand_made_results() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render_suite as rs

    alone = {"alone:a": {0: {"a": 1.0}, 1: {"a": 1.0}}, "alone:b": {0: {"b": 2.0}, 1: {"b": 2.0}}}
    # Δm of the plain sum: (0.1 / 1 + 0) / 2 = +5 % and (0 + 0.2 / 2) / 2 = +5 %; of DBMTL at
    # K=40: (-0.1 + 0) / 2 = -5 % and (0 - 0.2 / 2) / 2 = -5 %; at K=10 and 20 the same as sum.
    plain = {0: {"a": 1.1, "b": 2.0}, 1: {"a": 1.0, "b": 2.2}}
    better = {0: {"a": 0.9, "b": 2.0}, 1: {"a": 1.0, "b": 1.8}}
    records = {
        k: _record({**alone, "sum": plain, "dbmtl": better if k == 40 else plain})
        for k in (10, 20, 40)
    }
    rows = [{"method": "sum", "ratio": 1.0, "step_seconds": 0.002}]
    speed = {
        "problems": {
            name: {"rows": [*rows, {"method": "dbmtl", "ratio": 1.0 + k / 100}]}
            for k, name in rs.SCALING.items()
        }
    }
    table = rs.scaling_table(records, speed)
    lines = table.splitlines()
    assert lines[2] == "| plain sum | +5.0 ± 0.0 | +5.0 ± 0.0 | +5.0 ± 0.0 | 1.00 | 1.00 | 1.00 |"
    assert lines[3] == "| `DBMTL` | +5.0 ± 0.0 | +5.0 ± 0.0 | -5.0 ± 0.0 | 1.10 | 1.20 | 1.40 |"
    assert "2.0 ms at K=10, 2.0 ms at K=20, 2.0 ms at K=40" in table
    assert "beyond seed noise at K=10: none." in table
    assert "beyond seed noise at K=40: `DBMTL`." in table


def test_scaling_problems_run_their_methods(tmp_path: Path) -> None:
    # many_tasks_k10: the first 10 of the 40 tasks, each alone, the constant baseline and the
    # study's methods.
    _run("--smoke", "--jobs", "1", "--out", str(tmp_path), "--problems", "many_tasks_k10")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import suite

    runs = json.loads((tmp_path / "many_tasks_k10.json").read_text())["runs"]
    alone = {f"alone:t{i:02d}" for i in range(10)}
    assert {r["method"] for r in runs} - set(suite.SCALING_METHODS) == {*alone, suite.CONSTANT}
    assert all(len(r["metrics"]) == 10 for r in runs)


@pytest.mark.parametrize(("variant", "lr"), [("sum-lr-3e-3", 3e-3), ("dbmtl-lr-3e-4", 3e-4)])
def test_learning_rate_variants_change_the_rate_alone(variant: str, lr: float) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import suite

    problem = suite.load_problem("many_tasks_k10")
    train, _ = problem.data(smoke=True)
    trainer = suite.start(problem, variant, train, seed=0)
    base = suite.start(problem, suite.LR_VARIANTS[variant][0], train, seed=0)
    assert type(trainer) is type(base)
    assert type(trainer.weighting) is type(base.weighting)
    assert all(g["lr"] == lr for g in trainer.optimizer.param_groups)
    assert base.optimizer.param_groups[0]["lr"] == problem.budget.lr


def test_constant_baseline_predicts_the_training_targets_summary() -> None:
    # Hand-computed: targets 1, 2, 6 have mean 3; classes [0, 2, 2] have frequencies 1/3, 0, 2/3
    # (the majority, 2, is predicted); a positive rate of 1/4 has logit log(1/3).
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from problems import ConstantModel, constant_row

    torch.testing.assert_close(
        constant_row(torch.tensor([[1.0], [2.0], [6.0]]), "regression"), torch.tensor([3.0])
    )
    logits = constant_row(torch.tensor([0, 2, 2]), "class", 3)
    torch.testing.assert_close(logits.exp(), torch.tensor([1 / 3, 1e-12, 2 / 3]))
    rate = constant_row(torch.tensor([[0.0], [0.0], [1.0], [0.0]]), "binary")
    torch.testing.assert_close(rate, torch.tensor([math.log(1 / 3)]))
    out = ConstantModel({"a": torch.tensor([3.0, 4.0])})(torch.zeros(5, 7))
    assert out["a"].shape == (5, 2)
    assert (out["a"] == torch.tensor([3.0, 4.0])).all()


def test_constant_runs_record_the_initial_gradient_imbalance(tmp_path: Path) -> None:
    # many_tasks_k10: synthetic data, nothing to install.
    _run(
        "--smoke",
        "--jobs",
        "1",
        "--out",
        str(tmp_path),
        "--problems",
        "many_tasks_k10",
        "--methods",
        "constant",
    )
    (run,) = json.loads((tmp_path / "many_tasks_k10.json").read_text())["runs"]
    assert run["steps"] == 0
    tasks = {f"t{i:02d}" for i in range(10)}
    assert set(run["init_grad_norms"]) == set(run["metrics"]) == tasks
    assert all(v > 0 for v in run["init_grad_norms"].values())


def test_delta_m_takes_a_zero_single_task_score_relative_to_the_metric_floor() -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from render_suite import delta_m

    # Task a: (3 - 2) / 2 = +50 %; task b alone scored 0 %, its floor is 0.4: (0.8 - 0) / 0.4.
    assert delta_m({"a": 3.0, "b": 0.8}, {"a": 2.0, "b": 0.0}, {"b": 0.4}) == pytest.approx(125.0)
    # Above the floor, the floor changes nothing.
    assert delta_m({"a": 3.0}, {"a": 2.0}, {"a": 0.4}) == pytest.approx(50.0)
    with pytest.raises(ValueError, match=r"task `b` trained alone scored 0\.0"):
        delta_m({"b": 0.8}, {"b": 0.0})
