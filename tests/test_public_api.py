"""The public surface: what ``__all__`` lists imports, is documented, and carries an example."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import balanced_losses

ROOT = Path(__file__).resolve().parents[1]
API_DOCS = ROOT / "docs" / "api"
PUBLIC = [name for name in balanced_losses.__all__ if name != "__version__"]


def _resolve(dotted: str) -> object:
    """The object a mkdocstrings ``::: dotted.path`` identifier names."""
    parts = dotted.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module(".".join(parts[:split]))
        except ModuleNotFoundError:
            continue
        for attr in parts[split:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(dotted)


def _documented() -> dict[str, object]:
    """Identifier -> object for every ``::: identifier`` directive of docs/api/*.md."""
    found = {}
    for page in sorted(API_DOCS.glob("*.md")):
        for dotted in re.findall(r"^:::\s*(\S+)", page.read_text(), flags=re.MULTILINE):
            found[dotted] = _resolve(dotted)
    return found


@pytest.mark.parametrize("name", balanced_losses.__all__)
def test_every_public_name_imports_from_the_package(name):
    namespace: dict[str, object] = {}
    exec(f"from balanced_losses import {name}", namespace)  # the user's spelling
    assert namespace[name] is getattr(balanced_losses, name)


def test_version_is_a_semver_string():
    assert re.fullmatch(r"\d+\.\d+\.\d+", balanced_losses.__version__)


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_is_the_object_its_docs_page_documents(name):
    if not API_DOCS.is_dir():
        pytest.skip("docs/ is not here (tests copied out of the source tree)")
    documented = _documented()
    identifier = f"balanced_losses.{name}"
    assert identifier in documented, f"no docs/api page has `::: {identifier}`"
    assert documented[identifier] is getattr(balanced_losses, name)


def test_every_docs_page_documents_a_public_name():
    if not API_DOCS.is_dir():
        pytest.skip("docs/ is not here (tests copied out of the source tree)")
    stray = sorted(set(_documented()) - {f"balanced_losses.{n}" for n in PUBLIC})
    assert stray == [], "docs/api documents names that are not in `__all__`"


def _examples_of(name: str) -> list[tuple[str, object]]:
    """(label, object) whose docstring must hold a ``>>>`` example for public name ``name``."""
    obj = getattr(balanced_losses, name)
    if not isinstance(obj, types.ModuleType):
        return [(name, obj)]
    # A module's functions; its result classes (diagnostics.GradientReport) are shown in the
    # examples of the functions that return them.
    members = [(f"{name}.{n}", getattr(obj, n)) for n in obj.__all__]
    return [(label, m) for label, m in members if inspect.isfunction(m)]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_public_name_has_a_docstring_with_an_example(name):
    obj = getattr(balanced_losses, name)
    assert (inspect.getdoc(obj) or "").strip(), f"`balanced_losses.{name}` has no docstring"
    examples = _examples_of(name)
    assert examples, f"`balanced_losses.{name}` exports no function"
    missing = [label for label, member in examples if ">>>" not in (inspect.getdoc(member) or "")]
    assert missing == [], f"no runnable >>> example in the docstring of {missing}"


def test_all_is_sorted_unique_and_public():
    names = balanced_losses.__all__
    assert len(set(names)) == len(names)
    private = [n for n in names if n.startswith("_") and n != "__version__"]
    assert private == []
    # ruff's RUF022 (isort-style) order: SCREAMING_CASE, then CamelCase, then the rest.
    key = [(not n.isupper(), not n[:1].isupper(), n) for n in names]
    assert key == sorted(key), "`__all__` is not sorted"


def test_importing_the_package_pulls_in_no_test_or_plotting_library():
    code = (
        "import sys, balanced_losses; "
        "bad = [m for m in ('hypothesis', 'matplotlib', 'pytest', 'torchjd') if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_version_matches_the_distribution_metadata():
    from importlib.metadata import PackageNotFoundError, version

    try:
        installed = version("balanced-losses")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        pytest.skip("balanced-losses is not installed")
    assert balanced_losses.__version__ == installed


def test_the_docs_nav_lists_every_method_of_the_catalog() -> None:
    """docs/nav_hook.py adds each method's page to the nav; a method without one fails."""
    hook_file = ROOT / "docs" / "nav_hook.py"
    if not hook_file.is_file():
        pytest.skip("docs/ is not part of this tree")
    spec = importlib.util.spec_from_file_location("nav_hook", hook_file)
    assert spec is not None
    assert spec.loader is not None
    hook = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hook)
    nav = [
        {
            "API reference": [
                {"Loss-level weightings": [{"Weighting": "api/weighting.md"}]},
                {"Feature-level methods": []},
            ]
        }
    ]
    hook.on_config({"docs_dir": str(ROOT / "docs"), "nav": nav})
    listed = [
        name
        for section in nav[0]["API reference"]
        for entries in section.values()
        for entry in entries
        for name in entry
    ]
    expected = {m.name for m in balanced_losses.catalog.methods() if not m.options}
    assert set(listed) == expected | {"Weighting"}
    assert len(listed) == len(set(listed))
    # The hook reads the source without importing it; it finds the catalog's methods and levels.
    assert hook.methods() == {
        m.name: m.level for m in balanced_losses.catalog.methods() if not m.options
    }
