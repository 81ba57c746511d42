"""Time each aggregator's weight solver on a K x K Gramian, on the CPU or an accelerator.

The solvers run a fixed budget on an accelerator (no host-device sync) and stop early on the
CPU (see ``balanced_losses._numerics.host_shortcuts``). This measures one call of each, median
over repeats after a warmup, for K = 3 and 10, and writes ``<out>/solver_timing_<device>.json``.

Usage::

    python benchmarks/solver_timing.py --device cuda --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from balanced_losses import aggregation

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
}


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
    for k in (3, 10):
        gen = torch.Generator().manual_seed(k)
        j = torch.randn(k, 256, generator=gen, dtype=torch.float64)
        gram = (j @ j.T).to(device)
        for name, fn in SOLVERS.items():
            for _ in range(3):
                fn(gram)
            times = []
            for _ in range(args.repeats):
                _sync(device)
                start = time.perf_counter()
                fn(gram)
                _sync(device)
                times.append(time.perf_counter() - start)
            rows.append({"solver": name, "k": k, "ms": 1e3 * statistics.median(times)})
            print(f"{name:>10} K={k:<3} {rows[-1]['ms']:8.3f} ms", flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": name, "torch": torch.__version__, "repeats": args.repeats, "rows": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"solver_timing_{device.type}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
