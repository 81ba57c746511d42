"""MkDocs hook: the API reference lists every method of the catalog, found, not typed.

Each method's page is the file under ``docs/api/`` that documents it (``::: balanced_losses.X``);
the hook adds one entry per method to the "Loss-level weightings" or "Feature-level methods"
section of ``mkdocs.yml``'s nav, after the pages written there by hand. A method without a
page fails the build, naming the class.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import balanced_losses as bl

SECTIONS = {"loss": "Loss-level weightings", "features": "Feature-level methods"}
_DIRECTIVE = re.compile(r"^::: balanced_losses\.(\w+)\s*$", re.MULTILINE)


def method_pages(docs: Path) -> dict[str, str]:
    """Class name to its page, relative to ``docs``, for every method of the catalog."""
    documented = {
        name: page.relative_to(docs).as_posix()
        for page in sorted((docs / "api").glob("*.md"))
        for name in _DIRECTIVE.findall(page.read_text())
    }
    pages = {}
    for method in bl.catalog.methods():
        if method.options:
            continue  # a named configuration shares its class's page
        if method.name not in documented:
            raise ValueError(
                f"`{method.name}` has no page: add docs/api/<name>.md with "
                f"`::: balanced_losses.{method.name}`"
            )
        pages[method.name] = documented[method.name]
    return pages


def _section(nav: list[Any], title: str) -> list[Any]:
    for entry in nav:
        if isinstance(entry, dict):
            for key, value in entry.items():
                if key == title and isinstance(value, list):
                    return value
                if isinstance(value, list) and (found := _section(value, title)) is not None:
                    return found
    return None  # type: ignore[return-value]


def on_config(config: Any) -> Any:
    """Add each method of the catalog to its section of the nav."""
    docs = Path(config["docs_dir"])
    pages = method_pages(docs)
    for level, title in SECTIONS.items():
        section = _section(config["nav"], title)
        if section is None:
            raise ValueError(f"mkdocs.yml's nav has no section `{title}`")
        written = {next(iter(entry.values())) for entry in section if isinstance(entry, dict)}
        section.extend(
            {m.name: pages[m.name]}
            for m in bl.catalog.methods(level)
            if not m.options and pages[m.name] not in written
        )
    return config
