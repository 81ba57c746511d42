"""The package's import graph, read from the modules' own import statements.

Arrows point one way: shared helpers <- weightings and features <- diagnostics <- the package
root. No module imports inside a function, only ``distributed`` talks to ``torch.distributed``,
and every public class has exactly one import path, ``balanced_losses.X``.
"""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import balanced_losses as bl

SRC = Path(bl.__file__).parent

# Lower layers may be imported by higher ones, never the reverse.
LAYERS = {
    "_checks": 0,
    "_numerics": 0,
    "_autograd": 0,
    "distributed": 0,
    "functional": 0,
    "_state": 0,
    "_watch": 0,
    "_lifecycle": 0,
    "_base": 1,
    "losses": 1,
    "_calibration": 2,  # the calibrate-then-freeze base of one method in each family
    "weighting": 3,
    "features": 4,
    "aggregation": 5,
    "catalog": 5,
    "diagnostics": 5,
    "__init__": 6,
}


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(SRC).with_suffix("").parts): path
        for path in sorted(SRC.rglob("*.py"))
    }


def _layer(module: str) -> int:
    top = module.split(".")[0]
    if top == "__init__" or (module.endswith("__init__") and "." not in module):
        return LAYERS["__init__"]
    return LAYERS[top]


def _package_imports(tree: ast.AST) -> list[tuple[str, ast.stmt]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "balanced_losses":
                found.extend((alias.name, node) for alias in node.names)
            elif node.module.startswith("balanced_losses."):
                found.append((node.module.removeprefix("balanced_losses."), node))
        elif isinstance(node, ast.Import):
            found.extend(
                (alias.name.removeprefix("balanced_losses."), node)
                for alias in node.names
                if alias.name.startswith("balanced_losses.")
            )
    return found


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_point_downward(module: str) -> None:
    tree = ast.parse(_modules()[module].read_text())
    here = _layer(module)
    for target, node in _package_imports(tree):
        there = _layer(target)
        same_family = target.split(".")[0] == module.split(".")[0]
        assert there < here or (same_family and there == here), (
            f"{module} (layer {here}) imports {target} (layer {there}) at line {node.lineno}"
        )


@pytest.mark.parametrize("module", sorted(_modules()))
def test_no_import_inside_a_function(module: str) -> None:
    tree = ast.parse(_modules()[module].read_text())
    for func in ast.walk(tree):
        if isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for node in ast.walk(func):
                assert not isinstance(node, (ast.Import, ast.ImportFrom)), (
                    f"{module}.{func.name} imports at line {node.lineno}"
                )


def test_only_distributed_talks_to_torch_distributed() -> None:
    for module, path in _modules().items():
        if module == "distributed":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            uses = (
                isinstance(node, ast.Attribute)
                and node.attr == "distributed"
                and isinstance(node.value, ast.Name)
                and node.value.id == "torch"
            )
            imports = isinstance(node, (ast.Import, ast.ImportFrom)) and "torch.distributed" in (
                ast.unparse(node)
            )
            assert not uses, f"{module} line {node.lineno}"
            assert not imports, f"{module} line {node.lineno}"


def test_every_public_class_has_one_import_path() -> None:
    public = {
        name: obj
        for name in bl.__all__
        if inspect.isclass(obj := getattr(bl, name)) and not name.startswith("_")
    }
    assert public, "no public class found"
    for name, cls in public.items():
        # Implementation modules are private: the class lives behind an underscore module (or a
        # public module such as `losses` that holds it), and no other public module re-exports it.
        holders = [
            module
            for module in _modules()
            if not any(part.startswith("_") for part in module.split("."))
            and module != "__init__"
            and name in vars(__import__(f"balanced_losses.{module}", fromlist=["_"]))
        ]
        defined_in = cls.__module__.removeprefix("balanced_losses.")
        assert holders in ([], [defined_in]), f"{name} is importable from {holders}"


def test_the_two_families_live_in_their_folders() -> None:
    for name in ("LossNormalizer", "UncertaintyWeighting", "DWA", "RLW", "IMTLL", "FAMO"):
        assert getattr(bl, name).__module__.startswith("balanced_losses.weighting."), name
    for name in ("GeometricMean", "GradNorm"):
        assert getattr(bl, name).__module__.startswith("balanced_losses.weighting."), name
    for name in ("GradientBalancer", "DBMTL"):
        assert getattr(bl, name).__module__.startswith("balanced_losses.features."), name


def _local_imports(path: Path, local: set[str]) -> set[str]:
    """The scripts and packages of ``local`` that ``path`` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found.update(name.split(".")[0] for name in names if name.split(".")[0] in local)
    return found


@pytest.mark.parametrize("folder", ["benchmarks", "examples"])
def test_the_scripts_import_each_other_without_a_cycle(folder: str) -> None:
    """benchmarks/ and examples/ import their sibling modules one way only (a DAG)."""
    root = Path(__file__).resolve().parents[1] / folder
    if not root.is_dir():
        pytest.skip(f"{folder}/ is not here (tests copied out of the source tree)")
    modules = {p.stem: p for p in root.glob("*.py")}
    modules.update({p.parent.name: p for p in root.glob("*/__init__.py")})
    graph = {name: _local_imports(path, set(modules)) - {name} for name, path in modules.items()}
    done: set[str] = set()

    def visit(name: str, trail: tuple[str, ...]) -> None:
        assert name not in trail, f"import cycle: {' -> '.join((*trail, name))}"
        if name in done:
            return
        for child in sorted(graph[name]):
            visit(child, (*trail, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())
