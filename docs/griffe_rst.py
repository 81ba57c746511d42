"""Griffe extension: render the reST roles in our docstrings as Markdown for mkdocstrings.

The package's docstrings are Google style, with reST markup for math and cross-references so
that they read well in ``help()`` and in an IDE:

- ``:math:`x``` and ``.. math::`` blocks become arithmatex's ``$x$`` and ``$$ ... $$``, which
  MathJax renders;
- ``>>>`` doctest blocks become fenced ``pycon`` code blocks, so they render as code in any
  section (the Google ``Example:`` section is otherwise rendered as a prose admonition);
- ``:class:`~balanced_losses.LossNormalizer``` (and ``:func:``, ``:meth:``, ``:attr:``,
  ``:mod:``, ``:data:``, ``:exc:``, ``:obj:``) become optional autorefs links: a link when the
  target is documented on the site, plain code otherwise, so a reference to an object that is
  not rendered (``torch.nn.BatchNorm1d``) never breaks ``mkdocs build --strict``.

Loaded from ``mkdocs.yml`` by path (``docs/griffe_rst.py:RstToMarkdown``); it is not part of
the package.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?P<role>class|func|meth|attr|mod|data|exc|obj):`(?P<target>[^`]+)`")
_MATH_ROLE = re.compile(r":math:`(?P<tex>[^`]+)`")
_MATH_DIRECTIVE = re.compile(r"^(?P<indent>[ \t]*)\.\. math::[ \t]*(?P<inline>.*)$")


def _math_blocks(text: str) -> str:
    """Turn ``.. math::`` directives (one-line or indented block) into ``$$`` blocks."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _MATH_DIRECTIVE.match(lines[i])
        if match is None:
            out.append(lines[i])
            i += 1
            continue
        indent = match["indent"]
        body = [match["inline"]] if match["inline"].strip() else []
        i += 1
        # The directive's content is every following line indented deeper than the directive
        # (blank lines inside the block included).
        while i < len(lines) and (
            not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > len(indent)
        ):
            body.append(lines[i].strip())
            i += 1
        while body and not body[-1]:
            body.pop()
        # arithmatex needs the block to stand alone: blank lines around, $$ on their own lines.
        out.extend(["", f"{indent}$$", *(f"{indent}{line}" for line in body), f"{indent}$$", ""])
    return "\n".join(out)


def _reference(match: re.Match[str], context: str) -> str:
    target = match["target"].strip()
    short = target.startswith("~")
    target = target.lstrip("~.")
    title = target.rsplit(".", 1)[-1] if short else target
    if match["role"] in ("func", "meth"):
        title += "()"
    if "." not in target:
        # A bare name: a method or attribute of the documented class, else a public name.
        target = f"{context}.{target}" if match["role"] in ("meth", "attr") else target
        if "." not in target:
            target = f"balanced_losses.{target}"
    return f'<autoref identifier="{target}" optional><code>{title}</code></autoref>'


def _prose(text: str, context: str) -> str:
    text = _math_blocks(text)
    text = _MATH_ROLE.sub(lambda m: f"${m['tex']}$", text)
    return _ROLE.sub(lambda m: _reference(m, context), text)


def rst_to_markdown(text: str, context: str = "balanced_losses") -> str:
    """Rewrite doctests, reST math and cross-reference roles of ``text`` as Markdown."""
    out: list[str] = []
    prose: list[str] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        if not lines[i].lstrip().startswith(">>>"):
            prose.append(lines[i])
            i += 1
            continue
        # A doctest block runs from its first `>>>` line to the next blank line.
        indent = lines[i][: len(lines[i]) - len(lines[i].lstrip())]
        block = []
        while i < len(lines) and lines[i].strip():
            block.append(lines[i])
            i += 1
        if prose:
            out.append(_prose("\n".join(prose), context))
            prose = []
        out.extend([f"{indent}```pycon", *block, f"{indent}```"])
    if prose:
        out.append(_prose("\n".join(prose), context))
    return "\n".join(out)


class RstToMarkdown(griffe.Extension):
    """Rewrite reST math and cross-reference roles in every docstring before it is parsed."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        """Convert ``obj``'s docstring in place."""
        if obj.docstring is None:
            return
        context = obj.path if obj.is_class else obj.parent.path if obj.parent else obj.path
        obj.docstring.value = rst_to_markdown(obj.docstring.value, context)
