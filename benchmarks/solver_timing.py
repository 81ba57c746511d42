"""Time each aggregator's weight solver on a K x K Gramian, on the CPU or an accelerator.

The solvers run without a host-device sync on an accelerator (``UPGrad``, ``MGDA`` and
``CAGrad`` enumerate their faces up to K = 10, the others run fixed budgets) and stop early on
the CPU (see ``balanced_losses._numerics.host_shortcuts``). This measures one call of each,
median over repeats after a warmup, for K = 3, 10 and 40, next to TorchJD's weighting of the
same name where it has one (``torchjd.aggregation.UPGradWeighting`` and so on, which copy the
Gramian to the host and solve there), and writes ``<out>/solver_timing_<device>.json``.

Usage::

    python benchmarks/solver_timing.py --device cuda --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import timing
import torch
from torch import Tensor

from balanced_losses import aggregation

try:
    import torchjd.aggregation as tja
except ImportError:  # TorchJD is optional: its rows are skipped
    tja = None

KS = (3, 10, 40)

SOLVERS = {
    "UPGrad": aggregation.upgrad_weights,
    "MGDA": aggregation.mgda_weights,
    "CAGrad": aggregation.cagrad_weights,
    "IMTLG": aggregation.imtlg_weights,
    "AlignedMTL": aggregation.aligned_mtl_weights,
    "NashMTL": aggregation.nash_mtl_weights,
    "FairGrad": aggregation.fairgrad_weights,
    "PCGrad": lambda g: aggregation.pcgrad_weights(
        g, aggregation.pcgrad_orders(g.shape[0], torch.tensor(0), torch.tensor(0), g.device)
    ),
    "ConFIG": aggregation.config_weights,
}


def torchjd_solvers() -> dict[str, Callable[[Tensor], Tensor]]:
    """TorchJD's weightings of our solvers' names, at our defaults (CAGrad c, FairGrad alpha)."""
    if tja is None:
        return {}
    options: dict[str, dict[str, Any]] = {"CAGrad": {"c": 0.4}, "FairGrad": {"alpha": 1.0}}
    out = {}
    for name in SOLVERS:
        cls = getattr(tja, f"{name}Weighting", None)
        if cls is None:
            continue
        try:
            out[name] = cls(**options.get(name, {}))
        except ImportError:  # a solver TorchJD needs is not installed
            continue
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = []
    theirs = torchjd_solvers()
    for k in KS:
        gen = torch.Generator().manual_seed(k)
        j = torch.randn(k, 256, generator=gen, dtype=torch.float64)
        gram = (j @ j.T).to(device)
        impls = [("ours", name, fn) for name, fn in SOLVERS.items()]
        impls += [("torchjd", name, fn) for name, fn in theirs.items()]
        for impl, name, fn in impls:
            for _ in range(3):
                fn(gram)
            times = []
            for _ in range(args.repeats):
                _sync(device)
                start = time.perf_counter()
                fn(gram)
                _sync(device)
                times.append(time.perf_counter() - start)
            rows.append(
                {"solver": name, "impl": impl, "k": k, "ms": 1e3 * statistics.median(times)}
            )
            print(f"{impl:>8} {name:>10} K={k:<3} {rows[-1]['ms']:8.3f} ms", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "device": name,
        "torch": torch.__version__,
        "torchjd": None if tja is None else timing.package_version("torchjd"),
        "repeats": args.repeats,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"solver_timing_{device.type}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
