"""RLW: Random Loss Weighting (Lin et al. 2022), with a counter-based random stream."""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from balanced_losses._base import Weighting
from balanced_losses._checks import check_seed
from balanced_losses._numerics import standard_normal

__all__ = ["RLW"]


class RLW(Weighting):
    r"""Random Loss Weighting: fresh random weights at every training step.

    .. math::
        \text{total} = \sum_k \lambda_k L_k,\qquad
        \lambda = K\,\operatorname{softmax}(z),\qquad z \sim \mathcal N(0, I_K)

    drawn anew at every training-mode forward (Lin et al. 2022, Algorithm 1 with the normal
    distribution and softmax normalization). **The factor** :math:`K` **is ours:** the paper's
    weights sum to 1; ours sum to :math:`K`, like the plain sum's weights of 1, so that switching
    from a plain sum to RLW keeps the size of the gradient (and the effective learning rate of
    SGD) the same on average. The balance between tasks is the paper's.

    **A counter-based random stream.** :math:`z_k` at draw number :math:`t` is a fixed function
    of ``(seed, t, k)``: the Philox4x32-10 bijection (Salmon et al. 2011) of the counter
    :math:`(t, k)` under the key ``seed``, turned into a standard normal by Box and Muller
    (1958), in float32 tensor operations on the module's device (then cast to the losses' dtype).
    So there is no ``torch.Generator``: the draw compiles with ``torch.compile(fullgraph=True)``,
    costs no host-device copy, and neither uses nor advances torch's global RNG. The state is two
    persistent int64 buffers, ``seed`` and ``num_steps`` (the number of draws made so far), so a run
    resumed from ``state_dict`` draws exactly the weights the uninterrupted run would have drawn.
    The same ``seed`` gives the same weights on every run; across device types, or under a
    ``torch.compile`` backend that generates its own kernels, they can differ in the last bits
    of float32 ``log`` and ``cos``.

    **Eval mode** applies uniform weights 1 (the plain sum) and draws nothing: validation losses
    are comparable across steps and ``num_steps`` does not advance.

    Under DDP give every rank the same ``seed`` (with ``seed=None`` each rank derives its seed
    from its own global RNG), so that all ranks apply the same weights.

    **Checkpoints of version 1** (which kept a CPU ``torch.Generator`` state) load with a
    warning: a generator state cannot be turned into a position of the new stream, so the draws
    restart from ``step`` 0 under this module's own ``seed``.

    Args:
        tasks: Task names, in order.
        seed: Key of the random stream, an integer in ``[0, 2**63)``; ``None`` draws one from
            torch's global RNG at construction (so ``torch.manual_seed`` makes it reproducible
            too).
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept mappings without some tasks; absent tasks get weight 0 and the
            present ones keep their drawn weights.
        check_inputs: Raise ``ValueError`` on non-finite or negative losses (syncs).

    Example:
        >>> import torch
        >>> rlw = RLW(["depth", "segmentation"], seed=0)
        >>> total = rlw({"depth": torch.tensor(2.0), "segmentation": torch.tensor(0.5)})
        >>> rlw.last_weights
        tensor([0.9618, 1.0382])
        >>> rlw.num_steps
        tensor(1)
        >>> _ = rlw.eval()
        >>> rlw({"depth": torch.tensor(2.0), "segmentation": torch.tensor(0.5)})
        tensor(2.5000)

    References:
        Lin, Ye, Zhang, Tsang. Reasonable Effectiveness of Random Weighting: A Litmus Test for
        Multi-Task Learning. TMLR 2022.

        Salmon, Moraes, Dror, Shaw. Parallel Random Numbers: As Easy as 1, 2, 3. SC 2011.

        Box, Muller. A Note on the Generation of Random Normal Deviates. Ann. Math. Stat. 1958.
    """

    seed: Tensor
    num_steps: Tensor

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        seed: int | None = None,
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        check_inputs: bool = False,
    ) -> None:
        super().__init__(
            tasks, weights=weights, allow_missing=allow_missing, check_inputs=check_inputs
        )
        seed = check_seed(seed)
        # Saved, never reset: reset() restarts the same stream.
        self._add_state("seed", torch.tensor(seed, dtype=torch.long), kind="config", task_axis=None)
        # Draws made so far: the counter of the stream, what a resumed run continues from.
        self._add_state("num_steps", torch.zeros((), dtype=torch.long), task_axis=None)

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        r"""The randomly weighted total and this step's weights :math:`K\,\mathrm{softmax}(z)`."""
        k = len(self.tasks)
        if self._updating:
            # Algorithm 1 of Lin et al. 2022: z ~ N(0, I), lambda = softmax(z); times K (ours).
            task = torch.arange(k, device=self.num_steps.device)
            z = standard_normal(self.seed, self.num_steps, task)
            z = z.to(device=values.device, dtype=values.dtype)
            weights = k * torch.softmax(z, dim=0)
            with torch.no_grad():
                self.num_steps.add_(1)
        else:
            weights = torch.ones_like(values)
        weights = torch.where(present, weights, torch.zeros_like(weights))
        return (weights * values).sum(), weights

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        # A checkpoint without a version (a state_dict copied without its metadata) may still be
        # of the current layout: upgrade only what lacks the counter.
        if version < 3 and prefix + "step" in state_dict:
            # Version 3 renamed the counter of the stream (`step` is DWA's epoch-end method).
            state_dict[prefix + "num_steps"] = state_dict.pop(prefix + "step")
        if version < 2 and prefix + "num_steps" not in state_dict:
            # Version 1 kept a CPU torch.Generator state in `_extra_state` and no seed. A
            # Mersenne Twister state has no position in the Philox stream, so the stream restarts.
            state_dict.pop(prefix + "_extra_state", None)
            state_dict.setdefault(prefix + "seed", self.seed.clone())
            state_dict[prefix + "num_steps"] = torch.zeros((), dtype=torch.long)
            warnings.warn(
                f"RLW checkpoint `{prefix or '<root>'}` has version {version}, whose random "
                "generator state cannot be carried over to the counter-based stream of version "
                f"{self._version}: the draws restart from step 0 with this module's seed "
                f"{int(self.seed)}, so the weights after resuming differ from the original run's",
                UserWarning,
                stacklevel=2,
            )

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self.tasks)}, seed={int(self.seed)}"
