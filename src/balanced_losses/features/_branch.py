"""The autograd node every feature-level method shares, and their base class."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from balanced_losses._autograd import is_measuring
from balanced_losses._base import Weighting

__all__ = ["FeatureWeighting", "flatten"]


def flatten(feats: Any) -> tuple[list[Tensor], Callable[[list[Tensor]], Any]]:
    """Split ``feats`` (a Tensor, a tuple/list or a mapping of Tensors) into leaves, rebuild."""
    if isinstance(feats, Tensor):
        return [feats], lambda leaves: leaves[0]
    if isinstance(feats, Mapping):
        keys = list(feats)
        leaves = [feats[key] for key in keys]
        rebuild: Callable[[list[Tensor]], Any] = lambda ts: dict(zip(keys, ts, strict=True))  # noqa: E731
    elif isinstance(feats, (tuple, list)):
        leaves = list(feats)
        kind = type(feats)
        # A namedtuple takes its fields positionally.
        named = hasattr(feats, "_fields")
        rebuild = lambda ts: kind(*ts) if named else kind(ts)  # noqa: E731
    else:
        raise TypeError(
            f"`feats` must be a Tensor, a tuple/list or a dict of Tensors, got {type(feats)}"
        )
    for i, leaf in enumerate(leaves):
        if not isinstance(leaf, Tensor):
            raise TypeError(f"every element of `feats` must be a Tensor, got {type(leaf)} at {i}")
    return leaves, rebuild


def per_task_dtype(per_task: Sequence[Sequence[Tensor | None]], j: int) -> torch.dtype:
    """The dtype of shared tensor ``j``'s gradients (that of the first task that has one)."""
    return next(task[j].dtype for task in per_task if task[j] is not None)  # type: ignore[union-attr]


class _Branch(torch.autograd.Function):
    """Identity from M shared tensors to K*M task views; combines all K gradients in backward.

    One node receives every task's gradient at once, so whatever a method measures across
    tasks (norms, the Gramian) is available together: no per-task backward, no ``retain_graph``.
    """

    @staticmethod
    def forward(ctx: Any, owner: FeatureWeighting, num_tasks: int, *tensors: Tensor) -> Any:
        ctx.owner = owner
        ctx.num_inputs = len(tensors)
        # A view whose task used no loss arrives as None instead of a zero tensor: we can tell
        # "no gradient" from "zero gradient" and skip the arithmetic.
        ctx.set_materialize_grads(False)
        # Aliases, not copies: the forward pass costs no memory.
        return tuple(t.view_as(t) for _ in range(num_tasks) for t in tensors)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor | None) -> Any:
        merged = ctx.owner._combine_gradients(grads, ctx.num_inputs)
        return (None, None, *merged)


