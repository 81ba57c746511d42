"""Every table and figure of the README and the docs is what benchmarks/render.py makes of the
committed results JSON: no number is typed by hand, and none is stale."""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "benchmarks" / "render.py"

pytestmark = pytest.mark.skipif(
    not RENDER.is_file(), reason="benchmarks/ is not here (tests copied out of the source tree)"
)


def _render() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render", RENDER)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["render"] = module  # dataclasses look their module up by name
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules["render"]
    return module


def test_generated_blocks_match_the_results_json() -> None:
    render = _render()
    stale = []
    for path, expected in render.expected_outputs().items():
        actual = (ROOT / path).read_text()
        if actual != expected:
            diff = difflib.unified_diff(
                actual.splitlines(), expected.splitlines(), path, "rendered", lineterm="", n=1
            )
            stale.append("\n".join(diff))
    assert not stale, "run `python benchmarks/render.py`:\n" + "\n\n".join(stale)


def test_every_page_with_figures_uses_every_block_it_should() -> None:
    """The README and the docs hold the blocks; each block's source JSON is committed."""
    render = _render()
    used: set[str] = set()
    for page in render.PAGES:
        text = (ROOT / page).read_text()
        opened = re.findall(r"<!-- generated: ([\w-]+) ", text)
        closed = re.findall(r"<!-- end generated: ([\w-]+) -->", text)
        assert opened == closed, f"{page}: unbalanced generated markers"
        used.update(opened)
    assert used == set(render.BLOCKS), f"blocks never used: {set(render.BLOCKS) - used}"
    for block in render.BLOCKS.values():
        for source in block.sources:
            assert (ROOT / source).is_file(), source


def test_check_mode_reports_drift(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    render = _render()
    page = tmp_path / "README.md"
    page.write_text(
        "intro\n<!-- generated: demo-table (source: x; regenerate: y) -->\n"
        "| a hand-typed 1.23 |\n<!-- end generated: demo-table -->\nafter\n"
    )
    rendered = render.render_page(page.read_text())
    monkeypatch.setattr(render, "expected_outputs", lambda: {"README.md": "other"})
    monkeypatch.setattr(render, "ROOT", tmp_path)
    assert render.main(["--check"]) == 1
    assert "1.23" in page.read_text()  # --check writes nothing
    assert "1.23" not in rendered
    assert rendered.startswith("intro\n<!-- generated: demo-table (source: examples/")
    assert rendered.endswith("<!-- end generated: demo-table -->\nafter\n")


def test_unknown_block_is_an_error() -> None:
    render = _render()
    text = "<!-- generated: no-such-block (source: x) -->\n<!-- end generated: no-such-block -->"
    with pytest.raises(KeyError, match="no-such-block"):
        render.render_page(text)


def test_the_code_examples_use_the_recommended_method() -> None:
    """The decision path and the README's attach example name the same method."""
    render = _render()
    recommended = render.recommended_feature_method()
    readme = (ROOT / "README.md").read_text()
    assert f"balancer = bl.{recommended}(" in readme
    assert f"balancer = bl.{recommended}(" in (ROOT / "docs" / "getting-started.md").read_text()


def _records(delta_by_method: dict[str, list[float]]) -> dict[str, dict[str, object]]:
    """One result record per problem: one task, 2 identical seeds, Δm (%) per problem given."""
    records = {}
    for i, name in enumerate(("pointer_countdown", "digits", "ucr", "many_tasks")):
        runs = [
            {"method": "alone:a", "seed": s, "smoke": False, "metrics": {"a": 1.0}} for s in (0, 1)
        ]
        for method, deltas in delta_by_method.items():
            metric = {"a": 1.0 + deltas[i] / 100}
            runs += [
                {"method": method, "seed": s, "smoke": False, "metrics": metric} for s in (0, 1)
            ]
        records[name] = {"problem": {"tasks": ["a"]}, "runs": runs}
    return records


def _recommend(records: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> tuple[ModuleType, Any]:
    """``render`` and its recommendation from ``records`` instead of the committed results."""
    render = _render()
    monkeypatch.setattr(render._suite(), "load_all", lambda: records)
    return render, render.recommendation()


def test_the_decision_path_skips_a_method_that_loses_to_a_plain_sum_somewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # FAMO has the better mean rank of the two loss-level methods (5, 1, 1, 1 against 3, 4, 4,
    # 4), but it is worse than a plain sum on the first problem; GradientBalancer ranks first
    # and DBMTL, better than it on one problem and never worse, is its equal.
    records = _records(
        {
            "sum": [20, 20, 20, 20],
            "famo": [100, -50, -50, -50],
            "normalizer-sqrt": [-10, -10, -10, -10],
            "gradient-balancer": [-20, -20, -20, -20],
            "dbmtl": [-20, -20, -20, -30],
            "upgrad": [30, -20, -20, -20],
        }
    )
    render, rec = _recommend(records, monkeypatch)
    assert rec.losses == "normalizer-sqrt"
    assert rec.excluded == {"famo": ["pointer_countdown"]}
    assert rec.best == "gradient-balancer"  # DBMTL ranks ahead of it on the last problem alone
    assert rec.tied == ["gradient-balancer", "dbmtl"]  # UPGrad loses to a plain sum once
    assert rec.features == render.EXAMPLE_METHOD == "dbmtl"


def test_when_every_loss_level_method_loses_somewhere_the_best_rank_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    records = _records(
        {
            "sum": [20, 20, 20, 20],
            "famo": [100, -50, -50, -50],
            "normalizer-sqrt": [30, -10, -10, -10],
            "gradient-balancer": [-20, -20, -20, -20],
        }
    )
    _, rec = _recommend(records, monkeypatch)
    assert rec.losses == "famo"
    assert rec.losing["famo"] == rec.losing["normalizer-sqrt"] == ["pointer_countdown"]
    assert rec.excluded == {}
