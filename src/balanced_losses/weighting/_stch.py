"""STCH: smooth Tchebycheff scalarization (Lin et al. 2024), as its authors run it for MTL."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from balanced_losses._base import Weighting
from balanced_losses._checks import check_number
from balanced_losses._numerics import wide_dtype

__all__ = ["STCH"]

# The authors' floor inside the logarithm (their MTL code adds 1e-20 to every ratio).
_FLOOR = 1e-20


class STCH(Weighting):
    r"""Smooth Tchebycheff scalarization: descend on the task that is worst off, smoothly.

    After a warm-up, each loss is measured against its mean over one warm-up epoch (the nadir
    point :math:`\bar L_k`) in log scale, :math:`f_k = \log(L_k / \bar L_k)`, and the total is a
    smooth maximum of these,

    .. math::
        \text{total} = K\,\mu \log \sum_k \exp(f_k / \mu),\qquad
        w_k = \frac{\partial\,\text{total}}{\partial L_k}
            = K\,\operatorname{softmax}(f / \mu)_k\,\frac{1}{L_k},

    (Lin et al. 2024, Eq. 8 with equal preferences and the ideal point at :math:`f = 0`;
    the log-normalized objectives and the factor :math:`K` are those of the authors' multi-task
    code). As :math:`\mu \to 0` it becomes :math:`K \max_k f_k`: the task furthest above its
    nadir gets the whole step; a large :math:`\mu` spreads the weights over all tasks. During
    the warm-up (``warmup_epochs`` epochs) the total is :math:`\sum_k \log L_k`; in the epoch
    after it the same, while the mean of each loss over that epoch becomes :math:`\bar L_k`.

    **When to use it.** Where the goal is that no task is left behind (a min-max trade-off
    rather than an average). Because of the logarithms, a constant factor of a loss cancels.

    **Epochs.** Call :meth:`epoch_end` at the end of every training epoch (a loop that calls it
    for every method already does): the warm-up and the nadir are counted in epochs. The epoch
    count, the current epoch's loss sums and the nadir are in the ``state_dict``.

    **Input domain.** Losses must be positive (logarithms); ``check_inputs=True`` raises
    ``ValueError`` naming the task otherwise.

    Args:
        tasks: Task names, in order.
        mu: The smoothing :math:`\mu > 0` (1, the value the authors' multi-task code uses by
            default).
        warmup_epochs: Epochs of :math:`\sum_k \log L_k` before the nadir epoch (4, as the
            authors).
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks; an absent task is left out of the
            smooth maximum and of the nadir's mean. A task with no loss in the nadir epoch takes
            its first loss after it as its nadir.
        check_inputs: Raise ``ValueError`` on non-finite or non-positive losses (syncs).
        sync_dist: Average the losses that enter the nadir across ranks.

    Example:
        >>> import torch
        >>> stch = STCH(["depth", "segmentation"], warmup_epochs=0)
        >>> stch({"depth": torch.tensor(2.0), "segmentation": torch.tensor(0.5)})  # nadir epoch
        tensor(0.)
        >>> stch.epoch_end()  # the nadir is (2.0, 0.5)
        >>> total = stch({"depth": torch.tensor(1.0), "segmentation": torch.tensor(0.5)})
        >>> stch.last_weights  # depth fell to half its nadir: the weight goes to segmentation
        tensor([0.6667, 2.6667])

    References:
        Lin, Zhang, Yang, Zhang, Zhang. Smooth Tchebycheff Scalarization for Multi-Objective
        Optimization. ICML 2024.
    """

    _cancels_factors = True
    _loss_domain: str | None = "positive"

    epochs_done: Tensor
    nadir_sum: Tensor
    nadir_count: Tensor
    nadir: Tensor

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        mu: float = 1.0,
        warmup_epochs: int = 4,
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
        self.mu = check_number("mu", mu, low=0.0, strict=True)
        if isinstance(warmup_epochs, bool) or not isinstance(warmup_epochs, int):
            raise ValueError(f"`warmup_epochs` must be an integer >= 0, got {warmup_epochs!r}")
        if warmup_epochs < 0:
            raise ValueError(f"`warmup_epochs` must be an integer >= 0, got {warmup_epochs!r}")
        self.warmup_epochs = warmup_epochs
        k = len(self.tasks)
        self._add_state("epochs_done", torch.zeros((), dtype=torch.long), task_axis=None)
        self._add_state("nadir_sum", torch.zeros(k, dtype=torch.float64))
        self._add_state("nadir_count", torch.zeros(k, dtype=torch.long))
        # 0 until the nadir epoch ends: the smooth maximum starts then.
        self._add_state("nadir", torch.zeros(k, dtype=torch.float64))
        # The epoch count as a Python int, so that choosing the phase costs no host read
        # (``epochs_done`` mirrors it in the state_dict).
        self._epochs = 0
        # Whether some task had no loss in the nadir epoch; read on the host once per epoch.
        self._nadir_missing = False

    def _reset_python_state(self) -> None:
        super()._reset_python_state()
        self._epochs = 0
        self._nadir_missing = False

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """``sum log L`` during the warm-up and the nadir epoch, then the smooth maximum."""
        zeros = torch.zeros_like(values)
        if self._epochs <= self.warmup_epochs:
            # Every warm-up epoch sums its losses; only the last one's sums become the nadir
            # (epoch_end clears the others'), as in the authors' code.
            if self._updating:
                with torch.no_grad():
                    mean, valid = self._stats_input(values, present)
                    add = torch.where(valid, mean.to(self.nadir_sum.dtype), 0.0)
                    self.nadir_sum.add_(add)
                    self.nadir_count.add_(valid.to(self.nadir_count.dtype))
            safe = torch.where(present, values, torch.ones_like(values))
            logs = torch.where(present, torch.log(safe + _FLOOR), zeros)
            weights = torch.where(present, 1.0 / (safe.detach() + _FLOOR), zeros)
            return logs.sum(), weights
        if self._updating and self._nadir_missing:
            # A task with no loss in the nadir epoch takes its first loss after it as its nadir,
            # so it is not left out of training for good. Only while one is missing: the usual
            # step pays no averaging across ranks for it.
            with torch.no_grad():
                mean, valid = self._stats_input(values, present)
                unset = valid & (self.nadir <= 0)
                self.nadir.copy_(torch.where(unset, mean.to(self.nadir.dtype), self.nadir))
        # In the wide dtype, as a difference of logarithms: log(L / nadir + eps) itself would
        # overflow where a loss is far above a tiny nadir (3.4e8 over 1e-30 in float32).
        wide = wide_dtype(values.device)
        v = values.to(wide)
        nadir = self.nadir.to(device=values.device, dtype=wide)
        usable = present & (nadir > 0)
        safe_nadir = torch.where(usable, nadir, 1.0)
        shifted = torch.where(usable, v, 1.0) + _FLOOR * safe_nadir
        f = torch.log(shifted) - torch.log(safe_nadir)
        scaled = torch.where(usable, f / self.mu, torch.full_like(f, -torch.inf))
        k = len(self.tasks)
        total = (k * self.mu * torch.logsumexp(scaled, dim=0)).to(values.dtype)
        soft = torch.softmax(scaled, dim=0)
        weights = torch.where(usable, k * soft / shifted.detach(), 0.0).to(values.dtype)
        # No task usable (none present): a total of 0 that still depends on the losses.
        total = torch.where(usable.any(), total, (values * 0).sum())
        return total, weights.detach()

    def epoch_end(self) -> None:
        """Count an epoch; at the end of the nadir epoch, fix each loss's mean as its nadir."""
        if self.training:
            with torch.no_grad():
                if self._epochs < self.warmup_epochs:
                    self.nadir_sum.zero_()
                    self.nadir_count.zero_()
                elif self._epochs == self.warmup_epochs:
                    count = self.nadir_count.clamp_min(1).to(self.nadir_sum.dtype)
                    self.nadir.copy_(torch.where(self.nadir_count > 0, self.nadir_sum / count, 0.0))
            self._epochs += 1
            self.epochs_done.add_(1)
            self._nadir_missing = self._missing_after_warmup()

    def _missing_after_warmup(self) -> bool:
        """Past the nadir epoch, whether a task still has no nadir (one host read)."""
        return self._epochs > self.warmup_epochs and bool((self.nadir <= 0).any())

    def reset_running_stats(self) -> None:
        """Forget the epochs and the nadir: the warm-up starts again."""
        super().reset_running_stats()
        self._epochs = 0
        self._nadir_missing = False

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        # Loading is not a training step: reading the count on the host costs nothing here.
        self._epochs = int(self.epochs_done)
        self._nadir_missing = self._missing_after_warmup()

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self.tasks)}, mu={self.mu}, warmup_epochs={self.warmup_epochs}"
