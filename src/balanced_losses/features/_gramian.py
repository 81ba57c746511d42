"""GramianWeighting: any rule of the task gradients' Gramian, in the one backward pass."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from balanced_losses import distributed
from balanced_losses._checks import check_momentum
from balanced_losses._numerics import debiased, ema_step, norm_scales, wide_dtype
from balanced_losses.features._branch import FeatureWeighting

__all__ = ["GramianWeighting", "gramian"]


def gramian(per_task: Sequence[Sequence[Tensor | None]]) -> Tensor:
    r"""The ``(K, K)`` Gramian :math:`G = J J^\top` of the tasks' gradients, summed in float64.

    Row :math:`k` of :math:`J` is task :math:`k`'s gradient at every shared tensor, flattened
    (a None entry counts as zero). Each shared tensor is read in chunks of :math:`n / K`
    elements (:math:`n` its size): the stacked ``(K, n / K)`` chunk is one feature-sized
    buffer, and its product :math:`C C^\top` runs as one matmul in the gradients' precision
    (at least float32). Before it each row is divided by a power of two near its largest
    magnitude, so no product overflows whatever GradScaler's scale (any finite gradient); the
    products are scaled back and summed in float64 (float32 on MPS, which has no float64).
    """
    k = len(per_task)
    num_inputs = len(per_task[0]) if per_task else 0
    ref = next(g for task in per_task for g in task if g is not None)
    wide = wide_dtype(ref.device)
    total = torch.zeros(k, k, dtype=wide, device=ref.device)
    for j in range(num_inputs):
        grads = [task[j] for task in per_task]
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present:
            continue
        flat = [grads[i].reshape(-1) for i in present]  # type: ignore[union-attr]
        n = flat[0].numel()
        chunk = max(1, -(-n // k))
        block = torch.zeros(len(present), len(present), dtype=wide, device=ref.device)
        for start in range(0, n, chunk):
            rows = torch.stack([f[start : start + chunk] for f in flat])
            rows = rows.to(torch.promote_types(rows.dtype, torch.float32))
            # Per row, a power of two near its largest magnitude: dividing by it is exact, and
            # a non-finite row (an AMP overflow) spoils its own row and column only.
            peak = rows.abs().amax(dim=1).clamp_min(torch.finfo(rows.dtype).tiny)
            scale = torch.exp2(torch.ceil(torch.log2(peak)))
            rows.div_(scale[:, None])
            outer = scale.to(wide)[:, None] * scale.to(wide)[None, :]
            block += (rows @ rows.T).to(wide) * outer
        if len(present) == k:
            total += block
        else:
            # Tasks without a gradient at this tensor keep zero rows: Python indices, no sync.
            for a, i in enumerate(present):
                for b, i2 in enumerate(present):
                    total[i, i2] += block[a, b]
    return total


class GramianWeighting(FeatureWeighting):
    r"""Any rule of the Gramian, applied to each task's gradient at the shared features.

    In the one backward pass the :math:`K` tasks' gradients at the shared features are the
    rows of :math:`J`; the trunk receives :math:`J^\top c` for weights :math:`c = r(G)`
    computed by ``rule`` :math:`r` from the :math:`K \times K` Gramian :math:`G = J J^\top`
    alone (summed in float64, see :func:`gramian`). Any function of the Gramian works: those of
    :mod:`balanced_losses.aggregation` (UPGrad, MGDA, CAGrad, ...; the named classes such as
    :class:`~balanced_losses.UPGrad` are this class with their rule) or your own. The forward
    total is the plain sum of the losses; route the shared features through :meth:`branch`, or
    :meth:`attach` the method to the model.

    **The rule** is called in backward, under ``torch.no_grad()``, once per training step, with
    the Gramian of the present tasks in float64 (float32 on MPS), ``(K', K')``; it returns their
    weights, ``(K',)``. It should not synchronize with the host (no ``.item()``) if the step is
    to stay asynchronous, and must be deterministic across ranks under DDP. A rule with state
    of its own (a random stream, as PCGrad's) subclasses this class and overrides
    :meth:`weights_from_gramian`.

    **Norm balancing first** (``balance_norms=True``): each task's gradient is first scaled to
    the mean of the tasks' EMA gradient norms, as :class:`~balanced_losses.GradientBalancer`
    does (:math:`s_k = T / \hat n_k`), and the rule runs on the scaled gradients:
    :math:`c = s \odot r(S G S)`. Magnitudes are then set by the measured norms and directions
    by the rule.

    **Tasks without a gradient** (absent labels under ``allow_missing``) are dropped from the
    problem: the weights are those of the present tasks alone. Under ``torch.compile`` the
    compiled backward cannot tell an absent task from a zero gradient, so it enters as a zero
    row: IMTL-G, Nash-MTL, FairGrad and PCGrad give it no weight (the same result), while MGDA
    (whose minimum-norm point a zero row is), CAGrad, UPGrad and Aligned-MTL solve a different
    problem on such a step. With those, compile only where every task is present in every batch.

    A task whose gradient is not finite (an AMP overflow step) leaves the statistics untouched
    and its row is zeroed (coefficient 0); the trunk's gradient is non-finite because
    that task's gradient is, as in a plain sum, so GradScaler skips the step.

    **Distributed.** With ``sync_dist`` and a multi-rank process group, the Gramian is summed
    over ranks (the batch is split across ranks, so the cross-rank blocks of :math:`J J^\top`
    are zero) and divided by the squared world size, DDP averaging the gradients: every rank
    computes the same weights, those of one process on the concatenated batch.

    Logging: :attr:`last_weights` holds the weights :math:`c_k` (your factors included),
    :attr:`grad_norms` the measured :math:`\lVert g_k \rVert` and :attr:`cosines` the cosine
    similarities of the last step's gradients (``(K, K)``, 0 where a norm is 0).

    Args:
        tasks: Task names, in order.
        rule: The weights of the present tasks from their Gramian, ``(K', K') -> (K',)``.
        balance_norms: First scale each task's gradient to the mean of the tasks' EMA
            gradient norms, as :class:`~balanced_losses.GradientBalancer` does.
        momentum: EMA momentum of the norm statistics, with ``balance_norms``.
        weights: Your fixed factor per task (default 1), applied after the method's
            balancing: see :class:`~balanced_losses.Weighting`.
        allow_missing: Accept loss mappings without some tasks; those are dropped from the
            problem for that step.
        sync_dist: Sum the Gramian over ranks under ``torch.distributed``.

    Example:
        Each task's gradient scaled to norm 1 before the sum, :math:`c_k = 1 / \lVert g_k
        \rVert`, a rule written in one line:

        >>> import torch
        >>> def unit_norms(gramian):
        ...     return torch.diagonal(gramian).clamp_min(1e-30).rsqrt()
        >>> method = GramianWeighting(["a", "b"], unit_norms)
        >>> trunk = torch.nn.Linear(3, 4)
        >>> head_a, head_b = torch.nn.Linear(4, 2), torch.nn.Linear(4, 105)
        >>> views = method.branch(trunk(torch.randn(8, 3)))
        >>> loss_a = head_a(views["a"]).square().mean()
        >>> loss_b = head_b(views["b"]).square().sum()
        >>> method({"a": loss_a, "b": loss_b}).backward()
        >>> sent = method.last_weights * method.grad_norms  # what each task sent the trunk
        >>> torch.allclose(sent, torch.ones(2))
        True
    """

    _loss_domain = None

    ema: Tensor
    count: Tensor
    grad_norms: Tensor
    cosines: Tensor

    #: Whether :meth:`extra_repr` names the rule (the named classes are their rule).
    _shows_rule: bool = True

    def __init__(
        self,
        tasks: Sequence[str],
        rule: Callable[[Tensor], Tensor],
        *,
        balance_norms: bool = False,
        momentum: float = 0.9,
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(tasks, weights=weights, allow_missing=allow_missing, sync_dist=sync_dist)
        if not callable(rule):
            raise TypeError(
                "`rule` must be a function from the (K, K) Gramian to K weights, got "
                f"{type(rule).__name__} {rule!r}"
            )
        #: The rule: Gramian of the present tasks, ``(K', K')``, to their weights, ``(K',)``.
        self.rule = rule
        self.balance_norms = bool(balance_norms)
        # Norm balancing makes the method invariant to a constant factor of a loss.
        self._cancels_factors = self._cancels_factors or self.balance_norms
        self.momentum = check_momentum(momentum)
        k = len(self.tasks)
        if self.balance_norms:
            # The norm statistics exist only where they are used: a plain aggregator's
            # checkpoint holds no tensors.
            self._add_state("ema", torch.zeros(k))
            self._add_state("count", torch.zeros(k, dtype=torch.long))
        self._add_state("grad_norms", torch.zeros(k), kind="output")
        self._add_state("cosines", torch.zeros(k, k), kind="output")

    def weights_from_gramian(self, gramian: Tensor) -> Tensor:
        """The weights for a ``(K', K')`` Gramian of the present tasks: ``rule(gramian)``."""
        weights: Tensor = self.rule(gramian)
        k = gramian.shape[0]
        if not isinstance(weights, Tensor) or tuple(weights.shape) != (k,):
            shown = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights)
            raise ValueError(
                f"`rule` must return one weight per task, a tensor of shape ({k},) for a "
                f"({k}, {k}) Gramian, got {shown}"
            )
        return weights

    def _advance(self) -> None:
        """Move any per-step state (a random stream's counter) after a training backward."""

    @property
    def running_norm(self) -> Tensor:
        r"""Bias-corrected EMA :math:`\hat n_k` of each task's gradient norm, NaN where unseen.

        Raises:
            AttributeError: Without ``balance_norms``, which keeps no norm statistics.
        """
        if not self.balance_norms:
            raise AttributeError("`running_norm` exists only with `balance_norms=True`")
        return debiased(self.ema, self.count, self.momentum)

    def _reset_python_state(self) -> None:
        super()._reset_python_state()
        # Whether a training backward has set `last_weights` (a Python flag: no sync).
        self._measured = False

    def _current_weights(self) -> Tensor:
        # A diagnostic measures one task at a time, which cannot reproduce the joint weights:
        # it shows the last training step's coefficients, or each gradient as it is before any.
        return self.last_weights if self._measured else torch.ones_like(self.last_weights)

    def _step_weights(self, per_task: list[Sequence[Tensor | None]], got: list[bool]) -> Tensor:
        k = len(self.tasks)
        device, dtype = self.grad_norms.device, self.grad_norms.dtype
        if not torch.compiler.is_compiling():
            self._measured = True
        if self.sync_dist and distributed.is_distributed():
            # Another rank may have the labels this one lacks, and every rank must solve the
            # same problem: keep all tasks (one absent everywhere is a zero row of the sum).
            got = [True] * k
        with torch.no_grad():
            gram = gramian(per_task)
            if self.sync_dist:
                gram = distributed.mean_gramian(gram)
            diag = torch.diagonal(gram)
            # A non-finite gradient has a non-finite squared norm; its NaN row and column are
            # zeroed below, and a finite row's products with the other finite rows are finite.
            finite = torch.isfinite(diag)
            both = finite[:, None] & finite[None, :]
            gram = torch.where(both, gram, torch.zeros_like(gram))
            norms = torch.diagonal(gram).clamp_min(0).sqrt()
            inv = torch.where(norms > 0, 1.0 / norms, torch.zeros_like(norms))
            self.cosines.copy_((gram * inv[:, None] * inv[None, :]).to(dtype))
            self.grad_norms.copy_(norms.to(dtype))
            measured = norms.to(device=device, dtype=dtype)
            valid = finite.to(device) & (measured > 0)
            if self.balance_norms:
                ema, count = ema_step(self.ema, self.count, measured, valid, self.momentum)
                self.ema.copy_(ema)
                self.count.copy_(count)
                # Only rows that take part: an absent task's scale may be huge (a tiny EMA
                # against a large target) and must not meet its zero row (inf * 0 = NaN).
                took_part = finite.clone()
                for i in range(k):
                    if not got[i]:
                        took_part[i] = False  # a fill with a Python index: no host-device copy
                # GradientBalancer's multipliers with target "mean": T / n_k, 1 where unseen.
                norm_scale = norm_scales(self.running_norm, self.count, "mean", 1e-12)
                scale = torch.where(took_part, norm_scale.to(gram), 0.0)
                gram = gram * scale[:, None] * scale[None, :]
            else:
                scale = torch.ones(k, dtype=gram.dtype, device=gram.device)
            # Absent tasks are known in Python: solve the problem of the present ones only.
            present = [i for i in range(k) if got[i]]
            if len(present) == k:
                weights = self.weights_from_gramian(gram)
            else:
                sub = torch.stack([torch.stack([gram[i, j] for j in present]) for i in present])
                solved = self.weights_from_gramian(sub) if present else sub.new_zeros(0)
                zero = gram.new_zeros(())
                parts = dict(zip(present, solved.unbind(0), strict=True))
                weights = torch.stack([parts.get(i, zero) for i in range(k)])
            # Computed in float64; a coefficient beyond the weights' dtype (a gradient of norm
            # ~1e-30 projected against one of ~1e28) is clamped to its range: finite weights.
            limit = torch.finfo(dtype).max
            coefficients = (scale * weights.to(scale.dtype)).clamp(-limit, limit)
            coefficients = coefficients.to(device=device, dtype=dtype)
            coefficients = torch.where(finite.to(device), coefficients, 0.0)
            self._record(coefficients, self._all_present.to(device))
            self._advance()
        return coefficients

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        shown = f"tasks={list(self.tasks)}"
        if self._shows_rule:
            shown += f", rule={getattr(self.rule, '__name__', repr(self.rule))}"
        if self.balance_norms:
            shown += f", balance_norms=True, momentum={self.momentum}"
        return shown
