"""Fail unless a release tag names the package's version: ``v0.1.0`` for ``__version__ = "0.1.0"``.

Usage: ``python .ci/check_tag_version.py TAG`` (the publish workflow passes ``github.ref_name``).
The version is read from ``src/balanced_losses/__init__.py`` as text, the way the build backend
reads it (``[tool.hatch.version]`` in pyproject.toml), so the check needs neither torch nor an
installed package.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

INIT = Path(__file__).resolve().parents[1] / "src" / "balanced_losses" / "__init__.py"


def package_version(init: Path = INIT) -> str:
    """The ``__version__`` string assigned in ``init``."""
    match = re.search(r'^__version__ = "([^"]+)"', init.read_text(), re.MULTILINE)
    if match is None:
        raise SystemExit(f'no `__version__ = "..."` line in {init}')
    return match.group(1)


def main(argv: list[str]) -> int:
    """Compare the tag in ``argv`` with the package version; print what was compared."""
    if len(argv) != 1:
        print("usage: check_tag_version.py TAG", file=sys.stderr)
        return 2
    tag, version = argv[0], package_version()
    if tag != f"v{version}":
        print(
            f"error: the tag {tag!r} does not match the package version {version!r} "
            f"(__version__ in src/balanced_losses/__init__.py): tag the release v{version}, "
            f"or set __version__ to {tag.removeprefix('v')!r} and tag that commit",
            file=sys.stderr,
        )
        return 1
    print(f"tag {tag} matches __version__ {version}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
