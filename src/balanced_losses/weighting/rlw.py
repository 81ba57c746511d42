"""RLW: Random Loss Weighting (Lin et al. 2022), with a counter-based random stream."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor

from balanced_losses.weighting.base import Weighting

__all__ = ["RLW"]

_MASK32 = 0xFFFFFFFF
# Philox4x32 constants (Salmon, Moraes, Dror & Shaw 2011, Sec. 5): round multipliers and the
# Weyl increments of the key schedule (golden ratio and sqrt(3) - 1, as 32-bit fractions).
_PHILOX_M0 = 0xD2511F53
_PHILOX_M1 = 0xCD9E8D57
_PHILOX_W0 = 0x9E3779B9
_PHILOX_W1 = 0xBB67AE85
_PHILOX_ROUNDS = 10


def _mulhilo32(a: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """High and low 32-bit words of ``a * m`` for ``0 <= a, m < 2**32``, without overflow.

    The 64-bit product does not fit a signed int64, so ``m`` is split into 16-bit halves: every
    partial product is below 2**48 and every sum below 2**50, and all values stay non-negative
    (so ``>>`` is a logical shift). Exact on every backend, no reliance on wrap-around.
    """
    p_lo = a * (m & 0xFFFF)
    p_hi = a * (m >> 16)
    mid = ((p_hi & 0xFFFF) << 16) + p_lo
    return (p_hi >> 16) + (mid >> 32), mid & _MASK32


def _philox4x32(
    counter: tuple[Tensor, Tensor, Tensor, Tensor], key: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 of ``counter`` under ``key``; every word an int64 tensor in ``[0, 2**32)``.

    Salmon et al. 2011, Sec. 5 (the Random123 ``philox4x32_R`` with R = 10): a round maps
    ``(c0, c1, c2, c3)`` to ``(hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0))``
    and the key is bumped by the Weyl increments between rounds. Words broadcast.
    """
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for round_ in range(_PHILOX_ROUNDS):
        if round_ > 0:
            k0 = (k0 + _PHILOX_W0) & _MASK32
            k1 = (k1 + _PHILOX_W1) & _MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _standard_normal(seed: Tensor, step: Tensor, task: Tensor) -> Tensor:
    r"""The draw :math:`z \sim \mathcal N(0, 1)` of ``task`` at ``step`` under ``seed``, float32.

    A pure function of its int64 arguments (``seed`` and ``step`` in ``[0, 2**63)``, ``task`` in
    ``[0, 2**32)``), which broadcast: Philox4x32-10 with counter ``(step mod 2**32,
    step // 2**32, task, 0)`` and key ``(seed mod 2**32, seed // 2**32)``; the top 23 bits of its
    first two words give :math:`u_1, u_2 \in (0, 1)` (exact in float32, at least
    :math:`2^{-24}` away from 0 and 1), and Box and Muller (1958) give
    :math:`z = \sqrt{-2\ln u_1}\cos(2\pi u_2)`, so :math:`|z| < 5.8`.
    """
    zero = torch.zeros_like(step + task)  # the broadcast shape; also counter word 3
    step, task = step + zero, task + zero
    words = _philox4x32((step & _MASK32, step >> 32, task, zero), (seed & _MASK32, seed >> 32))
    u1, u2 = (((w >> 9).to(torch.float32) + 0.5) * 2.0**-23 for w in words[:2])
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)


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
    persistent int64 buffers, ``seed`` and ``step`` (the number of draws made so far), so a run
    resumed from ``state_dict`` draws exactly the weights the uninterrupted run would have drawn.
    The same ``seed`` gives the same weights on every run; across device types, or under a
    ``torch.compile`` backend that generates its own kernels, they can differ in the last bits
    of float32 ``log`` and ``cos``.

    **Eval mode** applies uniform weights 1 (the plain sum) and draws nothing: validation losses
    are comparable across steps and ``step`` does not advance.

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
        allow_missing: Accept mappings without some tasks; absent tasks get weight 0 and the
            present ones keep their drawn weights.
        check_inputs: Raise ``ValueError`` on non-finite or negative losses (syncs).
        sync_dist: Accepted for a uniform interface; nothing is averaged across ranks.

    Example:
        >>> import torch
        >>> rlw = RLW(["depth", "segmentation"], seed=0)
        >>> total = rlw({"depth": torch.tensor(2.0), "segmentation": torch.tensor(0.5)})
        >>> {task: round(w.item(), 4) for task, w in rlw.weights.items()}
        {'depth': 0.9618, 'segmentation': 1.0382}
        >>> rlw.step
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

    _version = 2

    seed: Tensor
    step: Tensor

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
            tasks,
            allow_missing=allow_missing,
            check_inputs=check_inputs,
            sync_dist=sync_dist,
        )
        if seed is None:
            seed = int(torch.randint(0, 2**62, ()).item())
        if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
            raise ValueError(f"`seed` must be an integer >= 0 and < 2**63 or None, got {seed!r}")
        self.register_buffer("seed", torch.tensor(seed, dtype=torch.long))
        # Draws made so far: the counter of the stream, what a resumed run continues from.
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    def reset(self) -> None:
        """Restart the random stream from ``seed`` and clear the logged weights."""
        super().reset()
        self.step.zero_()

    def forward(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        """Return the randomly weighted total of ``losses`` (task name to scalar loss)."""
        values, present = self._stack(losses)
        k = len(self.tasks)
        if self.training:
            # Algorithm 1 of Lin et al. 2022: z ~ N(0, I), lambda = softmax(z); times K (ours).
            task = torch.arange(k, device=self.step.device)
            z = _standard_normal(self.seed, self.step, task)
            z = z.to(device=values.device, dtype=values.dtype)
            weights = k * torch.softmax(z, dim=0)
            with torch.no_grad():
                self.step.add_(1)
        else:
            weights = torch.ones_like(values)
        weights = torch.where(present, weights, torch.zeros_like(weights))
        self._record(weights, present)
        return (weights * values).sum()

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        # A checkpoint without a version (a state_dict copied without its metadata) may still be
        # of the current layout: upgrade only what lacks the counter.
        if version < 2 and prefix + "step" not in state_dict:
            # Version 1 kept a CPU torch.Generator state in `_extra_state` and no seed. A
            # Mersenne Twister state has no position in the Philox stream, so the stream restarts.
            state_dict.pop(prefix + "_extra_state", None)
            state_dict.setdefault(prefix + "seed", self.seed.clone())
            state_dict[prefix + "step"] = torch.zeros((), dtype=torch.long)
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
