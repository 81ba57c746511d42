"""MkDocs hook: the API reference lists every method of the package, found, not typed.

The methods are read from the source, as ``balanced_losses.catalog`` finds them at run time:
the classes exported by the package, defined in ``weighting/`` (loss-level) or ``features/``
(feature-level), that derive from ``Weighting`` (the bases to build on left out). The source
is parsed, not imported, so the docs build needs neither torch nor the installed package; a
test checks that this list is the catalog's. Each method's page is the file under
``docs/api/`` that documents it (``::: balanced_losses.X``); the hook adds one entry per method
to the "Loss-level weightings" or "Feature-level methods" section of ``mkdocs.yml``'s nav,
after the pages written there by hand. A method without a page fails the build, naming it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

SRC = Path(__file__).resolve().parents[1] / "src" / "balanced_losses"
SECTIONS = {"loss": "Loss-level weightings", "features": "Feature-level methods"}
#: The catalog's bases to build on (``balanced_losses/catalog.py``).
BASES = ("Weighting", "FeatureWeighting", "GramianWeighting")
_DIRECTIVE = re.compile(r"^::: balanced_losses\.(\w+)\s*$", re.MULTILINE)


def _exported() -> set[str]:
    tree = ast.parse((SRC / "__init__.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            return set(ast.literal_eval(node.value))
    raise ValueError(f"{SRC / '__init__.py'} has no __all__")


def _base_name(node: ast.expr) -> str:
    return node.attr if isinstance(node, ast.Attribute) else getattr(node, "id", "")


def methods() -> dict[str, str]:
    """Class name to its level (``"loss"`` or ``"features"``), for every method of the package."""
    parents: dict[str, list[str]] = {}
    folder: dict[str, str] = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef):
                parents[node.name] = [_base_name(b) for b in node.bases]
                folder[node.name] = path.parent.name

    def derives(name: str) -> bool:
        return any(p == "Weighting" or derives(p) for p in parents.get(name, []))

    levels = {"weighting": "loss", "features": "features"}
    return {
        name: levels[folder[name]]
        for name in sorted(_exported())
        if folder.get(name) in levels and name not in BASES and derives(name)
    }


def method_pages(docs: Path) -> dict[str, str]:
    """Class name to its page, relative to ``docs``, for every method."""
    documented = {
        name: page.relative_to(docs).as_posix()
        for page in sorted((docs / "api").glob("*.md"))
        for name in _DIRECTIVE.findall(page.read_text())
    }
    pages = {}
    for name in methods():
        if name not in documented:
            raise ValueError(
                f"`{name}` has no page: add docs/api/<name>.md with `::: balanced_losses.{name}`"
            )
        pages[name] = documented[name]
    return pages


def _section(nav: list[Any], title: str) -> list[Any] | None:
    for entry in nav:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key == title and isinstance(value, list):
                    return value
                if isinstance(value, list) and (found := _section(value, title)) is not None:
                    return found
    return None


def on_config(config: Any) -> Any:
    """Add each method to its family's section of the nav."""
    docs = Path(config["docs_dir"])
    pages, levels = method_pages(docs), methods()
    for level, title in SECTIONS.items():
        section = _section(config["nav"], title)
        if section is None:
            raise ValueError(f"mkdocs.yml's nav has no section `{title}`")
        written = {next(iter(entry.values())) for entry in section if isinstance(entry, dict)}
        section.extend(
            {name: pages[name]}
            for name, found in levels.items()
            if found == level and pages[name] not in written
        )
    return config
