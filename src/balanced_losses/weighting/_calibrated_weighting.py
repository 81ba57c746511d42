"""CalibratedWeighting: measure each task's gradient at the shared parameters, then fix weights."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from balanced_losses._autograd import as_tensors, scale_gradient, task_gradients
from balanced_losses._calibration import FreezeAfterCalibration
from balanced_losses._checks import check_count, check_number
from balanced_losses._numerics import grad_shares, gradient_norm, norm_scales, wide_dtype
from balanced_losses.distributed import autograd_targets

__all__ = ["CalibratedWeighting"]


def shared_leaves(losses: Sequence[Tensor]) -> list[Tensor]:
    """The tensors that require grad which every one of ``losses`` reaches in its graph.

    These are the leaves (parameters) of the autograd graph below every loss: a model's shared
    trunk, where each head's parameters are reached by its own task's loss only. In the order
    a depth-first walk from the first loss meets them.
    """
    reached: list[dict[int, Tensor]] = []
    for loss in losses:
        leaves: dict[int, Tensor] = {}
        # Nodes are kept in `seen` (alive) so that their identity is stable during the walk.
        seen: set[Any] = set()
        stack = [loss.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)  # an AccumulateGrad node's leaf
            if isinstance(variable, Tensor):
                leaves[id(variable)] = variable
            stack.extend(child for child, _ in node.next_functions)
        reached.append(leaves)
    common = set(reached[0]).intersection(*reached[1:])
    return [tensor for key, tensor in reached[0].items() if key in common]


class CalibratedWeighting(FreezeAfterCalibration):
    r"""Measure each task's gradient at the shared parameters for a while, then fix the weights.

    For the first ``steps`` training steps, each task's gradient with respect to the shared
    parameters :math:`\theta` (the trunk: the parameters that every task's loss reaches) is
    measured, one ``torch.autograd.grad`` per task, and the norms
    :math:`n_k = \lVert \nabla_\theta L_k \rVert` are averaged over the steps so far,
    :math:`\hat n_k`. Each step trains on

    .. math::
        \sum_k w_k s_k L_k, \qquad s_k = \frac{\operatorname{mean}_j \hat n_j}{\hat n_k},

    so that every task's gradient reaches the shared weights with the same norm. After ``steps``
    steps the :math:`s_k` are frozen, and training goes on with a fixed weighted sum: no
    measurement and no extra cost. The returned total keeps the value of the plain sum
    :math:`\sum_k L_k` (the weights act on its gradient), so a logged total does not jump.

    **When to use it.** As the default: it corrects the imbalance that the losses' reductions,
    regimes and scales put into the gradients (a mean over 2 outputs next to one over 105, a
    Huber loss in its linear regime, a cross-entropy next to an MSE of 0.01), measured where the
    tasks compete, at the shared weights, and on your model rather than assumed. Measured there,
    a head that reads one time step and a head that reads all of them are compared by what they
    do to the shared weights, which a measurement at the shared features
    (:class:`~balanced_losses.CalibratedBalancer`) gets wrong. Once frozen, nothing later in
    training (a task learned, a batch whose loss happens to be small) can move the weights.
    ``docs/choosing.md`` has the measurements behind the default and where it loses.

    **Cost**: on each measured step (every ``every``-th of the first ``steps``), one extra
    backward pass per task through the model (``retain_graph``); afterwards none. In eval mode or
    without gradients the weights are only applied.

    **The shared parameters**: by default, those that every task's loss reaches, found by
    walking the autograd graph of the first calibration step on which two or more tasks are
    present (then kept). Pass ``shared_parameters`` (a module, such as ``model.encoder``, or
    tensors) to name them. Under FSDP2 (``fully_shard``) the norms are taken at the unsharded
    parameters the forward used; under ``sync_dist`` they are averaged over the ranks, so every
    rank freezes the same weights. ``torch.compile``: its calibration steps call
    ``torch.autograd.grad``; compile the model and keep this module outside, or compile the whole
    step with ``torch._dynamo.config.trace_autograd_ops = True`` (tested with ``fullgraph=True``
    against eager).

    **Checkpoints**: the steps counted, the averaged norms and the frozen multipliers are in the
    ``state_dict``: a run resumed after the calibration keeps its weights; one resumed during it
    continues calibrating where it stopped. :meth:`reset_running_stats` starts a new
    calibration.

    Args:
        tasks: Task names, in order.
        shared_parameters: The shared parameters to measure at (a module or tensors); None
            (default) finds them in the autograd graph.
        steps: Training steps to calibrate over.
        every: Measure on every this many of those steps (1: all of them); the steps between
            use the averages so far. Fewer measurements cost fewer extra backward passes.
        weights: Your fixed factor per task (default 1), applied on top of :math:`s_k`.
        eps: Lower bound on :math:`\hat n_k` in the division.
        allow_missing: Accept loss mappings without some tasks (see :class:`Weighting`); an
            absent task is not measured on that step.
        sync_dist: Average the measured norms across ranks under ``torch.distributed``.

    Example:
        >>> import torch
        >>> trunk = torch.nn.Linear(3, 4)
        >>> head_a, head_b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 105)
        >>> weighting = CalibratedWeighting(["a", "b"], steps=2)
        >>> for _ in range(3):
        ...     h = trunk(torch.randn(8, 3))
        ...     loss_a = head_a(h).square().mean()
        ...     loss_b = head_b(h).square().sum()  # a sum: a far larger gradient
        ...     weighting({"a": loss_a, "b": loss_b}).backward()
        >>> weighting.frozen  # two steps measured, the third trained with fixed weights
        True
        >>> s = weighting.frozen_weights
        >>> bool(s[0] > 1 > s[1])  # task a's small gradient lifted, task b's lowered
        True
    """

    # s_k divides each loss's gradient by its norm: a constant factor on a loss cancels.
    _cancels_factors = True

    norm_mean: Tensor
    norm_count: Tensor
    grad_norms: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        shared_parameters: nn.Module | Tensor | Iterable[Tensor] | None = None,
        *,
        steps: int = 100,
        every: int = 1,
        weights: Mapping[str, float] | None = None,
        eps: float = 1e-12,
        allow_missing: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(tasks, weights=weights, allow_missing=allow_missing, sync_dist=sync_dist)
        self._declare_calibration(steps)
        self.every = check_count("every", every)
        self.eps = check_number("eps", eps, low=0.0, strict=True)
        # The model's tensors, not this module's state: a plain list keeps them out of
        # parameters() and state_dict().
        self._given = (
            None
            if shared_parameters is None
            else as_tensors(shared_parameters, "shared_parameters")
        )
        k = len(self.tasks)
        self._add_state("norm_mean", torch.zeros(k, dtype=torch.float64))
        self._add_state("norm_count", torch.zeros(k, dtype=torch.long))
        # Output only, overwritten every calibration step: not needed to resume.
        self._add_state("grad_norms", torch.zeros(k), kind="output")
        self._reset_python_state()

    def _reset_python_state(self) -> None:
        super()._reset_python_state()
        # The shared parameters found in the graph (None: not looked for yet).
        self._found: list[Tensor] | None = None

    @property
    def running_norm(self) -> Tensor:
        r""":math:`\hat n_k`: each task's norm averaged over the calibration (NaN if unseen)."""
        return torch.where(self.norm_count > 0, self.norm_mean, torch.nan)

    def multipliers(self) -> Tensor:
        r"""The factors :math:`w_k s_k` applied now: the frozen ones after the calibration."""
        scale = self.frozen_scale if self._frozen else self._scales()
        return self._fixed_weights * scale.to(self._fixed_weights.dtype)

    def _scales(self) -> Tensor:
        """mean_j n_j / n_k over the tasks measured so far; 1 for a task not measured yet.

        A factor beyond the statistics' dtype (a norm of 1e-30 next to one of 1e28) is clamped
        there, so the weights stay finite.
        """
        return norm_scales(self.running_norm, self.norm_count, "mean", self.eps)

    def _shared(self, losses: list[Tensor]) -> list[Tensor] | None:
        """The tensors to measure at; None where they cannot be told on this step."""
        if self._given is not None:
            # Under FSDP2 the given parameters are shards outside the graph: ask autograd
            # about the unsharded parameters the forward used.
            return autograd_targets(self._given)
        if self._found is None:
            if len(losses) < 2:
                return None  # one loss reaches its head too: nothing tells the trunk apart
            self._found = shared_leaves(losses)
            if not self._found:
                warnings.warn(
                    f"the losses of {list(self.tasks)} share no parameter in their autograd "
                    f"graph: {self._method_name} has nothing to measure and keeps weights of 1 "
                    "(pass `shared_parameters` to name the shared trunk)",
                    UserWarning,
                    stacklevel=4,
                )
        return self._found

    def _measure(self, losses: Mapping[str, Tensor | None]) -> None:
        """One calibration step: each present task's norm at the shared parameters, averaged."""
        graphed: dict[int, Tensor] = {}
        for i, task in enumerate(self.tasks):
            loss = losses.get(task)
            if loss is not None and loss.requires_grad:
                graphed[i] = loss
        shared = self._shared(list(graphed.values()))
        device = self.norm_mean.device
        dtype = wide_dtype(device)
        measured = torch.zeros(len(self.tasks), device=device, dtype=dtype)
        if shared:
            for i, loss in graphed.items():
                norm = gradient_norm(task_gradients(loss, shared))
                if norm is not None:
                    measured[i] = norm.to(device=device, dtype=dtype)
        with torch.no_grad():
            # Only finite norms > 0 count: an absent task, a loss that does not reach the
            # shared parameters or an AMP overflow leaves that task's average unchanged.
            mean, valid = self._stats_input(measured, measured > 0)
            mean = mean.to(self.norm_mean.dtype)
            n = self.norm_count.to(self.norm_mean.dtype)
            # A plain running mean over the calibration steps.
            self.norm_mean.copy_(
                torch.where(valid, (self.norm_mean * n + mean) / (n + 1), self.norm_mean)
            )
            self.norm_count.add_(valid.to(self.norm_count.dtype))
            self.grad_norms.copy_(measured.to(self.grad_norms.dtype))

    def forward(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        r"""The plain sum's value, with the gradient of :math:`\sum_k w_k s_k L_k`."""
        values, present = self._stack(losses)
        self._freeze_if_calibrated()
        if self._updating and not self._frozen and self._python_steps % self.every == 0:
            self._measure(losses)
        self._count_step()
        scale = (self.frozen_scale if self._frozen else self._scales()).to(values.device)
        self._record(scale, present)
        # The weights act on the gradients only: the value stays the plain sum, and a large
        # weight on a large loss cannot overflow it.
        return self._returned(scale_gradient(values, scale.to(values.dtype)).sum())

    def _logged_per_task(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        # While calibrating: each task's part of the gradient at the shared parameters,
        # |s_k| n_k / sum_j |s_j| n_j. Once frozen nothing is measured: nothing to log.
        if self._frozen:
            return {}
        return {"grad_share": grad_shares(self.last_weights, self.grad_norms, device, dtype)}

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        shared = "found in the graph" if self._given is None else f"{len(self._given)} tensors"
        return (
            f"tasks={list(self.tasks)}, steps={self.steps}, every={self.every}, "
            f"shared={shared}, eps={self.eps}"
        )
