"""QM9 (benchmarks/problems/qm9.py): parsing qm9pack's rows, the molecular graph, the model.

QM9 is held out like the problems of test_problem_heldout.py: nothing here trains on it. The
parsing and graph tests use molecules written here; the data test reads the installed wheel.
"""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if not (BENCHMARKS / "problems").is_dir():  # the release check copies tests/ out of the tree
    pytest.skip("benchmarks/ is not here (tests copied out of the tree)", allow_module_level=True)
sys.path.insert(0, str(BENCHMARKS))
from problems import ConstantModel, qm9  # noqa: E402

HARTREE = 27.211386246


def _row(index: int, elements: str, xyz: str, **props: str) -> dict[str, str]:
    values = {
        "mu": "0.",
        "alpha": "13.21",
        "homo": "-0.3877",
        "lumo": "0.1171",
        "r2": "35.3641",
        "zpve": "0.044749",
        "U0": "-40.47893",
        "U": "-40.476062",
        "H": "-40.475117",
        "G": "-40.498597",
        "cv": "6.469",
    }
    values.update(props)
    return {
        "Index": str(index),
        "Elements": elements,
        "XYZ_Ang": xyz,
        **{qm9.COLUMNS[task]: value for task, value in values.items()},
    }


METHANE_ELEMENTS = "['C','H','H','H','H']"
# As the files write it: bare decimal points and one exponent in the original data's notation.
METHANE_XYZ = (
    "[[-0.0126981359,1.0858041578,0.0080009958],[0.002150416,-0.0060313176,0.],"
    "[1.0117308433,1.4637511618,2.765748*^-4],[-0.540815069,1.4475266138,-0.8766437152],"
    "[-0.5238136345,1.4379326443,0.9063972942]]"
)


def test_methane_by_hand() -> None:
    (molecules, dropped) = qm9.parse_rows([_row(1, METHANE_ELEMENTS, METHANE_XYZ)])
    assert dropped == {}
    assert molecules.index.tolist() == [1]
    assert molecules.elements[0, :6].tolist() == [2, 1, 1, 1, 1, 0]
    assert molecules.positions[0, 1, 2].item() == 0.0
    assert molecules.positions[0, 2, 2].item() == pytest.approx(2.765748e-4)
    assert molecules.positions[0, 5:].abs().sum() == 0
    y = dict(zip(qm9.TASKS, molecules.targets[0].tolist(), strict=True))
    # The atoms' reference energies of U0, U, H, G: C + 4 H, hartree, then eV.
    references = {
        "U0": -37.846772 + 4 * -0.500273,
        "U": -37.845355 + 4 * -0.498857,
        "H": -37.844411 + 4 * -0.497912,
        "G": -37.861317 + 4 * -0.510927,
    }
    raw = {"U0": -40.47893, "U": -40.476062, "H": -40.475117, "G": -40.498597}
    for task, energy in raw.items():
        assert y[task] == pytest.approx((energy - references[task]) * HARTREE, rel=1e-12)
    assert y["U0"] == pytest.approx(-0.631066 * HARTREE, rel=1e-12)  # -17.17 eV
    assert y["homo"] == pytest.approx(-0.3877 * HARTREE)
    assert y["zpve"] == pytest.approx(0.044749 * HARTREE)
    assert (y["mu"], y["alpha"], y["r2"], y["cv"]) == (0.0, 13.21, 35.3641, 6.469)


def test_bad_rows_are_dropped_and_counted_by_reason() -> None:
    water = "[[0.,0.,0.],[0.96,0.,0.],[0.,0.96,0.]]"
    rows = [
        _row(1, METHANE_ELEMENTS, METHANE_XYZ),
        _row(2, "['O','H','H']", water),
        _row(3, "['Cl','H']", "[[0.,0.,0.],[1.3,0.,0.]]"),
        _row(4, "['O','H','H']", "[[0.,0.,0.],[0.96,0.,0.]]"),
        _row(5, "['O','H','H']", water, homo="n/a"),
        _row(6, "['O','H','H']", water, cv="nan"),
        _row(7, "['O','H'", water),
        _row(2, "['O','H','H']", water),
    ]
    molecules, dropped = qm9.parse_rows(rows)
    assert molecules.index.tolist() == [1, 2]
    assert dropped == {
        "an element other than H, C, N, O, F": 1,
        "coordinates that do not match the elements": 1,
        "an unreadable property or coordinate": 1,
        "a non-finite property or coordinate": 1,
        "unreadable index, elements or coordinates": 1,
        "a repeated molecule index": 1,
    }
    assert len(molecules) + sum(dropped.values()) == len(rows)


