"""GO4Align: group risk minimization, tasks clustered by a risk-guided indicator (Shen et al.)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor

from balanced_losses._base import Weighting
from balanced_losses._checks import check_count, check_number
from balanced_losses._numerics import wide_dtype

__all__ = ["GO4Align", "group_means"]


def group_means(values: Tensor, present: Tensor, groups: int) -> Tensor:
    r"""Each value replaced by the mean of its group in the optimal 1-D k-means of ``values``.

    The ``present`` entries of ``values`` (``(K,)``) are split into at most ``groups`` groups
    that minimize the within-group sum of squares. In one dimension the optimal groups are runs
    of the sorted values, so dynamic programming finds them exactly (Wang & Song, "Ckmeans.1d.dp:
    Optimal k-means Clustering in One Dimension by Dynamic Programming", R Journal 2011):
    :math:`D_g(j) = \min_{i < j} D_{g-1}(i) + c(i, j)` over the sorted prefix, with :math:`c`
    the sum of squares of the run :math:`(i, j]` from prefix sums. Absent entries are sorted
    last and weigh nothing; they get 0. Fixed shapes, no host-device sync.
    """
    k = values.shape[0]
    x = torch.where(present, values, torch.full_like(values, torch.inf))
    order = torch.argsort(x, stable=True)
    wide = wide_dtype(values.device)
    xs = torch.where(present[order], values[order], 0.0).to(wide)
    ms = present[order].to(wide)
    zero = xs.new_zeros(1)
    s1 = torch.cat([zero, xs.cumsum(0)])
    s2 = torch.cat([zero, (xs * xs).cumsum(0)])
    n = torch.cat([zero, ms.cumsum(0)])
    # cost[i, j]: the run (i, j] of the sorted values, i < j; inf elsewhere.
    count = n[None, :] - n[:, None]
    total = s1[None, :] - s1[:, None]
    cost = (s2[None, :] - s2[:, None]) - total * total / count.clamp_min(1.0)
    index = torch.arange(k + 1, device=values.device)
    cost = torch.where(index[:, None] < index[None, :], cost.clamp_min(0.0), torch.inf)
    best = cost[0]  # one group: the prefix up to j
    choices = []
    for _ in range(1, groups):
        candidates = best[:, None] + cost  # (i, j): the last group is (i, j]
        # Allowing i = j keeps D_{g-1}(j) (an empty group): fewer distinct values than groups.
        candidates = torch.where(index[:, None] == index[None, :], best[:, None], candidates)
        best, arg = candidates.min(0)
        choices.append(arg)
    # Walk back from the full prefix: the start of each group, last group first.
    end = torch.full((1,), k, dtype=torch.long, device=values.device)
    starts = []
    for arg in reversed(choices):
        end = arg.gather(0, end)
        starts.append(end)
    boundaries = torch.cat(starts) if starts else end.new_zeros(0)
    position = torch.arange(k, device=values.device)
    group = (position[:, None] >= boundaries[None, :]).sum(1)
    sums = torch.zeros(groups, dtype=wide, device=values.device)
    sizes = torch.zeros_like(sums)
    sums.scatter_add_(0, group, xs)
    sizes.scatter_add_(0, group, ms)
    sorted_means = (sums / sizes.clamp_min(1.0))[group]
    out = torch.empty_like(sorted_means).scatter_(0, order, sorted_means)
    return torch.where(present, out.to(values.dtype), 0.0)


class GO4Align(Weighting):
    r"""GO4Align: tasks grouped by a risk-guided indicator, each group weighted alike.

    Each step, with :math:`\ell_k` the detached losses, a risk distribution :math:`p` is updated
    by an exponentiated-gradient step and every task gets the indicator

    .. math::
        p \leftarrow \frac{p \odot e^{-\eta \ell}}{\sum_j p_j e^{-\eta \ell_j}},\qquad
        s_k = \frac{\sum_j \ell_j}{\ell_k}\, p_k ,

    (:math:`p` starts uniform). The indicators are clustered into ``num_groups`` groups and each
    task's weight is the mean indicator of its group; the total is :math:`\sum_k w_k L_k`.
    Since :math:`s_k L_k = p_k \sum_j \ell_j`, a task alone in its group contributes its share
    :math:`p_k` of the summed loss whatever its own scale; grouping makes tasks with similar
    indicators move together ("adaptive group risk minimization", Shen et al. 2024, with the
    indicator and the update of the authors' code, and :math:`\eta = 10^{-4}` as there).

    The authors cluster with k-means from random starts; here the clustering is the exact
    optimum of the same objective in one dimension (:func:`group_means`), deterministic and
    without a sync. The authors' code defaults to one group, where every task gets the mean
    indicator (a plain sum, rescaled); the default here is two, the fewest that groups
    anything.

    **When to use it.** A loss-level method at the cost of a plain sum that equalizes the
    losses' contributions by groups of tasks.

    Args:
        tasks: Task names, in order.
        num_groups: The number of groups, at least 1 (1: the mean indicator for all).
        step_size: :math:`\eta \ge 0` of the risk update.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks; an absent task keeps its
            :math:`p_k`, is left out of the sums and the groups, and gets weight 0.
        check_inputs: Raise ``ValueError`` on non-finite or non-positive losses (syncs).
        sync_dist: Average the losses that move :math:`p` across ranks.

    Example:
        >>> import torch
        >>> go = GO4Align(["depth", "segmentation", "normals"], num_groups=2)
        >>> total = go({"depth": torch.tensor(1.0), "segmentation": torch.tensor(1.1),
        ...             "normals": torch.tensor(4.0)})
        >>> go.last_weights  # depth and segmentation in one group, normals in the other
        tensor([1.9411, 1.9411, 0.5082])

    References:
        Shen, Wang, Xiao, van Noord, Worring. GO4Align: Group Optimization for Multi-Task
        Alignment. NeurIPS 2024.
    """

    _loss_domain: str | None = "positive"

    probs: Tensor

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        num_groups: int = 2,
        step_size: float = 1e-4,
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
        self.num_groups = check_count("num_groups", num_groups)
        self.step_size = check_number("step_size", step_size, low=0.0, strict=False)
        k = len(self.tasks)
        self._add_state("probs", torch.full((k,), 1.0 / k, dtype=torch.float64))

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """The grouped indicators as weights of a plain weighted sum."""
        if self._updating:
            with torch.no_grad():
                mean, valid = self._stats_input(values, present)
                # Shifted by the least loss, which cancels in the normalization: the largest
                # factor is 1, so large losses cannot underflow every factor to 0 (1e7 * 1e-4).
                loss = torch.where(valid, mean, torch.inf).to(wide_dtype(values.device))
                shift = torch.where(valid, loss - loss.min(), 0.0)
                moved = self.probs * torch.exp(-self.step_size * shift)
                total = moved.sum()
                uniform = torch.full_like(moved, 1.0 / moved.numel())
                # Every probability underflowed to 0 over the steps: start again from uniform.
                # One that alone underflowed (a loss far above the others once) is kept at the
                # losses' dtype's least normal number instead: a probability of 0 would never
                # move again, and its task would keep a weight of 0 for the rest of training.
                floor = torch.finfo(values.dtype).tiny
                self.probs.copy_(torch.where(total > 0, moved / total, uniform).clamp_min(floor))
        wide = wide_dtype(values.device)
        losses = torch.where(present, values.detach(), torch.ones_like(values)).to(wide)
        summed = torch.where(present, losses, 0.0).sum()
        probs = self.probs.to(values.device, wide)
        indicator = torch.where(present, summed / losses * probs, 0.0)
        groups = min(self.num_groups, len(self.tasks))
        # Grouping can put a task with a huge loss next to one whose indicator is huge (the
        # summed loss over a loss of 1e-30): each weight is capped so that no w_k L_k, and so
        # not the total (summed in the wide dtype), leaves the losses' dtype. The cap is far
        # above any weight of a loss between 1e-30 and 1e3 at 40 tasks.
        cap = torch.finfo(values.dtype).max / (len(self.tasks) * losses.max().clamp(min=1.0))
        weights = group_means(indicator, present, groups).clamp(max=cap)
        kept = torch.where(present, values, torch.zeros_like(values))
        total = (weights * kept.to(wide)).sum().to(values.dtype)
        return total, weights.to(values.dtype)

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self.tasks)}, num_groups={self.num_groups}, step_size={self.step_size}"
