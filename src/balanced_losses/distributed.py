"""The one place in the package that talks to :mod:`torch.distributed`.

Running statistics are kept per task as (value, valid) pairs. Before a module updates them it
replaces its local values by the mean over the ranks that saw a valid value, so every rank folds
in the same number and all ranks keep identical statistics: the result equals one process fed the
group's mean losses. On a single process (or without an initialized process group) nothing is
communicated.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor

__all__ = ["autograd_targets", "is_distributed", "mean_gramian", "mean_over_ranks"]


def is_distributed() -> bool:
    """Return True when a process group with more than one rank is initialized."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return False
    return torch.distributed.get_world_size() > 1


def mean_over_ranks(values: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Average per-task values over the ranks where they are valid.

    Args:
        values: Detached per-task values, shape ``(K,)``. Invalid entries may hold anything,
            NaN included: they are zeroed before the reduction.
        valid: Boolean, shape ``(K,)``; which entries this rank contributes.

    Returns:
        ``(mean, any_valid)``: the mean over contributing ranks (0 where no rank contributed) and
        whether any rank contributed. Without a multi-rank process group this is
        ``(values, valid)`` with invalid entries zeroed.
    """
    zeroed = torch.where(valid, values, torch.zeros_like(values))
    if not is_distributed():
        return zeroed, valid
    # One all-reduce carries the sums and the counts together.
    packed = torch.stack([zeroed, valid.to(values.dtype)])
    torch.distributed.all_reduce(packed, op=torch.distributed.ReduceOp.SUM)
    total, count = packed[0], packed[1]
    any_valid = count > 0
    return total / count.clamp_min(1), any_valid


def mean_gramian(gramian: Tensor) -> Tensor:
    r"""The Gramian of the task gradients of the mean loss over every rank's batch.

    Each rank holds :math:`G_r = J_r J_r^\top` of its own part of the batch. The rows of the
    global :math:`J` are the ranks' rows side by side, so the cross-rank blocks of
    :math:`J J^\top` vanish and the global Gramian is the sum of the :math:`G_r`. DDP averages
    the gradients over the :math:`W` ranks, so each rank's gradient of its mean loss is
    :math:`W` times its share of the global mean loss's: the result is
    :math:`\sum_r G_r / W^2`. Without a multi-rank process group, ``gramian`` itself.
    """
    if not is_distributed():
        return gramian
    summed = gramian.clone()
    torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
    world = torch.distributed.get_world_size()
    return summed / (world * world)


def autograd_targets(tensors: list[Tensor]) -> list[Tensor]:
    """The tensors ``torch.autograd.grad`` must be asked about in place of ``tensors``.

    FSDP2 (``torch.distributed.fsdp.fully_shard``) registers each parameter as a DTensor that
    holds this rank's shard, but the module's forward computes with a separate, unsharded
    parameter that FSDP all-gathers; only the latter is in the autograd graph, so a gradient
    taken with respect to the sharded one is None. Each sharded parameter is replaced by the
    unsharded parameter its module used in the last forward: its gradient is the full gradient
    of this rank's loss, as a DDP rank would see it (callers average statistics of it over the
    ranks as they do under DDP). Any other tensor, and a sharded parameter whose module has not
    run a forward yet, is returned as it is.

    FSDP2 keeps no public map from sharded to unsharded parameters in torch 2.13: this reads
    its per-module states. If a later torch changes them, the tensors come back unchanged and
    the caller sees None gradients, as before this function existed.
    """
    # Loaded by whoever made a DTensor or called fully_shard; not loaded here, so that a plain run
    # (or a torch built without distributed support) never imports them.
    dtensor = sys.modules.get("torch.distributed.tensor")
    states = sys.modules.get("torch.distributed._composable_state")
    if dtensor is None or states is None:
        return tensors
    if not any(isinstance(t, dtensor.DTensor) for t in tensors):
        return tensors
    unsharded: dict[int, Tensor] = {}
    for ref in list(states._module_state_mapping.values()):
        state = ref()
        for group in getattr(state, "_fsdp_param_groups", ()):
            for fsdp_param in getattr(group, "fsdp_params", ()):
                param = getattr(fsdp_param, "_unsharded_param", None)
                if param is not None:
                    unsharded[id(fsdp_param.sharded_param)] = param
    return [unsharded.get(id(t), t) for t in tensors]
