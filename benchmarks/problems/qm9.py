"""QM9, the field's 11-task molecular benchmark, from the molecules ``qm9pack`` ships in its wheel.

Held-out problem: its code, data handling and budget were committed before any method ran on it;
the git history shows the order.

QM9 (Ramakrishnan, Dral, Rupp, von Lilienfeld, "Quantum chemistry structures and properties of
134 kilo molecules", Sci. Data 2014) holds the B3LYP/6-31G(2df,p) geometry and properties of
small organic molecules of up to 9 heavy atoms (C, N, O, F) and 29 atoms in all. The PyPI
package ``qm9pack`` 1.0.3 (MIT, by the data set's first author) ships them as three CSV files
(``qm9pack/data/qm9_part{1,2,3}.csv``: one row per molecule, its elements, XYZ coordinates in
angstrom and properties in atomic units); they are read from the installed package, so nothing
is downloaded. Parsing them takes about a minute, so the parsed arrays are cached (a ``.pt`` file
under ``$BALANCED_LOSSES_CACHE``, by default ``~/.cache/balanced_losses``), keyed by the
package's version.

**Tasks**, as in the field's setup (Nash-MTL, FAMO, FairGrad, GO4Align and LDC-MTL all use it,
through PyTorch Geometric's ``QM9`` targets 0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11): ``mu``
(dipole moment, D), ``alpha`` (isotropic polarizability, a0^3), ``homo`` and ``lumo`` (eV),
``r2`` (electronic spatial extent, a0^2), ``zpve`` (zero-point vibrational energy, eV), ``U0``,
``U``, ``H`` and ``G`` (atomization energies at 0 K and 298.15 K, eV: the molecule's energy minus
the sum of its atoms' reference energies, the B3LYP atom references of the data set's ``atomref``
table) and ``cv`` (heat capacity at 298.15 K, cal/(mol K)). Hartree are converted at
1 Ha = 27.211386246 eV (CODATA 2018). Each target is standardized with the mean and standard
deviation of the training molecules; each loss is the mean squared error on the standardized
target, and each metric the mean absolute error in the field's units above.

**Loading** drops nothing silently: a row whose elements, coordinates or any of the 11 properties
cannot be read, or that repeats a molecule's index, is dropped and counted by reason in
:attr:`QM9.dropped` (``qm9pack`` 1.0.3: none). The files write some coordinates with a bare
decimal point (``0.``, ``1.``) and the original data set's exponents as ``*^``; both are read.
The 3054 molecules its authors flagged as failing their consistency check are not in
``qm9pack``'s files: 130,831 of 133,885 remain, the same molecules as PyTorch Geometric's QM9.

**Model**: the message-passing network of Gilmer et al. (2017) that the papers use, from PyTorch
Geometric's layers: a linear embedding of each atom (one-hot element and atomic number), three
rounds of an edge-conditioned convolution (``NNConv``, its weights from a 2 -> 64 -> d^2 network
of each edge's features) with a GRU update, a ``Set2Set`` readout over the atoms (3 steps) and a
linear layer with ReLU; that is the shared trunk (``d`` features per molecule). Each task has a
linear head. **Edges**: every ordered pair of atoms within 2 angstrom of each other (the
covalent bonds and the geminal pairs around them), with two features, the distance in angstrom
and whether the pair is closer than 1.2 times the sum of the two atoms' covalent radii (a bond).
The papers use the complete graph and RDKit's bond types and atom hybridization; the cutoff keeps
a CPU run at minutes, and neither graph nor features are tuned.

**Budget**, fixed before any method ran: on the CPU, ``d = 32``, 4000 training and 1000
validation molecules drawn once (data seed 2014), Adam at 1e-3, batch 64, 12 epochs (756 steps):
about a minute a run on one core for the package's methods, several times that for TorchJD's
peers, which build the Jacobian at the trunk's parameters. The papers' budget (``d = 64``,
110,000 / 10,000 molecules, batch 120, 300 epochs; they also hold out 10,000 test molecules and
decay the learning rate on a plateau, which the suite does not) is the problem ``qm9_paper``, the
same code, for a GPU (``--device cuda``).

``smoke=True`` keeps the first 48 training and 32 validation molecules of the split.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import Budget, Split, TaskModel, constant_row, predict

__all__ = ["PAPER", "PROBLEM", "QM9", "Molecules", "parse_rows"]

TASKS = ("mu", "alpha", "homo", "lumo", "r2", "zpve", "U0", "U", "H", "G", "cv")
UNITS = {
    "mu": "D",
    "alpha": "a0^3",
    "homo": "eV",
    "lumo": "eV",
    "r2": "a0^2",
    "zpve": "eV",
    "U0": "eV",
    "U": "eV",
    "H": "eV",
    "G": "eV",
    "cv": "cal/(mol K)",
}
#: The CSV column of each task (``qm9pack``'s spelling).
COLUMNS = {
    "mu": "Dipole_debye",
    "alpha": "Polarizability_bohr3",
    "homo": "HOMO_au",
    "lumo": "LUMO_au",
    "r2": "R2_bohr2",
    "zpve": "ZPVE_au",
    "U0": "InternalEnergy_0K_au",
    "U": "InternalEnergy_298K_au",
    "H": "Enthalphy_298K_au",
    "G": "GibbsFreeEnergy_298K_au",
    "cv": "Heatcapacity_Cv_cal_mol_K",
}
HARTREE_IN_EV = 27.211386246  # CODATA 2018
#: Tasks given in hartree in the files and in eV here.
IN_HARTREE = ("homo", "lumo", "zpve", "U0", "U", "H", "G")
ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = (1, 6, 7, 8, 9)
#: B3LYP/6-31G(2df,p) energies of the free atoms, hartree, for U0, U, H and G (the data set's
#: ``atomref`` table, Ramakrishnan et al. 2014).
ATOM_REFERENCE = {
    "H": (-0.500273, -0.498857, -0.497912, -0.510927),
    "C": (-37.846772, -37.845355, -37.844411, -37.861317),
    "N": (-54.583861, -54.582445, -54.581501, -54.598897),
    "O": (-75.064579, -75.063163, -75.062219, -75.079532),
    "F": (-99.718730, -99.717314, -99.716370, -99.733544),
}
ENERGIES = ("U0", "U", "H", "G")
#: Covalent radii in angstrom (Cordero et al., Dalton Trans. 2008): the bond test of an edge.
COVALENT_RADIUS = (0.31, 0.76, 0.71, 0.66, 0.57)
MAX_ATOMS = 29
CUTOFF = 2.0  # angstrom: the edges
BOND_FACTOR = 1.2
_DATA_SEED = 2014
_SMOKE = (48, 32)
_FILES = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")


@dataclass(frozen=True)
class Molecules:
    """Parsed molecules, padded to :data:`MAX_ATOMS` atoms.

    ``elements``: ``(N, 29)`` int64, the index in :data:`ELEMENTS` plus one, 0 for padding;
    ``positions``: ``(N, 29, 3)`` float32 angstrom (0 for padding); ``targets``: ``(N, 11)``
    float64 in :data:`UNITS`, the energies as atomization energies; ``index``: ``(N,)`` the
    data set's molecule numbers.
    """

    elements: Tensor
    positions: Tensor
    targets: Tensor
    index: Tensor

    def __len__(self) -> int:
        return int(self.index.shape[0])


#: A number that ends in its decimal point (``0.``, which the files hold and JSON rejects).
_BARE_POINT = re.compile(r"(\d)\.(?![\d])")


def _number(text: str) -> float:
    """A CSV number; Mathematica's exponent (``1.2*^-6``, in QM9's original files) accepted."""
    return float(text.strip().replace("*^", "e"))


def _row(row: Mapping[str, str]) -> tuple[int, list[int], list[list[float]], list[float]]:
    """One molecule's index, element indices, coordinates and 11 targets; ``ValueError`` with
    the reason if any is unreadable."""
    try:
        index = int(row["Index"])
        symbols = json.loads(row["Elements"].replace("'", '"'))
        coords = json.loads(_BARE_POINT.sub(r"\1.0", row["XYZ_Ang"].replace("*^", "e")))
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError("unreadable index, elements or coordinates") from error
    if not isinstance(symbols, list) or any(s not in ELEMENTS for s in symbols):
        raise ValueError("an element other than H, C, N, O, F")
    if not 1 <= len(symbols) <= MAX_ATOMS:
        raise ValueError(f"not 1 to {MAX_ATOMS} atoms")
    if (
        not isinstance(coords, list)
        or len(coords) != len(symbols)
        or any(not isinstance(c, list) or len(c) != 3 for c in coords)
    ):
        raise ValueError("coordinates that do not match the elements")
    try:
        xyz = [[float(v) for v in c] for c in coords]
        raw = {task: _number(row[COLUMNS[task]]) for task in TASKS}
    except (KeyError, ValueError, TypeError) as error:
        raise ValueError("an unreadable property or coordinate") from error
    if not all(math.isfinite(v) for v in [*raw.values(), *(v for c in xyz for v in c)]):
        raise ValueError("a non-finite property or coordinate")
    elements = [ELEMENTS.index(s) for s in symbols]
    for j, task in enumerate(ENERGIES):
        raw[task] -= sum(ATOM_REFERENCE[ELEMENTS[e]][j] for e in elements)
    targets = [raw[t] * (HARTREE_IN_EV if t in IN_HARTREE else 1.0) for t in TASKS]
    return index, elements, xyz, targets


def parse_rows(rows: Iterable[Mapping[str, str]]) -> tuple[Molecules, Counter[str]]:
    """Parse ``qm9pack`` CSV rows; the molecules and, by reason, the rows dropped."""
    dropped: Counter[str] = Counter()
    seen: set[int] = set()
    indices, elements, positions, targets = [], [], [], []
    for row in rows:
        try:
            index, elems, xyz, values = _row(row)
        except ValueError as error:
            dropped[str(error)] += 1
            continue
        if index in seen:
            dropped["a repeated molecule index"] += 1
            continue
        seen.add(index)
        pad = MAX_ATOMS - len(elems)
        indices.append(index)
        elements.append([e + 1 for e in elems] + [0] * pad)
        positions.append(xyz + [[0.0, 0.0, 0.0]] * pad)
        targets.append(values)
    molecules = Molecules(
        elements=torch.tensor(elements, dtype=torch.int64).view(-1, MAX_ATOMS),
        positions=torch.tensor(positions, dtype=torch.float32).view(-1, MAX_ATOMS, 3),
        targets=torch.tensor(targets, dtype=torch.float64).view(-1, len(TASKS)),
        index=torch.tensor(indices, dtype=torch.int64),
    )
    return molecules, dropped


def _data_dir() -> tuple[Path, str]:
    """The installed ``qm9pack``'s data folder and version, without importing it (its
    ``__init__`` needs ``pkg_resources``, which recent setuptools no longer ship)."""
    from importlib import metadata

    try:
        dist = metadata.distribution("qm9pack")
    except metadata.PackageNotFoundError as error:
        raise ModuleNotFoundError(
            "qm9 reads the molecules qm9pack ships in its wheel (qm9pack/data/): install "
            "qm9pack (the `bench` extra)"
        ) from error
    return Path(str(dist.locate_file("qm9pack/data"))), dist.version


def _cache_dir() -> Path:
    configured = os.environ.get("BALANCED_LOSSES_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "balanced_losses"


def load_molecules() -> tuple[Molecules, dict[str, int]]:
    """Every molecule of the installed ``qm9pack``, from the cache or parsed (then cached)."""
    folder, version = _data_dir()
    cache = _cache_dir() / f"qm9pack-{version}.pt"
    if cache.is_file():
        saved = torch.load(cache, weights_only=True)
        return Molecules(**saved["molecules"]), dict(saved["dropped"])
    rows = 0
    parts = []
    dropped: Counter[str] = Counter()
    for name in _FILES:
        path = folder / name
        if not path.is_file():
            raise FileNotFoundError(f"qm9: the data file {path} is missing")
        with path.open(newline="") as handle:
            reader = list(csv.DictReader(handle))
        rows += len(reader)
        part, lost = parse_rows(reader)
        parts.append(part)
        dropped += lost
    molecules = Molecules(
        *(torch.cat([getattr(p, f) for p in parts]) for f in Molecules.__dataclass_fields__)
    )
    if len(molecules) + sum(dropped.values()) != rows:
        raise RuntimeError("qm9: rows were lost while parsing")
    if len(set(molecules.index.tolist())) != len(molecules):
        # parse_rows drops repeats within a file; across files they would be lost the same way.
        raise ValueError("qm9: a molecule index repeats across the files")
    cache.parent.mkdir(parents=True, exist_ok=True)
    partial = cache.with_suffix(f".{os.getpid()}.tmp")
    fields = {f: getattr(molecules, f) for f in Molecules.__dataclass_fields__}
    torch.save({"molecules": fields, "dropped": dict(dropped)}, partial)
    partial.replace(cache)  # atomic: parallel workers never read half a file
    return molecules, dict(dropped)


def inputs(molecules: Molecules) -> Tensor:
    """The model's input, ``(N, 29, 4)`` float32: element index plus one (0: padding), x, y, z."""
    return torch.cat([molecules.elements[..., None].float(), molecules.positions], dim=-1)


