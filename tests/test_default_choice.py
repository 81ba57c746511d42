"""The rule behind the recommended default, on hand-made results (benchmarks/render_default.py).

A method holds on a problem when it is not worse than a plain sum beyond seed noise, no seed
diverged (a task worse than a constant prediction and than the task trained alone) and its
worst seed is no worse than a plain sum's.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

# ruff: noqa: RUF001  (the rendered text uses the multiplication and plus-minus signs)

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"

pytestmark = pytest.mark.skipif(
    not BENCHMARKS.is_dir(), reason="benchmarks/ is not here (tests copied out of the source tree)"
)


@pytest.fixture
def rd() -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    import render_default

    return render_default


def _record(
    metrics: dict[str, list[float]], *, alone: list[float], constant: float = 2.0
) -> dict[str, Any]:
    """One task `a`; per method its metric on seeds 0, 1, ...: Δm = 100 (metric / alone - 1)."""
    runs: list[dict[str, Any]] = [
        {"method": "alone:a", "seed": s, "smoke": False, "metrics": {"a": v}}
        for s, v in enumerate(alone)
    ]
    runs += [
        {
            "method": "constant",
            "seed": s,
            "smoke": False,
            "metrics": {"a": constant},
            "init_grad_norms": {"a": 1.0},
        }
        for s in range(len(alone))
    ]
    for method, values in metrics.items():
        runs += [
            {"method": method, "seed": s, "smoke": False, "metrics": {"a": v}}
            for s, v in enumerate(values)
        ]
    return {"problem": {"tasks": ["a"], "name": "p"}, "runs": runs}


def test_verdicts_against_a_plain_sum(rd: Any) -> None:
    # Δm of a plain sum: +50, +60, +40 (mean +50, standard error 5.8).
    record = _record(
        {
            "sum": [1.5, 1.6, 1.4],
            "better": [1.1, 1.0, 1.2],  # +10 ± 5.8: 40 apart, beyond 2 x 8.2
            "close": [1.4, 1.5, 1.6],  # +50 ± 5.8
            "worse": [1.9, 1.9, 1.95],  # +92 ± 1.7 (shown rounded: ± 2)
        },
        alone=[1.0, 1.0, 1.0],
    )
    assert rd.check(record, "better").verdict == "better"
    assert rd.check(record, "close").verdict == "within noise"
    assert rd.check(record, "worse").verdict == "worse"
    assert rd.check(record, "better").holds
    assert rd.check(record, "close").holds  # same worst seed as a plain sum's, +60
    assert not rd.check(record, "worse").holds
    assert rd.check(record, "missing") is None


def test_a_diverged_seed_is_worse_than_a_constant_and_than_the_task_alone(rd: Any) -> None:
    # Constant: 2.0. Seed 0: 2.5 is worse than both (diverged). Seed 1: alone 3.0 is itself
    # worse than the constant, and 2.5 beats it (not diverged). Seed 2: 1.8 beats the constant.
    record = _record({"sum": [2.5, 2.5, 1.8], "m": [1.0, 2.5, 1.8]}, alone=[1.0, 3.0, 1.0])
    assert rd.diverged_seeds(record, "sum") == [0]
    assert rd.diverged_seeds(record, "m") == []
    check = rd.check(record, "sum")
    assert check.diverged == [0]
    assert not check.holds
    assert rd.check(record, "m").sum_diverged == [0]


def test_a_worst_seed_beyond_a_plain_sums_does_not_hold_even_within_noise(rd: Any) -> None:
    record = _record({"sum": [1.5, 1.5, 1.5, 1.5], "m": [1.0, 1.0, 1.0, 1.9]}, alone=[1.0] * 4)
    check = rd.check(record, "m")
    assert check.verdict == "within noise"  # +22.5 ± 22.5 against +50 ± 0
    assert check.worst == pytest.approx(90.0)
    assert check.sum_worst == pytest.approx(50.0)
    assert not check.holds


def test_the_study_table_marks_where_a_method_does_not_hold(
    rd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        rd, "step_ratio", lambda method, *_: 1.05 if method == "worse" else math.nan
    )
    record = _record({"sum": [1.5, 1.6, 1.4], "worse": [1.9, 1.9, 1.95]}, alone=[1.0] * 3)
    table = rd.study_table({"p": record}, ["sum", "worse"])
    rows = {line.split(" | ")[0].strip("| "): line for line in table.splitlines()[2:]}
    assert rows["plain sum"].endswith("| 1 of 1 |  |")
    assert "+92 ± 2 (worst +95) ✗" in rows["`worse`"]
    assert rows["`worse`"].endswith("| 0 of 1 | 1.05 |")


def test_the_imbalance_sentence_reads_the_initial_gradients(
    rd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rd, "DEFAULT", "m")
    monkeypatch.setattr(rd, "step_ratio", lambda method, *_: 1.0)
    helped = _record({"sum": [1.5, 1.6, 1.4], "m": [1.1, 1.0, 1.2]}, alone=[1.0] * 3)
    same = _record({"sum": [1.5, 1.6, 1.4], "m": [1.4, 1.5, 1.6]}, alone=[1.0] * 3)
    for run in helped["runs"]:
        if run["method"] == "constant":
            run["init_grad_norms"] = {"a": 10.0, "b": 1.0}
    for run in same["runs"]:
        if run["method"] == "constant":
            run["init_grad_norms"] = {"a": 1.5, "b": 1.0}
    text = rd.imbalance_sentence({"helped": helped, "same": same})
    assert text.startswith("Where the tasks' gradients at the shared layers start close")
    assert "a plain sum was as good on same (1.5×)" in text
    assert "beyond seed noise on helped (10×)" in text


def test_the_imbalance_sentence_says_when_the_ratio_does_not_separate(
    rd: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(rd, "DEFAULT", "m")
    monkeypatch.setattr(rd, "step_ratio", lambda method, *_: 1.0)
    helped = _record({"sum": [1.5, 1.6, 1.4], "m": [1.1, 1.0, 1.2]}, alone=[1.0] * 3)
    same = _record({"sum": [1.5, 1.6, 1.4], "m": [1.4, 1.5, 1.6]}, alone=[1.0] * 3)
    for record, ratio in ((helped, 1.5), (same, 3000.0)):
        for run in record["runs"]:
            if run["method"] == "constant":
                run["init_grad_norms"] = {"a": ratio, "b": 1.0}
    text = rd.imbalance_sentence({"helped": helped, "same": same})
    assert "A plain sum was as good (within seed noise) on same (3e+03×)" in text
    assert "it did not tell these apart on its own" in text
