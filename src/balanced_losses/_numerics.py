"""Arithmetic both families of methods share: the wide dtype, EMAs, Adam's step, Philox draws."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "MASK32",
    "adam_update",
    "debiased",
    "ema_step",
    "grad_shares",
    "gradient_norm",
    "host_shortcuts",
    "norm_scales",
    "philox4x32",
    "settled",
    "standard_normal",
    "wide_dtype",
]

#: Whether fixed-budget solvers may take host shortcuts on CPU tensors (see
#: :func:`host_shortcuts`). Tests switch it off to run the accelerator path on the CPU.
HOST_SHORTCUTS = True


def wide_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums and solves that must not lose precision: float64, float32 on MPS.

    MPS has no float64. Everywhere else float64 costs nothing measurable for what uses it
    (``(K, K)`` Gramians and programs, per-task norms, a logged step), and keeps the squares of a
    large GradScaler scale's gradients finite and the QP solves accurate.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def ema_step(
    ema: Tensor, count: Tensor, value: Tensor, valid: Tensor, momentum: float
) -> tuple[Tensor, Tensor]:
    r"""One EMA update :math:`m \leftarrow \beta m + (1 - \beta) x`, where ``valid``; out of place.

    Returns the new ``(ema, count)``: entries where ``valid`` is False keep their EMA and count
    (selected with ``torch.where``: no host-device sync). Read the EMA with :func:`debiased`.
    """
    blended = momentum * ema + (1.0 - momentum) * value
    return torch.where(valid, blended, ema), count + valid.to(count.dtype)


def gradient_norm(grads: list[Tensor | None]) -> Tensor | None:
    """L2 norm over all elements of ``grads`` (None entries count as zero), in :func:`wide_dtype`.

    None when every entry is None.
    """
    # Squares of float32 gradients above ~1e19 overflow float32 although the gradient itself is
    # finite, as under a large GradScaler scale: accumulate in the wide dtype.
    parts: list[Tensor] = [
        torch.linalg.vector_norm(g, dtype=wide_dtype(g.device)) for g in grads if g is not None
    ]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    norm: Tensor = torch.linalg.vector_norm(torch.stack([p.to(parts[0].device) for p in parts]))
    return norm


def grad_shares(
    multipliers: Tensor, norms: Tensor, device: torch.device, dtype: torch.dtype
) -> Tensor:
    r"""Each task's part of what reaches the shared tensors, :math:`|c_k| n_k / \sum_j |c_j| n_j`.

    NaN everywhere when nothing was sent; in ``dtype`` on ``device``, for :meth:`log_dict`.
    """
    sent = multipliers.detach().to(device, dtype).abs() * norms.detach().to(device, dtype)
    total = sent.sum()
    tiny = torch.finfo(dtype).tiny
    return torch.where(total > 0, sent / total.clamp_min(tiny), math.nan)


def debiased(ema: Tensor, count: Tensor, momentum: float) -> Tensor:
    r"""Bias-corrected EMA :math:`m_t / (1 - \beta^t)`, NaN where ``count`` is 0.

    Adam's correction (Kingma & Ba 2015, Sec. 3): an EMA started at 0 with momentum
    :math:`\beta` is low by the factor :math:`1 - \beta^t` after :math:`t` updates, so dividing by
    it makes the first update equal the first value exactly. ``count`` holds :math:`t` per entry.
    """
    correction = 1.0 - momentum ** count.to(ema.dtype)
    return torch.where(count > 0, ema / correction.clamp_min(1e-38), torch.nan)


def norm_scales(running: Tensor, count: Tensor, target: str, eps: float) -> Tensor:
    r"""Factors :math:`T / \hat n_k` that bring each task's norm to a common target.

    ``running`` holds the bias-corrected EMA norms :math:`\hat n_k` (NaN where unseen) and
    ``count`` their update counts; :math:`T` is their mean (``"mean"``) or maximum (``"max"``)
    over the tasks that have one. A task without a usable norm gets 1. A factor beyond the
    dtype's range (a norm of ~1e-30 next to one of ~1e28) is clamped there: finite weights.
    """
    available = (count > 0) & (running > 0)  # NaN > 0 is False
    known = torch.where(available, running, torch.zeros_like(running))
    if target == "mean":
        level = known.sum() / available.sum().clamp_min(1).to(known.dtype)
    else:
        level = known.max()
    scale = (level / known.clamp_min(eps)).clamp_max(torch.finfo(known.dtype).max)
    return torch.where(available, scale, torch.ones_like(scale))


def host_shortcuts(tensor: Tensor) -> bool:
    """Whether code may read ``tensor``'s values on the host for free.

    True for a CPU tensor outside ``torch.compile``: there is no device for the host to wait
    for. The fixed-budget solvers then stop once converged (:func:`settled`) or call LAPACK,
    with the same result; on an accelerator they run their whole budget without a sync.
    """
    return HOST_SHORTCUTS and tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def settled(done: Tensor) -> bool:
    """Whether a fixed-budget loop may stop now: ``done`` holds, read where that is free.

    A converged iterate is a fixed point of these loops, so stopping early changes nothing but
    the time; where reading ``done`` would need a host-device sync this is always False.
    """
    return host_shortcuts(done) and bool(done.all())


def adam_update(
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: Tensor,
    *,
    lr: float,
    betas: tuple[float, float],
    eps: float,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""One Adam step, out of place: ``(delta, exp_avg, exp_avg_sq)`` after the step.

    Kingma & Ba 2015, Algorithm 1: :math:`m \leftarrow \beta_1 m + (1-\beta_1) g`,
    :math:`v \leftarrow \beta_2 v + (1-\beta_2) g^2`, and the parameter moves by
    :math:`-\delta` with :math:`\delta = \text{lr}\, \hat m / (\sqrt{\hat v} + \epsilon)`,
    :math:`\hat m = m / (1 - \beta_1^t)`, :math:`\hat v = v / (1 - \beta_2^t)`. ``steps`` is
    :math:`t` counted *with* this step, per entry or shared (it broadcasts). The caller commits
    the moments, with ``torch.where`` where only some entries take the step.
    """
    beta1, beta2 = betas
    exp_avg = beta1 * exp_avg + (1.0 - beta1) * grad
    exp_avg_sq = beta2 * exp_avg_sq + (1.0 - beta2) * grad.square()
    t = steps.to(grad.dtype)
    m_hat = exp_avg / (1.0 - beta1**t).clamp_min(1e-38)
    v_hat = exp_avg_sq / (1.0 - beta2**t).clamp_min(1e-38)
    return lr * m_hat / (v_hat.sqrt() + eps), exp_avg, exp_avg_sq


MASK32 = 0xFFFFFFFF
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
    return (p_hi >> 16) + (mid >> 32), mid & MASK32


def philox4x32(
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
            k0 = (k0 + _PHILOX_W0) & MASK32
            k1 = (k1 + _PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(c0, _PHILOX_M0)
        hi1, lo1 = _mulhilo32(c2, _PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def standard_normal(seed: Tensor, step: Tensor, task: Tensor) -> Tensor:
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
    words = philox4x32((step & MASK32, step >> 32, task, zero), (seed & MASK32, seed >> 32))
    u1, u2 = (((w >> 9).to(torch.float32) + 0.5) * 2.0**-23 for w in words[:2])
    return torch.sqrt(-2.0 * torch.log(u1)) * torch.cos((2.0 * math.pi) * u2)
