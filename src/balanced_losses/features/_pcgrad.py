"""PCGrad (Yu et al. 2020), "gradient surgery", as weights over the task gradients."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from balanced_losses._checks import check_seed
from balanced_losses._numerics import MASK32, philox4x32
from balanced_losses.features._eigh import at_least_float32, check_gramian
from balanced_losses.features._gramian import GramianWeighting

__all__ = ["PCGrad", "pcgrad_orders", "pcgrad_weights"]

# Counter word 3 of the Philox stream: "PCGR" in ASCII. RLW's draws use word 3 = 0, so the
# same seed and step give PCGrad orders independent of RLW's weights.
_PCGRAD_STREAM = 0x50434752


def pcgrad_orders(
    num_tasks: int, seed: Tensor, step: Tensor, device: torch.device | str | None = None
) -> Tensor:
    r"""The random orders in which PCGrad projects each task, from a counter-based stream.

    Row :math:`i` is a uniformly random permutation of :math:`0, \dots, K - 1`, a pure function
    of ``(seed, step, i)``: entry :math:`(i, j)` gets the 63-bit key made of the first two words
    of Philox4x32-10 (Salmon et al. 2011) at counter ``(step mod 2**32, step // 2**32,
    i * K + j, "PCGR")`` under the key ``(seed mod 2**32, seed // 2**32)``, and each row is the
    stable argsort of its keys. No ``torch.Generator``: no host-device copy, traceable by
    ``torch.compile(fullgraph=True)``, and torch's global RNG is neither used nor advanced. The
    same ``seed`` and ``step`` give the same orders on every device.

    Args:
        num_tasks: :math:`K`, a positive integer.
        seed: Key of the stream, an int64 tensor in ``[0, 2**63)`` (shape ``()``).
        step: Position in the stream (e.g. the training step), an int64 tensor in
            ``[0, 2**63)`` (shape ``()``; ``seed`` and ``step`` broadcast, so a step of shape
            ``(S, 1, 1)`` gives ``S`` sets of orders, ``(S, K, K)``).
        device: Where to build the orders; ``None`` is the default device.

    Returns:
        ``(..., K, K)`` int64: row ``i`` is the order of task ``i``'s projections (its own index
        included; :func:`pcgrad_weights` skips it).

    Example:
        >>> import torch
        >>> orders = pcgrad_orders(3, seed=torch.tensor(0), step=torch.tensor(7))
        >>> orders.sort(dim=1).values  # every row a permutation of the tasks
        tensor([[0, 1, 2],
                [0, 1, 2],
                [0, 1, 2]])

    References:
        Salmon, Moraes, Dror, Shaw. Parallel Random Numbers: As Easy as 1, 2, 3. SC 2011.
    """
    if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"`num_tasks` must be a positive integer, got {num_tasks!r}")
    for name, value in (("seed", seed), ("step", step)):
        if not isinstance(value, Tensor) or value.dtype != torch.int64:
            raise ValueError(f"`{name}` must be an int64 tensor, got {value!r}")
    k = num_tasks
    index = torch.arange(k * k, device=device).view(k, k)
    seed = seed.to(index.device)
    step = step.to(index.device)
    zero = torch.zeros_like(index)
    words = philox4x32(
        (zero + (step & MASK32), zero + (step >> 32), index, zero + _PCGRAD_STREAM),
        (seed & MASK32, seed >> 32),
    )
    # 32 + 31 random bits, non-negative in int64: ties have probability about K^2 / 2^64, and a
    # stable sort still breaks them into a permutation.
    keys = (words[0] << 31) | (words[1] >> 1)
    return torch.argsort(keys, dim=-1, stable=True)


def pcgrad_weights(gramian: Tensor, orders: Tensor) -> Tensor:
    r"""PCGrad weights: the aggregated gradient :math:`\sum_i g_i^{PC}` as ``w @ J``.

    Algorithm 1 of Yu et al. 2020: each task's gradient starts as :math:`g_i^{PC} = g_i` and,
    for :math:`j` running over the other tasks in a random order, loses its component along
    every :math:`g_j` it conflicts with,

    .. math::
        g_i^{PC} \leftarrow g_i^{PC}
            - \frac{\min(0,\ g_i^{PC} \cdot g_j)}{\lVert g_j \rVert^2}\, g_j,\qquad
        d = \sum_i g_i^{PC}.

    Every :math:`g_i^{PC}` is a combination :math:`c_i^\top J` of the rows of :math:`J`, so the
    method runs on the Gramian alone: :math:`g_i^{PC} \cdot g_j = (G c_i)_j` and the projection
    subtracts :math:`(G c_i)_j / G_{jj}` from :math:`c_{ij}`. The K tasks advance together, one
    position of their orders per batched step (``K`` steps of :math:`O(K^2)`); the conflict test
    is a ``torch.where``, so nothing waits on the device. The weights are :math:`w = \sum_i c_i`.

    A zero row never conflicts (its products are exactly 0) and is never projected onto. Scaling
    :math:`G` by :math:`s > 0` leaves the weights unchanged. Any finite PSD ``gramian`` gives
    finite weights; NaN in ``gramian`` may give NaN (the caller guards).

    Args:
        gramian: :math:`G = J J^\top`, ``(K, K)``, symmetric PSD.
        orders: ``(K, K)`` integer tensor whose row ``i`` is a permutation of ``0..K-1``: the
            order of task ``i``'s projections (entry ``i`` is skipped), e.g. from
            :func:`pcgrad_orders`. Not checked (that would synchronize).

    Returns:
        ``(K,)`` weights in the Gramian's dtype (computed in at least float32).

    Example:
        >>> import torch
        >>> jac = torch.tensor([[1.0, 0.0], [-0.5, 2.0]], dtype=torch.float64)
        >>> orders = pcgrad_orders(2, torch.tensor(0), torch.tensor(0))
        >>> pcgrad_weights(jac @ jac.T, orders)
        tensor([1.5000, 1.1176], dtype=torch.float64)

    References:
        Yu, Kumar, Gupta, Levine, Hausman, Finn. Gradient Surgery for Multi-Task Learning.
        NeurIPS 2020.
    """
    k = check_gramian(gramian)
    if orders.shape != (k, k) or orders.is_floating_point() or orders.is_complex():
        raise ValueError(
            f"`orders` must be a ({k}, {k}) integer tensor, got shape {tuple(orders.shape)} "
            f"and dtype {orders.dtype}"
        )
    g = gramian.to(at_least_float32(gramian))
    orders = orders.to(device=g.device, dtype=torch.int64)
    eye = torch.eye(k, dtype=g.dtype, device=g.device)
    diag = g.diagonal()
    # A zero row has G_jj = 0 but also (G c)_j = 0, so it never passes the test below; the
    # divisor 1 only keeps the unused branch finite.
    safe_diag = torch.where(diag > 0, diag, torch.ones_like(diag))
    coef = eye
    tasks = torch.arange(k, device=g.device)
    for position in range(k):
        j = orders[:, position]
        # (G c_i)_j for every task i at once: row j of G against c_i.
        inner = (g[j] * coef).sum(dim=1)
        # Algorithm 1 of Yu et al. 2020: project only on conflict, g_i^PC . g_j < 0.
        conflict = (inner < 0) & (j != tasks)
        step = torch.where(conflict, inner / safe_diag[j], torch.zeros_like(inner))
        coef = coef - step[:, None] * eye[j]
    return coef.sum(dim=0).to(gramian.dtype)


class PCGrad(GramianWeighting):
    r"""PCGrad: project each task's gradient off the gradients it conflicts with, then sum.

    .. math::
        g_i \leftarrow g_i - \frac{\min(g_i^\top g_j, 0)}{\lVert g_j \rVert^2}\, g_j
        \quad\text{for } j \text{ in a random order},\qquad d = \textstyle\sum_i g_i

    (Yu et al. 2020, "gradient surgery"). The random orders come from a counter-based stream
    (Philox, as :class:`~balanced_losses.RLW`) at ``(seed, num_steps)``: reproducible, the same on
    every rank, and resumed exactly from ``state_dict``.

    It is :class:`~balanced_losses.GramianWeighting` with the rule
    :func:`~balanced_losses.aggregation.pcgrad_weights`, and acts on each task's gradient at the
    shared features inside the one backward pass (route the features through :meth:`branch`); the
    forward total is the plain sum of the losses. The docs page "When task gradients conflict" says
    what it costs and when the representation-level version differs from the parameter-level one.

    Args:
        tasks: Task names, in order.
        seed: Seed of the random orders (drawn from torch's global RNG when None).
        balance_norms: First scale each task's gradient to the mean of the tasks' EMA
            gradient norms, as :class:`~balanced_losses.GradientBalancer` does.
        momentum: EMA momentum of the norm statistics, with ``balance_norms``.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept loss mappings without some tasks; those are dropped from the
            problem for that step.
        sync_dist: Sum the Gramian over ranks under ``torch.distributed``.

    Example:
        >>> import torch
        >>> trunk = torch.nn.Linear(3, 4)
        >>> head_a, head_b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 105)
        >>> pcgrad = PCGrad(["a", "b"], seed=0)
        >>> views = pcgrad.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().mean()
        >>> pcgrad({"a": loss_a, "b": loss_b}).backward()  # the plain sum; combined in backward
        >>> pcgrad.last_weights.shape
        torch.Size([2])

    References:
        Yu, Kumar, Gupta, Levine, Hausman, Finn. Gradient Surgery for Multi-Task Learning.
        NeurIPS 2020.
    """

    _shows_rule = False

    seed: Tensor
    num_steps: Tensor

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        seed: int | None = None,
        balance_norms: bool = False,
        momentum: float = 0.9,
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(
            tasks,
            self._rule,
            balance_norms=balance_norms,
            momentum=momentum,
            weights=weights,
            allow_missing=allow_missing,
            sync_dist=sync_dist,
        )
        seed = check_seed(seed)
        self._add_state("seed", torch.tensor(seed, dtype=torch.long), kind="config", task_axis=None)
        self._add_state("num_steps", torch.zeros((), dtype=torch.long), task_axis=None)

    def _rule(self, gramian: Tensor) -> Tensor:
        """PCGrad's weights for a ``(K, K)`` Gramian."""
        return pcgrad_weights(
            gramian, pcgrad_orders(gramian.shape[0], self.seed, self.num_steps, gramian.device)
        )

    def _advance(self) -> None:
        self.num_steps.add_(1)

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return super().extra_repr() + f", seed={int(self.seed)}"
