"""Checks that need a CUDA device (skipped without one): AMP with GradScaler, the solvers on GPU.

The no-sync check of every registered weighting lives in test_production.py
(``test_no_host_device_sync_on_cuda``); this file adds fp16 autocast with ``GradScaler`` for
every case and the aggregators' fixed-budget path on the device against the CPU.
"""

from __future__ import annotations

import math

import pytest
import torch

from balanced_losses import aggregation
from tests.registry import Driver, cuda_sync_errors, params

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

TASKS = ("pointer", "countdown", "aux")


@pytest.mark.parametrize("case", params())
def test_fp16_autocast_with_grad_scaler_trains_and_skips_overflow_steps(case):
    driver = Driver(case, TASKS, device="cuda")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16)
    skipped = 0
    for step in range(6):
        x, targets, _ = driver.data(step)
        driver.optimizer.zero_grad()
        with cuda_sync_errors():
            with torch.autocast("cuda", dtype=torch.float16):
                losses = driver.compute(x, targets, None)
                total = driver.weighting(losses)
            # Step 3 overflows fp16 on purpose: the scaler must skip it, statistics stay finite.
            factor = 1e30 if step == 3 else 1.0
            scaler.scale(total * factor).backward()
        scale = scaler.get_scale()
        scaler.step(driver.optimizer)
        scaler.update()
        skipped += scaler.get_scale() < scale
        driver.hooks(step)
        for name, value in driver.weighting.state_dict().items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype in (torch.float32, torch.float64), name
                assert bool(torch.isfinite(value).all()), (name, step)
        assert bool(torch.isfinite(driver.weighting.last_weights).all()), step
    assert skipped >= 1
    for p in driver.model.parameters():
        assert bool(torch.isfinite(p).all())


WEIGHTS = {
    "UPGrad": aggregation.upgrad_weights,
    "MGDA": aggregation.mgda_weights,
    "CAGrad": aggregation.cagrad_weights,
    "IMTLG": aggregation.imtlg_weights,
    "AlignedMTL": aggregation.aligned_mtl_weights,
    "NashMTL": aggregation.nash_mtl_weights,
    "FairGrad": aggregation.fairgrad_weights,
}


@pytest.mark.parametrize("name", sorted(WEIGHTS))
@pytest.mark.parametrize("k", [1, 3, 10])
def test_weights_on_the_device_equal_the_cpu_and_do_not_sync(name, k):
    gen = torch.Generator().manual_seed(k)
    j = torch.randn(k, 64, generator=gen, dtype=torch.float64)
    j[0] *= 100.0
    gram = j @ j.T
    fn = WEIGHTS[name]
    expected = fn(gram)
    device_gram = gram.cuda()
    torch.cuda.synchronize()
    with cuda_sync_errors():
        got = fn(device_gram)
    tol = 1e-6 * math.sqrt(float(gram.diagonal().sum()))
    torch.testing.assert_close((got.cpu() @ j), expected @ j, rtol=1e-6, atol=tol)


def test_pcgrad_orders_on_the_device_equal_the_cpu():
    seed, step = torch.tensor(3), torch.tensor(11)
    cpu = aggregation.pcgrad_orders(5, seed, step, "cpu")
    seed, step = seed.cuda(), step.cuda()
    with cuda_sync_errors():
        gpu = aggregation.pcgrad_orders(5, seed, step, "cuda")
    assert torch.equal(gpu.cpu(), cpu)
