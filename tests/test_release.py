"""The release machinery: GitHub workflows that validate, and agree with pyproject.toml.

The workflows are checked against the GitHub-workflow JSON schema that ``check-jsonschema``
vendors (no network needed), when it is installed: the ``dev`` extra installs it, so the CI job
that installs that extra runs the check; elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import balanced_losses

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"

# The release check runs a copy of tests/ against the installed wheel, without .github/.
pytestmark = pytest.mark.skipif(
    not WORKFLOWS.is_dir(), reason=".github/workflows is not here (tests copied out of the tree)"
)


def _workflows() -> list[Path]:
    return sorted(WORKFLOWS.glob("*.yml"))


def _pyproject() -> str:
    return (ROOT / "pyproject.toml").read_text()


@pytest.mark.skipif(
    importlib.util.find_spec("check_jsonschema") is None,
    reason="check-jsonschema is not installed (it comes with the dev extra)",
)
@pytest.mark.parametrize(
    "schema", ["vendor.github-workflows", "custom.github-workflows-require-timeout"]
)
def test_workflows_match_the_github_schema(schema: str) -> None:
    files = _workflows()
    assert {p.name for p in files} >= {"ci.yml", "publish.yml"}
    done = subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", schema, *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_tests_the_declared_minimum_torch_and_every_python() -> None:
    ci = (WORKFLOWS / "ci.yml").read_text()
    minimum = re.search(r'"torch>=(\d+\.\d+)"', _pyproject())
    assert minimum is not None, "no `torch>=X.Y` dependency in pyproject.toml"
    assert f'"torch=={minimum.group(1)}.*"' in ci, (
        f"ci.yml's oldest torch is not the declared minimum torch>={minimum.group(1)}"
    )
    classifiers = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', _pyproject())
    matrix = re.search(r"^\s+python: \[(.*)\]$", ci, re.MULTILINE)
    assert matrix is not None, "no `python: [...]` matrix in ci.yml"
    assert re.findall(r'"(3\.\d+)"', matrix.group(1)) == classifiers


@pytest.mark.parametrize(
    ("tag", "returncode"), [(f"v{balanced_losses.__version__}", 0), ("v0.0.0.dev0", 1)]
)
def test_publish_refuses_a_tag_that_is_not_the_version(tag: str, returncode: int) -> None:
    assert "check_tag_version.py" in (WORKFLOWS / "publish.yml").read_text()
    done = subprocess.run(
        [sys.executable, str(ROOT / ".ci" / "check_tag_version.py"), tag],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == returncode, done.stdout + done.stderr
    if returncode:
        assert "does not match the package version" in done.stderr