def graph(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A batch of padded molecules ``(B, 29, 4)`` as one graph: node features ``(n, 6)``,
    ``edge_index`` ``(2, e)``, edge features ``(e, 2)`` and each node's molecule ``(n,)``."""
    kind = x[..., 0].long()
    present = kind > 0
    element = (kind - 1).clamp(min=0)
    numbers = torch.tensor(ATOMIC_NUMBERS, dtype=x.dtype, device=x.device)
    radii = torch.tensor(COVALENT_RADIUS, dtype=x.dtype, device=x.device)
    onehot = F.one_hot(element, len(ELEMENTS)).to(x.dtype)
    nodes = torch.cat([onehot, (numbers[element] / 9.0)[..., None]], dim=-1)[present]
    pos = x[..., 1:]
    distance = torch.cdist(pos, pos)
    pair = present[:, :, None] & present[:, None, :]
    pair &= ~torch.eye(MAX_ATOMS, dtype=torch.bool, device=x.device)
    b, i, j = (pair & (distance < CUTOFF)).nonzero(as_tuple=True)
    node_id = present.flatten().cumsum(0).view(present.shape) - 1
    d = distance[b, i, j]
    bonded = d < BOND_FACTOR * (radii[element[b, i]] + radii[element[b, j]])
    edge_attr = torch.stack([d, bonded.to(x.dtype)], dim=-1)
    molecule = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(present)[present]
    return nodes, torch.stack([node_id[b, i], node_id[b, j]]), edge_attr, molecule


class _Trunk(nn.Module):
    """Gilmer et al.'s MPNN (edge network, GRU, Set2Set) to ``width`` features per molecule."""

    def __init__(self, width: int) -> None:
        super().__init__()
        from torch_geometric.nn import NNConv, Set2Set

        self.embed = nn.Linear(len(ELEMENTS) + 1, width)
        edge_net = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, width * width))
        self.conv = NNConv(width, width, edge_net, aggr="mean")
        self.gru = nn.GRU(width, width)
        self.readout = Set2Set(width, processing_steps=3)
        self.out = nn.Linear(2 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        nodes, edge_index, edge_attr, molecule = graph(x)
        h = F.relu(self.embed(nodes))
        state = h[None]
        for _ in range(3):
            message = F.relu(self.conv(h, edge_index, edge_attr))
            h, state = self.gru(message[None], state)
            h = h[0]
        pooled = self.readout(h, molecule, dim_size=x.shape[0])
        features: Tensor = F.relu(self.out(pooled))
        return features


class _Model(TaskModel):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.trunk = _Trunk(width)
        self.heads = nn.ModuleDict({task: nn.Linear(width, 1) for task in TASKS})

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.trunk(x)
        return {task: head(features) for task, head in self.heads.items()}


class QM9:
    """QM9's 11 properties from a molecule's atoms and geometry (see the module docstring)."""

    tasks = TASKS
    output_sizes: Mapping[str, int] = dict.fromkeys(TASKS, 1)
    metrics: Mapping[str, str] = {t: f"MAE ({UNITS[t]})" for t in TASKS}

    def __init__(
        self, name: str, title: str, sizes: tuple[int, int], width: int, budget: Budget
    ) -> None:
        self.name = name
        self.title = title
        self.sizes = sizes
        self.width = width
        self.budget = budget
        #: What loading dropped, by reason (filled by ``data()``).
        self.dropped: dict[str, int] = {}
        self._scale: Tensor | None = None

    def data(self, *, smoke: bool = False) -> tuple[Split, Split]:
        molecules, self.dropped = load_molecules()
        n_train, n_val = self.sizes
        if n_train + n_val > len(molecules):
            raise ValueError(f"{self.name}: {n_train} + {n_val} molecules asked, {len(molecules)}")
        order = torch.randperm(len(molecules), generator=torch.Generator().manual_seed(_DATA_SEED))
        train_ids, val_ids = order[:n_train], order[n_train : n_train + n_val]
        if smoke:
            train_ids, val_ids = train_ids[: _SMOKE[0]], val_ids[: _SMOKE[1]]
        y = molecules.targets
        mean, std = y[train_ids].mean(0), y[train_ids].std(0)
        self._scale = std.float()
        x = inputs(molecules)
        standardized = ((y - mean) / std).float()

        def split(ids: Tensor) -> Split:
            return Split(x[ids], {t: standardized[ids, k, None] for k, t in enumerate(TASKS)})

        return split(train_ids), split(val_ids)

    def model(self) -> TaskModel:
        return _Model(self.width)

    def losses(self, outputs: Mapping[str, Tensor], batch: Split) -> dict[str, Tensor]:
        return {t: F.mse_loss(outputs[t], batch.targets[t]) for t in TASKS}

    def evaluate(self, model: TaskModel, split: Split) -> dict[str, float]:
        if self._scale is None:
            raise RuntimeError(f"{self.name}: call data() first (it fixes the targets' scale)")
        outputs = predict(model, split.x)
        return {
            t: float((outputs[t] - split.targets[t]).abs().mean() * self._scale[k])
            for k, t in enumerate(TASKS)
        }

    def constant_outputs(self, train: Split) -> dict[str, Tensor]:
        return {t: constant_row(train.targets[t], "regression") for t in TASKS}


#: The CPU budget the suite runs (fixed before any method ran on QM9).
PROBLEM = QM9(
    "qm9",
    "QM9 (qm9pack), MPNN: 11 molecular properties (held out; 4000 molecules, 12 epochs)",
    sizes=(4000, 1000),
    width=32,
    budget=Budget(epochs=12, batch_size=64, lr=1e-3),
)
#: The papers' budget, for a GPU.
PAPER = QM9(
    "qm9_paper",
    "QM9 (qm9pack), MPNN: 11 molecular properties (the papers' budget)",
    sizes=(110_000, 10_000),
    width=64,
    budget=Budget(epochs=300, batch_size=120, lr=1e-3),
)