def _batch(*molecules: list[tuple[str, tuple[float, float, float]]]) -> torch.Tensor:
    """Padded model input ``(B, 29, 4)`` of molecules given as (element, position) lists;
    padding rows sit at the origin, within the cutoff of an atom there."""
    x = torch.zeros(len(molecules), qm9.MAX_ATOMS, 4)
    for b, atoms in enumerate(molecules):
        for a, (symbol, pos) in enumerate(atoms):
            x[b, a, 0] = qm9.ELEMENTS.index(symbol) + 1
            x[b, a, 1:] = torch.tensor(pos)
    return x


HYDROGEN = [("H", (0.0, 0.0, 0.0)), ("H", (0.74, 0.0, 0.0))]
WATER = [("O", (0.0, 0.0, 0.0)), ("H", (0.96, 0.0, 0.0)), ("H", (0.0, 0.96, 0.0))]


def test_graph_by_hand() -> None:
    nodes, edge_index, edge_attr, molecule = qm9.graph(_batch(HYDROGEN, WATER))
    assert molecule.tolist() == [0, 0, 1, 1, 1]
    # One-hot element (H, C, N, O, F) and atomic number / 9.
    assert nodes[:, :5].argmax(1).tolist() == [0, 0, 3, 0, 0]
    assert nodes[:, 5].tolist() == pytest.approx([1 / 9, 1 / 9, 8 / 9, 1 / 9, 1 / 9])
    edges = {
        (i, j): (d, bonded)
        for (i, j), (d, bonded) in zip(edge_index.T.tolist(), edge_attr.tolist(), strict=True)
    }
    # Every ordered pair within 2 angstrom of each other, in its own molecule; no padding.
    assert set(edges) == {(0, 1), (1, 0), (2, 3), (3, 2), (2, 4), (4, 2), (3, 4), (4, 3)}
    assert edges[0, 1] == pytest.approx((0.74, 1.0))  # 0.74 < 1.2 (0.31 + 0.31)
    assert edges[2, 3] == pytest.approx((0.96, 1.0))  # O-H: 0.96 < 1.2 (0.66 + 0.31)
    assert edges[3, 4] == pytest.approx((0.96 * math.sqrt(2), 0.0), rel=1e-6)  # H...H: none


# torch_geometric 2.8 scripts some of its modules when imported, which torch 2.13 deprecates.
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.skipif(
    importlib.util.find_spec("torch_geometric") is None, reason="needs torch_geometric"
)
def test_the_model_reads_every_task_and_ignores_the_order_of_the_atoms() -> None:
    torch.manual_seed(0)
    model = qm9.QM9("t", "t", (1, 1), width=8, budget=qm9.PROBLEM.budget).model()
    x = _batch(HYDROGEN, WATER)
    outputs = model(x)
    assert set(outputs) == set(qm9.TASKS)
    assert all(out.shape == (2, 1) for out in outputs.values())
    # Atoms in another order and at other padding positions: the same molecules.
    shuffled = _batch(HYDROGEN[::-1], WATER[::-1])
    for task, out in model(shuffled).items():
        torch.testing.assert_close(out, outputs[task], rtol=1e-5, atol=1e-6)
    sum(out.sum() for out in outputs.values()).backward()
    for name, param in model.trunk.named_parameters():
        assert param.grad is not None, name
    assert all(p.grad.abs().sum() > 0 for p in model.trunk.conv.parameters() if p.grad is not None)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("qm9pack") is None, reason="needs qm9pack")
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_the_wheel_gives_every_molecule_and_the_field_split(tmp_path: Path) -> None:
    """Parsed from the installed wheel (a fresh cache: the parse itself is checked)."""
    import os

    os.environ["BALANCED_LOSSES_CACHE"] = str(tmp_path)
    try:
        problem = qm9.QM9("qm9", "t", (4000, 1000), width=8, budget=qm9.PROBLEM.budget)
        train, val = problem.data()
        assert problem.dropped == {}  # qm9pack 1.0.3: every row reads
        molecules, _ = qm9.load_molecules()  # now from the cache
    finally:
        del os.environ["BALANCED_LOSSES_CACHE"]
    assert len(molecules) == 130_831
    assert list(tmp_path.glob("*.pt"))
    assert (len(train), len(val)) == (4000, 1000)
    assert train.x.shape == (4000, qm9.MAX_ATOMS, 4)
    for task in qm9.TASKS:
        y = train.targets[task]
        assert y.shape == (4000, 1)
        assert abs(float(y.mean())) < 1e-5
        assert float(y.std()) == pytest.approx(1.0, abs=1e-5)
    # Methane, by the data set's number, is the first molecule: -17.17 eV atomization energy.
    first = int((molecules.index == 1).nonzero()[0, 0])
    assert molecules.targets[first, qm9.TASKS.index("U0")] == pytest.approx(-0.631066 * HARTREE)
    constant = problem.evaluate(ConstantModel(problem.constant_outputs(train)), val)
    assert set(constant) == set(qm9.TASKS)
    assert all(math.isfinite(v) and v > 0 for v in constant.values())
