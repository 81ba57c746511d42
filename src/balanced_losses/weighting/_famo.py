"""FAMO: Fast Adaptive Multitask Optimization (Liu et al. 2023)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from balanced_losses._base import Weighting
from balanced_losses._checks import check_betas, check_number, per_task_values
from balanced_losses._lifecycle import StepLosses
from balanced_losses._numerics import adam_update

__all__ = ["FAMO"]


class FAMO(Weighting):
    r"""FAMO: decrease every task's log-loss at about the same rate, from loss values only.

    .. math::
        \text{total} = c \sum_k z_k \log(L_k - b_k + \epsilon),\qquad
        z = \operatorname{softmax}(\xi),\qquad
        c = \Big(\sum_k \frac{z_k}{L_k - b_k + \epsilon}\Big)^{-1}

    with :math:`c` and :math:`z` held constant in the backward pass (Liu et al. 2023,
    Algorithm 1), so the gradient is the convex combination
    :math:`\sum_k w_k \nabla L_k` with effective weights
    :math:`w_k = c\, z_k / (L_k - b_k + \epsilon)`, which sum to 1. :math:`b_k` is a known
    lower bound of task :math:`k`'s loss (``min_losses``, 0 by default).

    **The logits** :math:`\xi` are not learned by the model's optimizer. After the model's
    optimizer step, call :meth:`update` with the losses recomputed on the same batch. It
    measures each task's decrease in log-loss over the step,
    :math:`\delta_k = \log(L_k^{\text{before}} - b_k + \epsilon) - \log(L_k^{\text{after}} - b_k
    + \epsilon)`, and takes one Adam step on :math:`\xi` along
    :math:`\nabla_\xi\, z(\xi)^\top \delta + \gamma \xi`: tasks that improved more lose weight.
    Adam with learning rate 0.025 and weight decay :math:`\gamma = 10^{-3}` follow the paper's
    practical pseudo-code (Algorithm 2, Appendix C), LibMTL and TorchJD's ``FAMO``; Algorithm 1
    writes the same update as a plain gradient step, and the authors' code defaults to
    :math:`\gamma = 10^{-5}` (pass ``weight_decay=1e-5`` to match it).
    The logits and the Adam moments and step count are persistent buffers: a checkpoint holds
    all of FAMO's state, and :meth:`parameters` is empty, so the model's optimizer cannot touch
    the logits by accident.

    **Call order.** ``famo(losses)`` (training mode), ``backward()``, ``optimizer.step()``,
    then ``famo.update(losses_after_step)`` (or ``famo.after_step(...)``, the generic loop's
    call, which may take a function that computes the losses). ``update()`` without a
    training-mode forward since the last ``update()`` (before the first forward, or twice in a
    row) raises ``RuntimeError``.
    Calling the module again before ``update()`` replaces the remembered "before" losses, as in
    TorchJD. In eval mode the module applies the current weights and remembers nothing.

    **Input domain.** Every loss must stay above its lower bound, :math:`L_k > b_k` (positive
    losses with the default bounds): the method takes :math:`\log(L_k - b_k + \epsilon)`.
    ``check_inputs=True`` raises ``ValueError`` naming the task otherwise.

    Args:
        tasks: Task names, in order.
        lr: Adam learning rate of the logits (the paper's :math:`\beta`, 0.025).
        weight_decay: Adam weight decay of the logits (the paper's :math:`\gamma`, 1e-3).
        betas: Adam's moment coefficients.
        adam_eps: Adam's epsilon.
        min_losses: Optional task name to the lower bound :math:`b_k` (default 0).
        eps: :math:`\epsilon` inside the logarithm (1e-8, as the authors' code).
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks; absent tasks get weight 0 and
            :math:`c` sums over the present ones. A task absent before or after the step gets
            :math:`\delta_k = 0` in :meth:`update`.
        check_inputs: Raise ``ValueError`` on non-finite losses or losses at or below their
            bound (syncs).
        sync_dist: Average the losses that :meth:`update` compares across ranks, so every rank
            keeps the same logits.

    Example:
        >>> import torch
        >>> famo = FAMO(["depth", "segmentation"])
        >>> total = famo({"depth": torch.tensor(2.0), "segmentation": torch.tensor(0.5)})
        >>> famo.last_weights  # c z_k / L_k
        tensor([0.2000, 0.8000])
        >>> # ... total.backward(); optimizer.step(); recompute the losses on the same batch:
        >>> famo.update({"depth": torch.tensor(1.0), "segmentation": torch.tensor(0.45)})
        >>> famo.logits  # depth improved more, so it loses weight
        tensor([-0.0250,  0.0250])

    References:
        Liu, Liang, Stone, Liu. FAMO: Fast Adaptive Multitask Optimization. NeurIPS 2023.
    """

    # The method is invariant to a constant factor of a loss (see Weighting._check_factors).
    _cancels_factors = True

    _loss_domain: str | None = "positive"

    logits: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    adam_step: Tensor
    prev_losses: Tensor
    prev_valid: Tensor
    min_losses: Tensor

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        min_losses: Mapping[str, float] | None = None,
        eps: float = 1e-8,
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        check_inputs: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(
            tasks,
            weights=weights,
            allow_missing=allow_missing,
            check_inputs=check_inputs,
            sync_dist=sync_dist,
        )
        self.lr = check_number("lr", lr, low=0.0, strict=False)
        self.weight_decay = check_number("weight_decay", weight_decay, low=0.0, strict=False)
        self.betas = check_betas(betas)
        self.adam_eps = check_number("adam_eps", adam_eps, low=0.0, strict=True)
        self.eps = check_number("eps", eps, low=0.0, strict=False)
        bounds = per_task_values("min_losses", self.tasks, min_losses, 0.0)
        self._bounds = dict(zip(self.tasks, bounds, strict=True))
        if any(bound != 0.0 for bound in bounds):
            # The domain is L_k > b_k, checked by _check_bounds instead of the base's L_k > 0.
            self._loss_domain = None
        k = len(self.tasks)
        self._add_state("logits", torch.zeros(k))
        self._add_state("exp_avg", torch.zeros(k))
        self._add_state("exp_avg_sq", torch.zeros(k))
        self._add_state("adam_step", torch.zeros((), dtype=torch.long), task_axis=None)
        self._add_state("prev_losses", torch.zeros(k))
        self._add_state("prev_valid", torch.zeros(k, dtype=torch.bool))
        # A constructor argument: rebuilt, never loaded.
        self._add_state("min_losses", torch.tensor(bounds), kind="constant")
        # Whether a training-mode forward awaits its update(). A Python flag, so that the
        # ordering check costs no host-device sync; it travels in the state_dict's extra state.
        self._pending = False

    @property
    def softmax_weights(self) -> Tensor:
        r"""The current :math:`z = \operatorname{softmax}(\xi)`, shape ``(K,)``."""
        return torch.softmax(self.logits, dim=0)

    def _reset_python_state(self) -> None:
        self._pending = False

    def _get_python_state(self) -> dict[str, Any]:
        # Whether a forward awaits its update(): the ordering state.
        return {"pending": self._pending}

    def _set_python_state(self, state: dict[str, Any]) -> None:
        self._pending = bool(state.get("pending", False))

    def _check_bounds(self, values: Tensor, present: Tensor) -> None:
        # Opt-in like the base class's checks: .tolist() syncs.
        for name, value, ok in zip(self.tasks, values.tolist(), present.tolist(), strict=True):
            bound = self._bounds[name]
            if ok and not value > bound:
                raise ValueError(
                    f"loss of task `{name}` must be > its bound `min_losses` = {bound}, got {value}"
                )

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        r"""The FAMO total and its effective weights :math:`c\, z_k / (L_k - b_k + \epsilon)`."""
        if self.check_inputs and self._loss_domain is None:
            self._check_bounds(values, present)
        shifted = values - self.min_losses.to(values.dtype) + self.eps
        z = torch.softmax(self.logits.to(values.dtype), dim=0)
        # Algorithm 1: c and z are constants of the model's backward pass, so the gradient is
        # the convex combination sum_k c z_k / shifted_k grad L_k. Cut the path through c.
        ratio = torch.where(present, z / shifted.detach(), torch.zeros_like(z))
        # With no task present the ratio is all zeros: divide by 1 instead of 0 (total 0).
        inv_c = ratio.sum()
        inv_c = torch.where(inv_c > 0, inv_c, torch.ones_like(inv_c))
        weights = ratio / inv_c
        logs = torch.where(present, torch.log(shifted), torch.zeros_like(shifted))
        total = (z / inv_c * logs).sum()
        if self._updating:
            with torch.no_grad():
                before, valid = self._stats_input(values, present)
                self.prev_losses.copy_(before.to(self.prev_losses.dtype))
                self.prev_valid.copy_(valid)
            self._pending = True
        return total, weights

    def after_step(self, losses: StepLosses) -> None:
        """:meth:`update` with the losses after the optimizer step (computed here if a function).

        Args:
            losses: Task name to the loss recomputed on the same batch after the step, or a
                function of no arguments that returns it (called under ``torch.no_grad()``).
        """
        with torch.no_grad():
            self.update(losses() if callable(losses) else losses)

    @torch.no_grad()
    def update(self, losses: Mapping[str, Tensor | None]) -> None:
        """Learn the logits from the change of each loss over the model's optimizer step.

        Args:
            losses: Task name to the loss recomputed on the same batch after the model's
                optimizer step.

        Raises:
            RuntimeError: If no training-mode forward happened since the last ``update()``.
        """
        if not self._pending:
            raise RuntimeError(
                "`FAMO.update()` was called with no training-mode forward since the last "
                "update(); expected order: total = famo(losses), total.backward(), "
                "optimizer.step(), then famo.update(losses recomputed on the same batch)"
            )
        values, present = self._stack(losses)
        if self.check_inputs and self._loss_domain is None:
            self._check_bounds(values, present)
        after, valid = self._stats_input(values, present)
        dtype = self.logits.dtype
        bounds = self.min_losses.to(dtype)
        before = self.prev_losses - bounds + self.eps
        after = after.to(dtype) - bounds + self.eps
        # Only losses above their bound have a log: a loss at or below it (possible without
        # check_inputs) must not carry a NaN into the logits, where it would stay forever.
        both = valid & self.prev_valid & (before > 0) & (after > 0)
        ones = torch.ones_like(before)
        delta = torch.log(torch.where(both, before, ones)) - torch.log(
            torch.where(both, after, ones)
        )
        z = torch.softmax(self.logits, dim=0)
        # Gradient of z(xi)^T delta w.r.t. xi: the softmax Jacobian (diag(z) - z z^T) times
        # delta, written out instead of an autograd call.
        grad = z * (delta - (z * delta).sum())
        self._adam_step(grad)
        self._pending = False

    def _adam_step(self, grad: Tensor) -> None:
        # Adam (Kingma & Ba 2015, Algorithm 1) with L2 weight decay added to the gradient, as
        # torch.optim.Adam(weight_decay=gamma) in the authors' code: the paper's gamma * xi term.
        grad = grad + self.weight_decay * self.logits
        self.adam_step.add_(1)
        delta, exp_avg, exp_avg_sq = adam_update(
            grad,
            self.exp_avg,
            self.exp_avg_sq,
            self.adam_step,
            lr=self.lr,
            betas=self.betas,
            eps=self.adam_eps,
        )
        self.exp_avg.copy_(exp_avg)
        self.exp_avg_sq.copy_(exp_avg_sq)
        self.logits.sub_(delta)

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        parts = [
            f"tasks={list(self.tasks)}",
            f"lr={self.lr}",
            f"weight_decay={self.weight_decay}",
        ]
        if self.betas != (0.9, 0.999):
            parts.append(f"betas={self.betas}")
        if self._loss_domain is None:
            parts.append(f"min_losses={self._bounds}")
        return ", ".join(parts)
