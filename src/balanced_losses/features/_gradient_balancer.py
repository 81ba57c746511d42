"""GradientBalancer: equalize the gradient each task sends into the shared features, in one pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor

from balanced_losses._checks import check_momentum, check_number
from balanced_losses._numerics import debiased, ema_step, gradient_norm, norm_scales
from balanced_losses.features._branch import FeatureWeighting

__all__ = ["GradientBalancer"]

Target = Literal["mean", "max"]


class GradientBalancer(FeatureWeighting):
    r"""Rescale each task's gradient at the shared features to a common norm, in one backward.

    For a model with a shared trunk and task heads::

        feats = model.encoder(x)
        views = balancer.branch(feats)   # task -> same structure as feats, identity forward
        out_p = model.pointer_head(views["pointer"])
        out_c = model.countdown_head(views["countdown"])
        loss = balancer({"pointer": lp, "countdown": lc})   # the plain sum
        loss.backward()

    **What is equalized.** During the one backward pass, every task's gradient w.r.t. its view
    of the shared features, :math:`g_k = \partial L_k / \partial \text{feats}`, arrives at one
    autograd node together. Its norm :math:`n_k = \lVert g_k \rVert_2` is taken over the batch
    and feature elements together (over all tensors when ``feats`` is a tuple or dict),
    accumulated in float64 (float32 on MPS) even when the gradients are bf16/fp16, so that a
    large GradScaler scale cannot overflow the squares of finite gradients. The trunk receives

    .. math::
        \frac{\partial\,\text{total}}{\partial\,\text{feats}} = \sum_k s_k\, g_k,\qquad
        s_k = w_k\, \frac{T}{\hat n_k},\qquad
        T = \operatorname{mean}_j \hat n_j \ (\texttt{target="mean"}) \text{ or }
        \max_j \hat n_j \ (\texttt{target="max"}),

    where :math:`\hat n_k` is a bias-corrected EMA of :math:`n_k` (momentum :math:`\beta`:
    :math:`m \leftarrow \beta m + (1-\beta) n_k`, :math:`\hat n_k = m / (1 - \beta^{c_k})` after
    :math:`c_k` updates, Adam's correction) and :math:`w_k` an optional ratio (default 1). So
    each task reaches the trunk with norm :math:`\approx w_k T`. With ``momentum=0``, and at the
    very first step for any momentum (the corrected EMA then equals the current norm), the
    norms are exactly :math:`w_k T`. The heads' own parameters get their plain, unscaled
    gradients; the returned total is :math:`\sum_k L_k`, and the forward values are untouched.
    ``target="max"`` scales every task up to the largest EMA norm: the gradient-magnitude half
    of DB-MTL (Lin et al. 2023).

    **Why this quantity.** :math:`g_k` is what task :math:`k` actually sends into the shared
    layers, whatever its loss's reduction (mean over 2 or over 105 outputs), its regime
    (a Huber loss in its linear part has gradients capped at ``delta`` however large the loss)
    or its value. Balancing loss values (:class:`~balanced_losses.LossNormalizer`) balances
    gradients only when those happen to agree; measuring the gradient needs no such
    assumption, and costs no extra backward pass.

    **Why a ratio of EMAs, not** :math:`T / n_k` **of the current step.** The multiplier is
    dimensionless: numerator and denominator carry the same units, so it is invariant to a
    constant loss scale (``torch.amp.GradScaler``: every task's norm carries the scale, so
    :math:`s_k` does not; when the scale changes, every task's EMA weighs the steps by it
    alike), and one noisy batch in which a task's gradient happens to be tiny is not amplified
    by a huge factor.

    **What it cannot do.** It equalizes norms, not directions: gradients that conflict still
    partly cancel in the sum (for that, see TorchJD's ``UPGrad`` aggregator, which projects
    per-task Jacobians). It balances at the features, not per parameter of the trunk. It needs
    a model whose shared trunk ends in tensors that you can pass through :meth:`branch`;
    for other models see :class:`~balanced_losses.GradNorm` or
    :mod:`balanced_losses.diagnostics`.

    **Robustness.** A measured norm enters the EMA only if it is finite and > 0, selected with
    ``torch.where`` (no host-device sync): a task absent from the batch (zero gradient), or an
    inf/NaN gradient from an AMP overflow step, leaves the statistics unchanged. Where a task has
    no usable EMA yet, :math:`s_k = w_k`. A view that received no gradient at all (no loss used
    it, or its loss does not depend on it) triggers a ``UserWarning`` naming the task, unless
    that task was absent from the last :meth:`forward` call (``allow_missing``).

    **Gradient accumulation, retain_graph.** Multipliers are computed, and statistics updated,
    once per backward pass through :meth:`branch`: with micro-batches each micro-batch is
    balanced on its own and the EMA advances once per micro-batch. A second backward through the
    same graph (``retain_graph=True``) updates the statistics again. Call :meth:`branch` once per
    forward pass.

    **Other backward passes through the views.** Any backward that reaches :meth:`branch`'s
    node counts as a training backward, your own ``torch.autograd.grad`` included. The functions
    of :mod:`balanced_losses.diagnostics` are recognized: through them the balancer applies its
    current multipliers without updating statistics or warning, so a report over the trunk's
    parameters shows what each task sends *after* balancing. For the raw imbalance, measure at
    the views: ``task_gradient_norms(losses, [views["a"], views["b"]])`` (a view unused by a
    task counts as zero).

    **Modes.** In eval mode, or with gradients disabled, :meth:`branch` returns ``feats`` itself
    for every task and nothing is measured or rescaled. The views alias ``feats``: do not modify
    them in place (e.g. ``nn.ReLU(inplace=True)`` as a head's first layer).

    **Distributed.** With ``sync_dist`` and an initialized multi-rank process group, the norms
    entering the EMA are averaged across ranks, so all ranks apply the same multipliers.

    Logging: :attr:`last_weights` holds the last multipliers :math:`s_k` (0 for a task without
    gradient) and :attr:`grad_norms` the last measured :math:`n_k`, both as tensors.

    Args:
        tasks: Task names, in order.
        momentum: EMA weight on the previous statistic, in ``[0, 1)``; 0 uses the current norms.
        target: ``"mean"`` (default) or ``"max"`` of the tasks' EMA norms.
        weights: Optional task name to a finite ratio >= 0 (default 1): task :math:`k` is scaled
            to :math:`w_k T` instead of :math:`T`.
        eps: Lower bound on :math:`\hat n_k` in the division.
        allow_missing: Accept loss mappings without some tasks (see :class:`Weighting`).
        sync_dist: Average the measured norms across ranks under ``torch.distributed``.

    Example:
        >>> import torch
        >>> trunk = torch.nn.Linear(3, 4)
        >>> head_a, head_b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 105)
        >>> balancer = GradientBalancer(["a", "b"])
        >>> views = balancer.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().sum()  # a sum: a far larger gradient
        >>> balancer({"a": loss_a, "b": loss_b}).backward()
        >>> n = balancer.grad_norms  # measured before rescaling
        >>> s = balancer.last_weights
        >>> torch.allclose(s[0] * n[0], s[1] * n[1])  # equal norms into the trunk
        True

    References:
        Lin, Ye, Xu, Shi, Zhang, Kwok. Dual-Balancing for Multi-Task Learning.
        arXiv:2308.12029, 2023 (the ``"max"`` target).
    """

    _loss_domain = None

    ema: Tensor
    count: Tensor
    grad_norms: Tensor
    _cancels_factors = True

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        momentum: float = 0.9,
        target: Target = "mean",
        weights: Mapping[str, float] | None = None,
        eps: float = 1e-12,
        allow_missing: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(tasks, weights=weights, allow_missing=allow_missing, sync_dist=sync_dist)
        if target not in ("mean", "max"):
            raise ValueError(f"`target` must be 'mean' or 'max', got {target!r}")
        self.momentum = check_momentum(momentum)
        self.target = target
        self.eps = check_number("eps", eps, low=0.0, strict=True)
        k = len(self.tasks)
        self._add_state("ema", torch.zeros(k))
        self._add_state("count", torch.zeros(k, dtype=torch.long))
        # Output only, overwritten every backward: not needed to resume.
        self._add_state("grad_norms", torch.zeros(k), kind="output")

    @property
    def running_norm(self) -> Tensor:
        r"""Bias-corrected EMA :math:`\hat n_k` of each task's gradient norm, NaN where unseen."""
        return debiased(self.ema, self.count, self.momentum)

    def multipliers(self) -> Tensor:
        r"""The factors :math:`s_k = w_k T / \hat n_k` the current statistics give, shape ``(K,)``.

        :math:`s_k = w_k` where task :math:`k` has no usable EMA yet.
        """
        return self._fixed_weights * self._scales()

    def _scales(self) -> Tensor:
        # T / n_k: what the method itself applies to each task's (unweighted) gradient.
        return norm_scales(self.running_norm, self.count, self.target, self.eps)

    def _current_weights(self) -> Tensor:
        return self._scales()

    def _step_weights(self, per_task: list[Sequence[Tensor | None]], got: list[bool]) -> Tensor:
        """Measure each task's norm, update the EMAs, return the multipliers."""
        device, dtype = self.ema.device, self.ema.dtype
        # A measurement, not part of any graph: under create_graph=True the gradients carry
        # history, and the norms must not.
        with torch.no_grad():
            zero = torch.zeros((), device=device, dtype=dtype)
            norms = []
            for task_grads in per_task:
                norm = gradient_norm(list(task_grads))
                norms.append(zero if norm is None else norm.to(device=device, dtype=dtype))
            measured = torch.stack(norms)
            # Statistics take only finite norms > 0: an absent task (zero gradient) or an AMP
            # overflow step leaves them unchanged. NaN > 0 is False; _stats_input drops inf.
            # Under sync_dist this is a collective inside backward: every rank runs the same
            # graph, so every rank reaches this node, in the same order relative to DDP's own
            # gradient all-reduces, and the collectives match.
            mean, valid = self._stats_input(measured, measured > 0)
            ema, count = ema_step(self.ema, self.count, mean, valid, self.momentum)
            self.ema.copy_(ema)
            self.count.copy_(count)
            self.grad_norms.copy_(measured)
            scale = self._scales()
            present = self._all_present.to(device)
            if not all(got):
                # In-place fills with Python indices: no host-to-device copy of a list.
                present = present.clone()
                for i, has_grad in enumerate(got):
                    if not has_grad:
                        present[i] = False
            self._record(scale, present)
        return scale

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return (
            f"tasks={list(self.tasks)}, momentum={self.momentum}, target={self.target!r}, "
            f"eps={self.eps}"
        )
