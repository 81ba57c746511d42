"""Assertion helpers shared by the tests."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode

from balanced_losses import _numerics


def by_task(weighting: object) -> dict[str, Tensor]:
    """The last step's weights as ``{task: 0-dim tensor}``: copies of ``last_weights``."""
    weights: Tensor = weighting.last_weights.clone()  # type: ignore[attr-defined]
    return dict(zip(weighting.tasks, weights.unbind(), strict=True))  # type: ignore[attr-defined]


def grad_norm(output: Tensor, wrt: Tensor | Iterable[Tensor]) -> Tensor:
    """Norm of the gradient of ``output`` w.r.t. ``wrt`` (a tensor or several), graph kept."""
    inputs = [wrt] if isinstance(wrt, Tensor) else list(wrt)
    grads = torch.autograd.grad(output, inputs, retain_graph=True, allow_unused=True)
    squares = [g.pow(2).sum() for g in grads if g is not None]
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


def effective_weights(total: Tensor, losses: dict[str, Tensor]) -> dict[str, Tensor]:
    """d total / d loss_k for each task, by autograd."""
    names = list(losses)
    grads = torch.autograd.grad(total, [losses[n] for n in names], retain_graph=True)
    return dict(zip(names, grads, strict=True))


# What the no-sync guard refuses: reads of a value on the host, and ops whose output shape
# depends on the data.
_SYNC_OPS = {
    torch.ops.aten._local_scalar_dense.default,  # .item(), float(t), int(t), bool(t), t[0-d t]
    torch.ops.aten.is_nonzero.default,  # if tensor:
    torch.ops.aten._linalg_check_errors.default,  # linalg error checks (a sync on CUDA)
}
# Data-dependent shapes, and linalg ops that check their LAPACK info with a sync on CUDA
# although on CPU they do so without a dispatched op (so the check above cannot see it).
_SYNC_PACKETS = {
    torch.ops.aten.nonzero,
    torch.ops.aten.masked_select,
    torch.ops.aten._linalg_eigh,
    torch.ops.aten._linalg_svd,
    torch.ops.aten.linalg_pinv,
    torch.ops.aten.linalg_inv,
    torch.ops.aten.linalg_cholesky,
}


class NoSync(TorchDispatchMode):
    """Fail on every op that would make the host wait for the device."""

    # The CPU shortcuts (early exits, LAPACK) read values on the host, which is free on the
    # CPU; switched off here so the path an accelerator runs is the one under the guard.
    def __enter__(self):  # type: ignore[no-untyped-def]
        self._shortcuts = _numerics.HOST_SHORTCUTS
        _numerics.HOST_SHORTCUTS = False
        return super().__enter__()

    def __exit__(self, *exc):  # type: ignore[no-untyped-def]
        _numerics.HOST_SHORTCUTS = self._shortcuts
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func in _SYNC_OPS or func.overloadpacket in _SYNC_PACKETS:
            raise AssertionError(f"host-device sync: {func}")
        if func.overloadpacket in (torch.ops.aten.index, torch.ops.aten.index_put):
            # A boolean mask index has a data-dependent shape (nonzero inside the kernel).
            indices = args[1]
            if any(i is not None and i.dtype == torch.bool for i in indices):
                raise AssertionError(f"host-device sync: {func} with a boolean mask")
        return func(*args, **(kwargs or {}))