class FeatureWeighting(Weighting):
    r"""Base of the feature-level methods: per-task views of the shared features.

    :meth:`branch` returns one view of the shared features per task; the heads take their
    task's view. In the backward pass one autograd node receives every task's gradient at the
    views, and a subclass turns them into one coefficient per task (:meth:`_coefficients`); the
    trunk receives :math:`\sum_k c_k g_k`. :meth:`forward` returns the plain sum of the losses:
    the method acts in backward.

    Two mistakes would leave such a method a plain sum without a word, so both warn: a
    training step whose :meth:`forward` comes without a :meth:`branch` call since the previous
    one, and views that received no gradient at all before the next :meth:`branch` (the heads
    were fed the original features instead of ``views[task]``).
    """

    def __init__(
        self,
        tasks: Sequence[str],
        *,
        allow_missing: bool = False,
        check_inputs: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(
            tasks, allow_missing=allow_missing, check_inputs=check_inputs, sync_dist=sync_dist
        )
        self._reset_python_state()
        #: The name warnings use for this method (a wrapper such as DBMTL sets its own).
        self._method_name = type(self).__name__

    def _reset_python_state(self) -> None:
        # Tasks given to the last forward(); None before any. A Python set: checked in backward
        # without touching a tensor.
        self._last_present: frozenset[str] | None = None
        # Whether branch() ran since the last forward(), and whether the views it returned have
        # met their backward yet: Python flags, so the checks cost no sync.
        self._branched = False
        self._awaiting_backward = False
        # The views of the last branch() call, until forward() (a Python tuple of tensors).
        self._outputs: tuple[Tensor, ...] = ()

    # ------------------------------------------------------------------------------ forward

    def branch(self, feats: Any) -> dict[str, Any]:
        """Return one view of ``feats`` per task: the identity forward, the balancing backward.

        Args:
            feats: The shared features: a Tensor, a tuple/list or a dict of Tensors. Tensors that
                are not floating point or do not require grad are passed through as they are.

        Returns:
            A dict task name -> a structure like ``feats``. In eval mode or under
            ``torch.no_grad()``, every task gets ``feats`` itself.
        """
        leaves, rebuild = flatten(feats)
        if not self._updating:
            return dict.fromkeys(self.tasks, feats)
        # Activation checkpointing calls branch again during the backward pass (recomputation):
        # that call is part of the step already counted, so it moves no flag.
        # (Asked in eager only: compiled code cannot query autograd's engine.)
        recomputing = not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1
        tracked = [i for i, t in enumerate(leaves) if t.is_floating_point() and t.requires_grad]
        if not tracked:
            # A frozen trunk: branch was called, there is just nothing to balance.
            self._branched = self._branched or not recomputing
            return dict.fromkeys(self.tasks, feats)
        if recomputing:
            outputs = _Branch.apply(self, len(self.tasks), *(leaves[i] for i in tracked))  # type: ignore[no-untyped-call]
            return self._views(leaves, rebuild, tracked, outputs)
        if self._awaiting_backward:
            warnings.warn(
                f"{self._method_name}: the views returned by the previous `branch` call received "
                "no gradient, so nothing was balanced in that step. Feed each head its task's "
                "view, `head(views[task])`, not the original features (ignore this if that step "
                "had no backward pass on purpose)",
                UserWarning,
                stacklevel=2,
            )
        self._branched = True
        # Compiled code cannot carry this flag into the traced backward: checked in eager only.
        self._awaiting_backward = not torch.compiler.is_compiling()
        outputs = _Branch.apply(self, len(self.tasks), *(leaves[i] for i in tracked))  # type: ignore[no-untyped-call]
        self._outputs = outputs
        return self._views(leaves, rebuild, tracked, outputs)

    def _views(
        self,
        leaves: list[Tensor],
        rebuild: Callable[[list[Tensor]], Any],
        tracked: list[int],
        outputs: Sequence[Tensor],
    ) -> dict[str, Any]:
        m = len(tracked)
        views: dict[str, Any] = {}
        for task_index, task in enumerate(self.tasks):
            task_leaves = list(leaves)
            for j, i in enumerate(tracked):
                task_leaves[i] = outputs[task_index * m + j]
            views[task] = rebuild(task_leaves)
        return views

    def forward(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        """Return the plain sum of the present losses; the balancing happens in backward."""
        values, _ = self._stack(losses)
        self._last_present = frozenset(name for name in self.tasks if losses.get(name) is not None)
        if self._updating and not self._branched:
            warnings.warn(
                f"{self._method_name}: `branch` was not called in this training step, so its "
                "total is a plain sum of the losses and nothing is balanced. Route the shared "
                "features through `views = weighting.branch(feats)` and feed `views[task]` to "
                "each task's head",
                UserWarning,
                stacklevel=2,
            )
        self._branched = False
        total = values.sum()
        outputs, self._outputs = self._outputs, ()
        if not self._last_present and outputs and self._updating:
            # No task has a loss in this batch. The views still join the total (times zero), so
            # the branch node runs in backward as on every other rank: under DDP its collective
            # must not be skipped on one rank while the others wait in it.
            total = total + sum(o.sum() for o in outputs) * 0.0
        return total

    # ----------------------------------------------------------------------------- backward

    def _coefficients(self, per_task: list[Sequence[Tensor | None]], got: list[bool]) -> Tensor:
        """The coefficient of each task's gradient, shape ``(K,)``; may update statistics.

        Args:
            per_task: Task k's gradients at the views, one per shared tensor (None: no
                gradient reached that view).
            got: Whether task k sent any gradient.
        """
        raise NotImplementedError

    def _current_coefficients(self) -> Tensor:
        """The coefficients the current statistics give, without measuring or updating."""
        raise NotImplementedError

    def _combine_gradients(
        self, grads: Sequence[Tensor | None], num_inputs: int
    ) -> list[Tensor | None]:
        """Turn the K tasks' gradients at the views into one gradient per shared tensor."""
        k, m = len(self.tasks), num_inputs
        per_task = [grads[i * m : (i + 1) * m] for i in range(k)]
        if is_measuring():
            # A diagnostic's autograd.grad (one task at a time): show what each task sends
            # with the current coefficients, and leave statistics and logs alone.
            with torch.no_grad():
                scale = self._current_coefficients()
        else:
            if not torch.compiler.is_compiling():
                self._awaiting_backward = False
            got = [any(g is not None for g in task_grads) for task_grads in per_task]
            expected = self._last_present
            for task, has_grad in zip(self.tasks, got, strict=True):
                if not has_grad and (expected is None or task in expected):
                    warnings.warn(
                        f"task `{task}`'s view received no gradient: no loss used it, or its "
                        "loss does not depend on it",
                        UserWarning,
                        stacklevel=2,
                    )
            scale = self._coefficients(per_task, got)
        merged: list[Tensor | None] = []
        for j in range(m):
            total: Tensor | None = None
            dtype: torch.dtype | None = None
            for i in range(k):
                g = per_task[i][j]
                if g is None:
                    continue
                # At least float32: a multiplier above 65504 (a tiny task scaled to a large
                # one) would be inf in fp16 and spoil every later step.
                dtype = torch.promote_types(g.dtype, torch.float32)
                factor = scale[i].to(device=g.device, dtype=dtype)
                # In place after the first task: one feature-sized buffer, as a plain sum's
                # gradient accumulation needs, instead of one temporary per task.
                total = g.to(dtype) * factor if total is None else total.addcmul_(g, factor)
            merged.append(None if total is None else total.to(per_task_dtype(per_task, j)))
        return merged
