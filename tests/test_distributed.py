"""Two gloo processes on CPU: statistics are reduced exactly and DDP training is not broken."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from balanced_losses import LossNormalizer, distributed

WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed unavailable")


def _worker(rank: int, init_file: str, fn: Callable[[int], Any], out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        result = fn(rank)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(fn: Callable[[int], Any]) -> list[Any]:
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.spawn(_worker, args=(init_file, fn, tmp), nprocs=WORLD, join=True)
        return [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]


# Per-rank loss sequences; rank 1 lacks task `b` on step 2 and sees NaN for `a` on step 3.
SEQUENCE = [
    [{"a": 1.0, "b": 10.0}, {"a": 3.0, "b": 30.0}],
    [{"a": 2.0, "b": 5.0}, {"a": 2.0, "b": 15.0}],
    [{"a": 4.0, "b": 1.0}, {"a": 0.5, "b": None}],
    [{"a": 1.0, "b": 2.0}, {"a": float("nan"), "b": 4.0}],
]


def _normalizer_run(rank: int) -> dict[str, Any]:
    assert distributed.is_distributed()
    norm = LossNormalizer({"a": 2, "b": 50}, momentum=0.8, allow_missing=True)
    totals = []
    for step in SEQUENCE:
        losses = {k: None if v is None else torch.tensor(v) for k, v in step[rank].items()}
        totals.append(norm(losses))
    return {"ema": norm.ema, "count": norm.count, "weights": norm.last_weights}


def test_normalizer_statistics_equal_one_process_fed_the_mean_losses():
    results = _spawn(_normalizer_run)
    reference = LossNormalizer({"a": 2, "b": 50}, momentum=0.8, allow_missing=True)
    for step in SEQUENCE:
        mean = {}
        for task in ("a", "b"):
            seen = [s[task] for s in step if s[task] is not None and s[task] == s[task]]
            mean[task] = torch.tensor(sum(seen) / len(seen))
        reference(mean)
    for result in results:
        torch.testing.assert_close(result["ema"], reference.ema)
        assert torch.equal(result["count"], reference.count)
        torch.testing.assert_close(result["weights"], reference.last_weights)


def _no_sync_run(rank: int) -> dict[str, Any]:
    norm = LossNormalizer({"a": 1}, sync_dist=False)
    norm({"a": torch.tensor(float(rank + 1))})
    return {"ema": norm.ema}


def test_sync_can_be_switched_off():
    results = _spawn(_no_sync_run)
    assert results[0]["ema"].item() != results[1]["ema"].item()
