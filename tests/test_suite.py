"""The benchmark suite runs every problem and method (smoke), and its tables match its results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
