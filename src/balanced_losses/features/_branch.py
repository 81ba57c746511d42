"""The autograd node every feature-level method shares, and their base class."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from balanced_losses._autograd import is_measuring
from balanced_losses._base import Weighting
from balanced_losses._numerics import grad_shares
from balanced_losses.features._attach import (
    Attachment,
    ModuleRef,
    Upstream,
    keep_upstream,
    route_measured,
)

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
    views, and a subclass turns them into one weight per task (:meth:`_step_weights`); the
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
        self._reset_python_state()
        # Models this method is attached to (``attach``); Python references, never saved.
        self._attachments: list[Attachment] = []

    def __getstate__(self) -> dict[str, Any]:
        # A copy or a pickle of a weighting is not attached to the original's model (and must
        # not drag that model along).
        state = dict(self.__dict__)
        state["_attachments"] = []
        return state

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

    def attach(
        self,
        model: nn.Module,
        trunk: ModuleRef,
        heads: Mapping[str, ModuleRef | Sequence[ModuleRef]] | None = None,
    ) -> Attachment:
        """Balance at the shared features of ``model`` without changing its ``forward``.

        Hooks do what :meth:`branch` does by hand; the training loop stays as it was
        (``total = weighting(losses); total.backward()``). Two ways, both exact:

        - **Heads named** (``heads={task: head}``): after ``trunk`` runs in a training step, its
          output goes through :meth:`branch`, and each head's first positional input, which
          must be that output (or one of its tensors, for a trunk that returns a tuple such as
          a GRU's ``(output, h_n)``), is replaced by its task's view. No extra cost.
        - **Heads not named** (``heads=None``), for a forward that transforms the trunk's output
          before a head (pooling, slicing, a function): at the weighting's call, each task's
          gradient at the trunk's output is taken with ``torch.autograd.grad`` through that
          task's part of the graph only (its head and the operations after the trunk), and a
          hook on the output replaces the summed gradient of ``total.backward()`` with the
          balanced one. Cost: one extra backward pass through each head, none through the trunk.
          Every use of the trunk's output must belong to some task's loss.

        Works under DDP (attach to the module inside DDP), non-reentrant activation
        checkpointing of the trunk (``checkpoint(..., use_reentrant=False)``) and
        ``torch.compile`` (attach before compiling): with the heads named the whole step compiles
        with ``fullgraph=True``; without, the trunk's hook runs eagerly, one graph break (compile
        with the default ``fullgraph=False``). In eval mode or under ``torch.no_grad()`` nothing
        is routed.

        Args:
            model: The model holding ``trunk`` and the heads.
            trunk: The submodule whose output the heads take: its name in ``model`` (a dotted
                path, as in ``model.get_submodule``) or the module.
            heads: Task name to its head (a name or a module), or to several heads; None to
                measure each task's gradient instead (see above).

        Returns:
            An :class:`~balanced_losses.Attachment`; its ``remove()`` takes the hooks off, and
            ``with weighting.attach(...):`` removes them on exit.

        Raises:
            RuntimeError: In the forward pass, when a head's first input is not the trunk's
                output; the message names the head and what it received.

        Example:
            >>> import torch
            >>> from balanced_losses import GradientBalancer
            >>> class Net(torch.nn.Module):
            ...     def __init__(self):
            ...         super().__init__()
            ...         self.trunk = torch.nn.Linear(3, 8)
            ...         self.digit, self.parity = torch.nn.Linear(8, 10), torch.nn.Linear(8, 2)
            ...     def forward(self, x):
            ...         h = self.trunk(x)
            ...         return self.digit(h), self.parity(h)
            >>> net = Net()
            >>> balancer = GradientBalancer(["digit", "parity"])
            >>> hooks = balancer.attach(net, "trunk", {"digit": "digit", "parity": "parity"})
            >>> digit, parity = net(torch.randn(4, 3))
            >>> losses = {"digit": digit.square().mean(), "parity": parity.square().mean()}
            >>> balancer(losses).backward()
            >>> bool(balancer.grad_norms.gt(0).all())  # both gradients met at the trunk
            True
            >>> hooks.remove()
        """
        return Attachment(self, model, trunk, heads)

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
        measured = route_measured(self, values) if self._updating else False
        if measured is not False:
            self._branched = True
        if self._updating and not self._branched:
            warnings.warn(
                f"{self._method_name}: nothing reached the shared features in this training "
                "step, so no task's gradient there is balanced. Attach the method to the module "
                'whose output the heads share, `weighting.attach(model, "trunk")` (your '
                "model's forward stays as it is), or route that output through `views = "
                "weighting.branch(feats)` and feed `views[task]` to each task's head",
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
        if isinstance(measured, Upstream):
            total = keep_upstream(total, measured)
        # The heads have run: drop the features that `attach` held for the step.
        for attachment in self._attachments:
            attachment._release()
        return self._returned(total)

    # ----------------------------------------------------------------------------- backward

    def _step_weights(self, per_task: list[Sequence[Tensor | None]], got: list[bool]) -> Tensor:
        """The weight of each task's gradient in this backward, ``(K,)``; may update statistics.

        It records them (:meth:`_record`) for :attr:`last_weights`.

        Args:
            per_task: Task k's gradients at the views, one per shared tensor (None: no
                gradient reached that view).
            got: Whether task k sent any gradient.
        """
        raise NotImplementedError

    def _current_weights(self) -> Tensor:
        """The weights the current statistics give, without measuring or updating."""
        raise NotImplementedError

    def _logged_per_task(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        norms: Tensor | None = getattr(self, "grad_norms", None)
        if norms is None:
            return {}
        return {"grad_share": grad_shares(self.last_weights, norms, device, dtype)}

    def _combine_gradients(
        self, grads: Sequence[Tensor | None], num_inputs: int
    ) -> list[Tensor | None]:
        """Turn the K tasks' gradients at the views into one gradient per shared tensor."""
        k, m = len(self.tasks), num_inputs
        per_task = [grads[i * m : (i + 1) * m] for i in range(k)]
        if self._weighted:
            # The user's factors reached these gradients through the losses (Weighting._stack):
            # the method measures the gradients without them, and they stay in what is merged.
            # A task with factor 0 sends nothing and is not measured.
            per_task = [
                [None for _ in task_grads] if w == 0.0 else task_grads
                for task_grads, w in zip(per_task, self._weight_list, strict=True)
            ]
            measured: list[Sequence[Tensor | None]] = [
                [None if g is None else g / w for g in task_grads]
                if w not in (0.0, 1.0)
                else task_grads
                for task_grads, w in zip(per_task, self._weight_list, strict=True)
            ]
        else:
            measured = per_task
        if is_measuring():
            # A diagnostic's autograd.grad (one task at a time): show what each task sends
            # with the current coefficients, and leave statistics and logs alone.
            with torch.no_grad():
                weights = self._current_weights()
        else:
            if not torch.compiler.is_compiling():
                self._awaiting_backward = False
            got = [any(g is not None for g in task_grads) for task_grads in per_task]
            expected = self._last_present
            for task, has_grad, w in zip(self.tasks, got, self._weight_list, strict=True):
                if not has_grad and w != 0.0 and (expected is None or task in expected):
                    warnings.warn(
                        f"task `{task}`'s view received no gradient: no loss used it, or its "
                        "loss does not depend on it",
                        UserWarning,
                        stacklevel=2,
                    )
            weights = self._step_weights(measured, got)
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
                factor = weights[i].to(device=g.device, dtype=dtype)
                # In place after the first task: one feature-sized buffer, as a plain sum's
                # gradient accumulation needs, instead of one temporary per task.
                total = g.to(dtype) * factor if total is None else total.addcmul_(g, factor)
            merged.append(None if total is None else total.to(per_task_dtype(per_task, j)))
        return merged
