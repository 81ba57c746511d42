from __future__ import annotations

import subprocess
import sys

import pytest

import balanced_losses


@pytest.mark.parametrize("name", balanced_losses.__all__)
def test_every_public_name_imports(name):
    assert getattr(balanced_losses, name) is not None


def test_all_is_sorted_and_unique():
    names = [n for n in balanced_losses.__all__ if n != "__version__"]
    assert names == sorted(names, key=lambda n: (not n.isupper(), not n[:1].isupper(), n))
    assert len(set(balanced_losses.__all__)) == len(balanced_losses.__all__)


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
