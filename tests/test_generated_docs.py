"""Every table and figure of the README and the docs is what benchmarks/render.py makes of the
committed results JSON: no number is typed by hand, and none is stale."""

from __future__ import annotations

import difflib
import importlib.util
import re
import sys
from pathlib import Path
from types import ModuleType

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


def test_the_code_examples_build_the_recommended_default() -> None:
    """The README's and getting-started's first snippets build the default the answer names."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import render_default

    default = render_default.DEFAULT_CLASS
    readme = (ROOT / "README.md").read_text()
    assert f"balancer = bl.{default}([" in readme
    assert f"balancer = bl.{default}([" in (ROOT / "docs" / "getting-started.md").read_text()
    assert f"Use `{default}` at its defaults" in readme
