"""RLW: Random Loss Weighting (Lin et al. 2022)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from balanced_losses.weighting._checks import check_tasks
from balanced_losses.weighting.base import Weighting

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

    **Reproducible.** The draws come from the module's own ``torch.Generator`` (on the CPU,
    float32, then moved to the losses' device and dtype), seeded by ``seed``; the global RNG is
    neither used nor advanced. The generator's state is part of ``state_dict``, so a run resumed
    from a checkpoint draws exactly the weights the uninterrupted run would have drawn. The
    stream is the one ``torch.manual_seed(seed); torch.randn(K)`` gives, which TorchJD's
    ``Random`` scalarizer uses (its weights are ours divided by :math:`K`).

    **Eval mode** applies uniform weights 1 (the plain sum) and draws nothing, so validation
    losses are comparable across steps and do not advance the generator.

    Under DDP give every rank the same ``seed`` (with ``seed=None`` each rank derives its seed
    from its own global RNG), so that all ranks apply the same weights.

    Args:
        tasks: Task names, in order.
        seed: Seed of the module's generator; ``None`` draws one from torch's global RNG at
            construction (so ``torch.manual_seed`` makes it reproducible too).
        allow_missing: Accept mappings without some tasks; absent tasks get weight 0 and the
            present ones keep their drawn weights.
        check_inputs: Raise ``ValueError`` on non-finite or negative losses (syncs).
        sync_dist: Accepted for a uniform interface; nothing is averaged across ranks.

    Example:
        >>> import torch
        >>> rlw = RLW(["depth", "segmentation"], seed=0)
        >>> total = rlw({"depth": torch.tensor(2.0), "segmentation": torch.tensor(0.5)})
        >>> {task: round(w.item(), 4) for task, w in rlw.weights.items()}
        {'depth': 1.7246, 'segmentation': 0.2754}
        >>> _ = rlw.eval()
        >>> rlw({"depth": torch.tensor(2.0), "segmentation": torch.tensor(0.5)})
        tensor(2.5000)

    References:
        Lin, Ye, Zhang, Tsang. Reasonable Effectiveness of Random Weighting: A Litmus Test for
        Multi-Task Learning. TMLR 2022.
    """

    _version = 1

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        seed: int | None = None,
        allow_missing: bool = False,
        check_inputs: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(
            check_tasks(tasks),
            allow_missing=allow_missing,
            check_inputs=check_inputs,
            sync_dist=sync_dist,
        )
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise ValueError(f"`seed` must be an integer >= 0 or None, got {seed!r}")
        self.seed = seed
        self._generator = torch.Generator(device="cpu")
        self._generator.manual_seed(seed)

    def reset(self) -> None:
        """Restart the random stream from ``seed`` and clear the logged weights."""
        super().reset()
        self._generator.manual_seed(self.seed)

    def forward(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        """Return the randomly weighted total of ``losses`` (task name to scalar loss)."""
        values, present = self._stack(losses)
        k = len(self.tasks)
        if self.training:
            # Algorithm 1 of Lin et al. 2022: z ~ N(0, I), lambda = softmax(z); times K (ours).
            z = torch.randn(k, generator=self._generator, dtype=torch.float32)
            z = z.to(device=values.device, dtype=values.dtype)
            weights = k * torch.softmax(z, dim=0)
        else:
            weights = torch.ones_like(values)
        weights = torch.where(present, weights, torch.zeros_like(weights))
        self._record(weights, present)
        return (weights * values).sum()

    def get_extra_state(self) -> dict[str, Any]:
        """The generator's state, so that a resumed run draws the same weights."""
        return {"generator": self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the generator's state saved by :meth:`get_extra_state`."""
        self._generator.set_state(state["generator"].to("cpu", torch.uint8))

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self.tasks)}, seed={self.seed}"
