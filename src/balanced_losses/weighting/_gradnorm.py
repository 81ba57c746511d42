"""GradNorm: learned loss weights that equalize training rates (Chen et al. 2018)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from balanced_losses._autograd import as_tensors, task_gradients
from balanced_losses._base import Weighting
from balanced_losses._checks import check_betas, check_number
from balanced_losses._numerics import adam_update, gradient_norm
from balanced_losses.distributed import autograd_targets

__all__ = ["GradNorm"]

Optimizer = Literal["adam", "sgd"]


class GradNorm(Weighting):
    r"""GradNorm (Chen et al. 2018): loss weights trained so that tasks learn at equal rates.

    .. math::
        \text{total} = \sum_k w_k L_k,\qquad
        L_\text{grad} = \sum_k \bigl|G_k - \bar G\, r_k^{\alpha}\bigr|,

    with :math:`G_k = \lVert \nabla_W\, w_k L_k \rVert_2 = w_k \lVert \nabla_W L_k \rVert_2` over
    the chosen shared parameters :math:`W` (typically the last shared layer),
    :math:`\bar G = \operatorname{mean}_k G_k`, the loss ratio
    :math:`\tilde L_k = L_k(t) / L_k(0)` and the relative inverse training rate
    :math:`r_k = \tilde L_k / \operatorname{mean}_j \tilde L_j` (Eq. 1-2 of the paper). A task
    that has trained less (larger :math:`r_k`) gets a larger target norm; :math:`\alpha` sets the
    strength of that restoring force (the paper's default 1.5; 0 just equalizes the norms).

    **One step of** :meth:`forward`, in the order of Algorithm 1 of the paper:

    1. The total :math:`\sum_k w_k(t) L_k` is built with the weights *before* this step's
       update, as constants: the model's ``backward`` never reaches :math:`w`.
    2. For each task, :math:`\nabla_W L_k` by ``torch.autograd.grad`` (``retain_graph=True``, so
       your ``backward`` still works; no ``.grad`` is touched). Its norm is a constant, so
       :math:`G_k` depends only on :math:`w_k`.
    3. The target :math:`\bar G r_k^\alpha` is treated as a constant (Sec. 3.2), so
       :math:`\partial L_\text{grad} / \partial w_k = \operatorname{sign}(G_k - \bar G r_k^\alpha)
       \lVert \nabla_W L_k \rVert` exactly. The gradient of :math:`L_\text{grad}` flows into
       :math:`w` only, never into the model's parameters: no second-order term reaches the
       model (an error some implementations make).
    4. One step of the internal optimizer on :math:`w`: Adam (the default, ``betas``) or plain
       SGD, with its own learning rate ``lr``. The paper steps :math:`w` alongside the network's
       parameters; choose ``optimizer`` to match the network's. Adam's step is about ``lr`` per
       update whatever the size of the gradient norms, which makes ``lr`` easy to choose.
    5. :math:`w` is floored at ``min_weight`` (our addition: a step that crosses zero would
       flip the sign of a loss) and renormalized so :math:`\sum_k w_k = K`
       (Sec. 3.2: decouples the weights from the global learning rate).

    :math:`L_k(0)` is the first finite, positive value of :math:`L_k` seen in training (per
    task). A step whose loss or gradient norm is not finite, or a task absent under
    ``allow_missing``, leaves that task's weight and optimizer state unchanged.

    **Cost**: one extra ``autograd.grad`` per task through the part of the graph between the
    loss and :math:`W`; choose :math:`W` close to the heads. In eval mode, or with gradients
    disabled, the weights are only applied. For balancing without extra passes see
    :class:`~balanced_losses.GradientBalancer`.

    **torch.compile**: :meth:`forward` calls ``torch.autograd.grad`` through the model's
    graph, so it cannot be compiled on its own; compile the whole training step with
    ``torch._dynamo.config.trace_autograd_ops = True`` and ``fullgraph=True``. Our tests show
    that capture equal to eager with ``backend="eager"``. With AOTAutograd backends
    (``"aot_eager"``, ``"inductor"``) PyTorch 2.13 computed the model's gradients with the
    weights *after* this step's in-place update, which is wrong: there, compile the model and
    keep GradNorm outside the compiled region.

    **State**: weights, :math:`L_k(0)`, step count and optimizer state are buffers, so
    ``state_dict`` resumes training exactly. The weights are buffers, not ``nn.Parameter``:
    they are trained by this module's own optimizer and must not be handed to the model's.
    The shared parameters are references to your model's tensors, not state: a
    ``copy.deepcopy`` or pickle of a GradNorm alone copies them and no longer follows the
    model. To move a trained GradNorm to a new model, build a new one on the new model's
    parameters and ``load_state_dict`` into it.
    Under ``sync_dist`` the losses and gradient norms are averaged across ranks before the
    update, so every rank applies the same weights.
    Under FSDP2 (``fully_shard``), build GradNorm after sharding, on the parameters as the
    sharded module holds them: the norms are taken at the unsharded parameters the forward
    used (each rank's full gradient of its own loss, as under DDP), then averaged. Taking them
    may run FSDP's all-gathers, so every rank must measure the same tasks.

    Args:
        tasks: Task names, in order.
        shared_parameters: The shared tensors :math:`W` (parameters, or an ``nn.Module`` whose
            parameters are used).
        alpha: Asymmetry :math:`\alpha \ge 0`.
        lr: Learning rate of the weights' optimizer.
        optimizer: ``"adam"`` or ``"sgd"``.
        betas: Adam's coefficients.
        adam_eps: Adam's epsilon.
        min_weight: Floor on each weight before renormalization, > 0.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks (see :class:`Weighting`).
        check_inputs: Raise ``ValueError`` on non-finite or non-positive losses (syncs).
        sync_dist: Average losses and gradient norms across ranks under ``torch.distributed``.

    Example:
        >>> import torch
        >>> shared, head_a, head_b = (torch.nn.Linear(3, 3), torch.nn.Linear(3, 1),
        ...     torch.nn.Linear(3, 1))
        >>> gradnorm = GradNorm(["a", "b"], shared.parameters(), lr=0.1, optimizer="sgd")
        >>> h = shared(torch.randn(16, 3))
        >>> total = gradnorm({"a": head_a(h).square().mean(), "b": head_b(h).abs().sum()})
        >>> total.backward()  # the model's gradients, with the weights before the update (1, 1)
        >>> round(gradnorm.loss_weights.sum().item(), 6)  # renormalized to K after the update
        2.0

    References:
        Chen, Badrinarayanan, Lee, Rabinovich. GradNorm: Gradient Normalization for Adaptive
        Loss Balancing in Deep Multitask Networks. ICML 2018.
    """

    # The method is invariant to a constant factor of a loss (see Weighting._check_factors).
    _cancels_factors = True

    _loss_domain = "positive"

    loss_weights: Tensor
    initial_losses: Tensor
    initialized: Tensor
    num_steps: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    optimizer_steps: Tensor
    grad_norms: Tensor
    gradnorm_loss: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        shared_parameters: nn.Module | Tensor | Iterable[Tensor],
        *,
        alpha: float = 1.5,
        lr: float = 0.025,
        optimizer: Optimizer = "adam",
        betas: tuple[float, float] = (0.9, 0.999),
        adam_eps: float = 1e-8,
        min_weight: float = 1e-4,
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
        # The model's tensors, not this module's state: a plain list keeps them out of
        # parameters() and state_dict().
        self._shared = as_tensors(shared_parameters, "shared_parameters")
        if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"`alpha` must be a finite number >= 0, got {alpha!r}")
        self.alpha = float(alpha)
        self.lr = check_number("lr", lr, low=0.0, strict=True)
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"`optimizer` must be 'adam' or 'sgd', got {optimizer!r}")
        self.optimizer = optimizer
        self.betas = check_betas(betas)
        self.adam_eps = check_number("adam_eps", adam_eps, low=0.0, strict=True)
        self.min_weight = check_number("min_weight", min_weight, low=0.0, strict=True)
        if self.min_weight >= 1:
            raise ValueError(f"`min_weight` must be < 1, got {min_weight!r}")
        k = len(self.tasks)
        # The weights are learned by GradNorm's own rule, not by the model's optimizer: state.
        self._add_state("loss_weights", torch.ones(k))
        self._add_state("initial_losses", torch.zeros(k))
        self._add_state("initialized", torch.zeros(k, dtype=torch.bool))
        self._add_state("num_steps", torch.zeros((), dtype=torch.long), task_axis=None)
        self._add_state("exp_avg", torch.zeros(k))
        self._add_state("exp_avg_sq", torch.zeros(k))
        self._add_state("optimizer_steps", torch.zeros(k, dtype=torch.long))
        # Outputs for logging, overwritten every update: not needed to resume.
        self._add_state("grad_norms", torch.zeros(k), kind="output")
        self._add_state("gradnorm_loss", torch.zeros(()), kind="output", task_axis=None)

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        if version < 3 and prefix + "step" in state_dict:
            # Version 3 renamed the update counter (`step` is DWA's epoch-end method).
            state_dict[prefix + "num_steps"] = state_dict.pop(prefix + "step")

    def forward(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        """Return the total with this step's weights, then update the weights (see above)."""
        # Not the base's template over `combine`: the update differentiates each raw loss
        # through the shared parameters, which the stacked `values` do not stand for (they
        # carry the user's factors in their gradients).
        values, present = self._stack(losses)
        # The weights of this step, copied before the in-place update below; a buffer, so the
        # total's gradient reaches the losses only.
        used = torch.where(present, self.loss_weights, torch.zeros_like(self.loss_weights))
        self._record(used, present)
        total = (used.to(device=values.device, dtype=values.dtype) * values).sum()
        if self._updating:
            self._update(losses, values, present)
        return self._returned(total)

    def _task_norms(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        device, dtype = self.loss_weights.device, self.loss_weights.dtype
        zero = torch.zeros((), device=device, dtype=dtype)
        norms = []
        # Under FSDP2 the shared parameters are shards outside the graph: ask autograd about the
        # unsharded parameters the forward used.
        shared = autograd_targets(self._shared)
        for task in self.tasks:
            loss = losses.get(task)
            if loss is None:
                norms.append(zero)
                continue
            norm = gradient_norm(task_gradients(loss, shared))
            if norm is None:
                warnings.warn(
                    f"the loss of task `{task}` does not depend on `shared_parameters`: its "
                    "GradNorm weight cannot be trained",
                    UserWarning,
                    stacklevel=3,
                )
                norms.append(zero)
                continue
            norms.append(norm.to(device=device, dtype=dtype))
        return torch.stack(norms)

    def _update(self, losses: Mapping[str, Tensor | None], values: Tensor, present: Tensor) -> None:
        k = len(self.tasks)
        # Norms of gradients taken without create_graph: constants, so L_grad cannot send
        # anything into the model.
        norms = self._task_norms(losses)
        with torch.no_grad():
            packed = torch.cat([values.detach().to(norms.dtype), norms])
            mean, ok = self._stats_input(packed, torch.cat([present, present]))
            loss, loss_ok, norm = mean[:k], ok[:k], mean[k:]
            norm_ok = ok[k:] & (norm > 0)
            first = loss_ok & ~self.initialized & (loss > 0)
            self.initial_losses.copy_(torch.where(first, loss, self.initial_losses))
            self.initialized.logical_or_(first)
            valid = loss_ok & norm_ok & self.initialized
            n_valid = valid.sum().clamp_min(1).to(norm.dtype)

            # Eq. 1 (loss ratio) and the relative inverse training rate r_k.
            ratio = torch.where(valid, loss / self.initial_losses.clamp_min(1e-38), 0.0)
            mean_ratio = ratio.sum() / n_valid
            rate = torch.where(valid, ratio / mean_ratio.clamp_min(1e-38), 1.0)
            g = self.loss_weights * norm
            mean_g = torch.where(valid, g, 0.0).sum() / n_valid
            # Eq. 2, target held constant: d|G_k - target_k| / dw_k = sign(.) ||grad_W L_k||.
            target = mean_g * rate.pow(self.alpha)
            diff = torch.where(valid, g - target, 0.0)
            grad = torch.sign(diff) * norm
            self.gradnorm_loss.copy_(diff.abs().sum())
            self.grad_norms.copy_(norm)

            if self.optimizer == "adam":
                delta, exp_avg, exp_avg_sq = adam_update(
                    grad,
                    self.exp_avg,
                    self.exp_avg_sq,
                    self.optimizer_steps + valid.to(self.optimizer_steps.dtype),
                    lr=self.lr,
                    betas=self.betas,
                    eps=self.adam_eps,
                )
                # A finite norm above ~1.8e19 squares to inf in float32: skip that task's step
                # rather than store an infinite second moment, which would freeze its weight.
                valid = valid & torch.isfinite(exp_avg_sq)
                steps = self.optimizer_steps + valid.to(self.optimizer_steps.dtype)
                self.exp_avg.copy_(torch.where(valid, exp_avg, self.exp_avg))
                self.exp_avg_sq.copy_(torch.where(valid, exp_avg_sq, self.exp_avg_sq))
                self.optimizer_steps.copy_(steps)
            else:
                delta = self.lr * grad
            weights = torch.where(valid, self.loss_weights - delta, self.loss_weights)
            weights = weights.clamp_min(self.min_weight)
            # Sec. 3.2: renormalize so that sum_k w_k = K.
            self.loss_weights.copy_(weights * (k / weights.sum()))
            self.num_steps.add_(1)

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return (
            f"tasks={list(self.tasks)}, alpha={self.alpha}, lr={self.lr}, "
            f"optimizer={self.optimizer!r}, min_weight={self.min_weight}"
        )
