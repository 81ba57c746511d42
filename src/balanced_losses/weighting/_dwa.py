"""DWA: Dynamic Weight Average (Liu, Johns & Davison 2019)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from balanced_losses._base import Weighting
from balanced_losses._checks import check_number

__all__ = ["DWA"]


class DWA(Weighting):
    r"""Dynamic Weight Average: weigh each task by how slowly its epoch-mean loss falls.

    .. math::
        \text{total} = \sum_k \lambda_k L_k,\qquad
        \lambda_k(t) = K\,\frac{\exp(r_k(t-1)/T)}{\sum_i \exp(r_i(t-1)/T)},\qquad
        r_k(t-1) = \frac{\bar L_k(t-1)}{\bar L_k(t-2)}

    (Liu, Johns & Davison 2019, Eq. 3), where :math:`\bar L_k(t)` is the mean of task
    :math:`k`'s loss over the training batches of epoch :math:`t`, :math:`T` the temperature and
    :math:`K` the number of tasks, so the weights sum to :math:`K`. A task whose loss fell less
    in the last epoch (larger :math:`r_k`) gets more weight. The weights are constants within an
    epoch: the total's gradient is :math:`\sum_k \lambda_k \nabla L_k`.

    **Call order.** Call the module on every training batch, and :meth:`step` once at the end of
    each epoch (as TorchJD's ``DWA`` scalarizer does). ``step()`` closes the epoch: it turns the
    epoch's sums into means and drops the mean of two epochs ago. Calling ``step()`` with no
    training-mode forward since the previous ``step()`` (twice in a row, or before the first
    batch) raises ``RuntimeError``: it would roll an empty epoch into the history.

    **Before two epochs are complete** :math:`r_k = 1` (the paper initializes
    :math:`w_k(t) = 1` for :math:`t = 1, 2`), so the weights are all 1 and the total is the plain
    sum. The same holds per task: a task with fewer than two epoch means, or whose older mean is
    0, has :math:`r_k = 1`.

    **Statistics** (sums and counts of the current epoch, the last two epoch means) are persistent
    buffers, so a checkpoint taken mid-epoch resumes exactly. They update only in training mode,
    under ``torch.no_grad``; in eval mode the weights of the current epoch are applied and nothing
    is accumulated. A non-finite or absent loss does not enter the sums; a task with no valid
    loss in an epoch keeps its history unchanged at ``step()``.

    **Input domain.** :math:`r_k` is a ratio of mean losses, so each task's loss should keep one
    non-zero sign (losses are usually positive); ``check_inputs=True`` rejects negative losses.
    For very different :math:`r_k` (ratios far from 1) the softmax can underflow and give a
    weight of exactly 0.

    Args:
        tasks: Task names, in order.
        temperature: :math:`T > 0`; larger values make the weights more uniform. The paper
            uses 2.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks (see :class:`Weighting`).
        check_inputs: Raise ``ValueError`` on non-finite or negative losses (syncs).
        sync_dist: Average the losses that enter the epoch sums across ranks.

    Example:
        >>> import torch
        >>> dwa = DWA(["depth", "segmentation"])
        >>> for epoch_losses in ([4.0, 2.0], [2.0, 1.8]):  # one batch per epoch, for brevity
        ...     total = dwa({"depth": torch.tensor(epoch_losses[0]),
        ...                  "segmentation": torch.tensor(epoch_losses[1])})
        ...     dwa.step()
        >>> dwa({"depth": torch.tensor(1.0), "segmentation": torch.tensor(1.0)})
        tensor(2.0000)
        >>> dwa.last_weights
        tensor([0.9003, 1.0997])

    References:
        Liu, Johns, Davison. End-to-End Multi-Task Learning with Attention. CVPR 2019.
    """

    epoch_sum: Tensor
    epoch_count: Tensor
    batches: Tensor
    means: Tensor
    epochs: Tensor

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        temperature: float = 2.0,
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
        self.temperature = check_number("temperature", temperature, low=0.0, strict=True)
        k = len(self.tasks)
        self._add_state("epoch_sum", torch.zeros(k))
        self._add_state("epoch_count", torch.zeros(k, dtype=torch.long))
        # Training-mode forwards since the last step(): what step() checks the call order on.
        self._add_state("batches", torch.zeros((), dtype=torch.long), task_axis=None)
        # Row 0: mean of epoch t-2, row 1: mean of epoch t-1 (per task).
        self._add_state("means", torch.zeros(2, k), task_axis=1)
        self._add_state("epochs", torch.zeros(k, dtype=torch.long))

    @property
    def rates(self) -> Tensor:
        r"""The descending rates :math:`r_k(t-1)` used by the current epoch, shape ``(K,)``."""
        older, newer = self.means[0], self.means[1]
        usable = (self.epochs >= 2) & (older != 0)
        safe_older = torch.where(usable, older, torch.ones_like(older))
        rates = torch.where(usable, newer / safe_older, torch.ones_like(older))
        # A ratio of finite means can still overflow (1e8 / 1e-30); an inf rate would turn the
        # softmax into NaN. The largest finite value keeps the intended "this task gets all".
        return rates.nan_to_num(posinf=torch.finfo(rates.dtype).max)

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        r"""The DWA total :math:`\sum_k \lambda_k L_k` and the weights :math:`\lambda_k`."""
        # Eq. 3: K * softmax(r / T). The weights come from past epochs only, so they are
        # constants for this batch's gradient.
        k = len(self.tasks)
        # A temperature below 1 can push a clamped rate back to inf: clamp after dividing too.
        scaled = (self.rates.to(values.dtype) / self.temperature).nan_to_num(
            posinf=torch.finfo(values.dtype).max
        )
        weights = k * torch.softmax(scaled, dim=0)
        weights = torch.where(present, weights, torch.zeros_like(weights))
        if self._updating:
            self._accumulate(values, present)
        return (weights * values).sum(), weights

    @torch.no_grad()
    def _accumulate(self, values: Tensor, present: Tensor) -> None:
        mean, valid = self._stats_input(values, present)
        mean = mean.to(self.epoch_sum.dtype)
        self.epoch_sum.add_(torch.where(valid, mean, torch.zeros_like(mean)))
        self.epoch_count.add_(valid.to(self.epoch_count.dtype))
        self.batches.add_(1)

    def epoch_end(self) -> None:
        """Close the epoch, as :meth:`step` does: the loop's call at the end of each epoch."""
        self.step()

    @torch.no_grad()
    def step(self) -> None:
        """Close the epoch: roll its mean loss into the history. Call once per epoch, at its end.

        Raises:
            RuntimeError: If no training-mode forward happened since the last ``step()``.
        """
        # One host read per epoch, to enforce the call order; nothing on the per-batch path.
        if int(self.batches) == 0:
            raise RuntimeError(
                "`DWA.step()` was called with no training-mode forward since the last step(); "
                "expected order: call the module on each training batch's losses, then step() "
                "once at the end of the epoch"
            )
        seen = self.epoch_count > 0
        mean = self.epoch_sum / self.epoch_count.clamp_min(1).to(self.epoch_sum.dtype)
        rolled = torch.stack([self.means[1], mean])
        self.means.copy_(torch.where(seen, rolled, self.means))
        self.epochs.add_(seen.to(self.epochs.dtype))
        self.epoch_sum.zero_()
        self.epoch_count.zero_()
        self.batches.zero_()

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self.tasks)}, temperature={self.temperature}"
