"""Route an unmodified model's head inputs through a feature-level method's views, with hooks.

With the heads not named, each task's gradient at the trunk's output is measured in the
weighting's forward instead (:func:`route_measured`).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from balanced_losses._autograd import is_measuring

__all__ = ["Attachment", "ModuleRef", "Upstream", "keep_upstream", "route_measured"]

ModuleRef = str | nn.Module


class _Branching(Protocol):
    """What an attachment needs of a feature-level method."""

    _attachments: list[Any]
    _last_present: frozenset[str] | None

    @property
    def tasks(self) -> tuple[str, ...]: ...

    @property
    def _updating(self) -> bool: ...

    def branch(self, feats: Any) -> dict[str, Any]: ...

    def _combine_gradients(
        self, grads: Sequence[Tensor | None], num_inputs: int
    ) -> list[Tensor | None]: ...


class Upstream:
    """The gradient that reached a measured step's total: what the caller scaled it by."""

    scale: Tensor | None = None


class _KeepUpstream(torch.autograd.Function):
    """Identity on the total; its backward keeps the gradient that reaches it.

    That gradient is whatever the caller scaled the total by: a GradScaler's scale, a
    gradient-accumulation divisor, any factor applied after the weighting's call.
    """

    @staticmethod
    def forward(ctx: Any, total: Tensor, upstream: Upstream) -> Tensor:
        ctx.upstream = upstream
        return total.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        ctx.upstream.scale = grad.detach()
        return grad, None


def keep_upstream(total: Tensor, upstream: Upstream) -> Tensor:
    """``total`` unchanged; its backward records in ``upstream`` the gradient reaching it."""
    kept: Tensor = _KeepUpstream.apply(total, upstream)  # type: ignore[no-untyped-call]
    return kept


def _replace_gradient(combined: Tensor, upstream: Upstream, grad: Tensor) -> Tensor | None:
    """Tensor hook of a measured attachment: the combined gradient replaces the summed one.

    The combination was measured from the losses themselves; the factor that reached the total
    in this backward (``upstream``, recorded before this hook runs) is applied to it.
    """
    # A diagnostic's autograd.grad sees each task's own gradient, unchanged.
    if is_measuring():
        return None
    scale = upstream.scale
    if scale is None:
        return combined
    # In at least float32: a GradScaler's 65536 is inf in float16.
    wide = torch.promote_types(combined.dtype, torch.float32)
    return (combined.to(wide) * scale.to(combined.device, wide)).to(combined.dtype)


def route_measured(weighting: _Branching, values: Tensor) -> Upstream | bool:
    """Balance at an attached trunk's output whose heads were not named.

    Each task's gradient at the trunk's output is taken here with ``autograd.grad`` (through
    its head only, not the trunk), combined as the backward node would, and a hook on the
    output replaces the summed gradient of the coming backward pass with the combination,
    times the factor that reaches the total in that pass (see :func:`keep_upstream`).

    Returns False without a measured attachment, True when there is nothing to measure, and
    the holder of that factor otherwise (the total must go through :func:`keep_upstream`).
    """
    leaves = next(
        (t for t in (a._tracked() for a in weighting._attachments if a.measures) if t is not None),
        None,
    )
    if leaves is None:
        return False
    if not leaves or not values.requires_grad:
        return True
    per_task: list[Tensor | None] = []
    for i, task in enumerate(weighting.tasks):
        if weighting._last_present is not None and task not in weighting._last_present:
            per_task.extend([None] * len(leaves))
            continue
        per_task.extend(
            torch.autograd.grad(values[i], leaves, retain_graph=True, allow_unused=True)
        )
    merged = weighting._combine_gradients(per_task, len(leaves))
    upstream = Upstream()
    for leaf, combined in zip(leaves, merged, strict=True):
        if combined is not None:
            leaf.register_hook(functools.partial(_replace_gradient, combined, upstream))
    return upstream


def _describe(value: Any) -> str:
    """A short description of what a head received, for error messages."""
    if isinstance(value, Tensor):
        return f"a Tensor of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        inner = ", ".join(_describe(v) for v in value[:4])
        more = ", ..." if len(value) > 4 else ""
        return f"a {type(value).__name__} ({inner}{more})"
    if isinstance(value, Mapping):
        return f"a {type(value).__name__} with keys {list(value)[:6]}"
    return f"a {type(value).__name__}"


def _resolve(model: nn.Module, ref: ModuleRef, role: str) -> tuple[str, nn.Module]:
    """Return ``(qualified name, module)`` for a submodule given by name or by object."""
    if isinstance(ref, str):
        try:
            return ref, model.get_submodule(ref)
        except AttributeError:
            names = [name for name, _ in model.named_modules() if name]
            shown = ", ".join(f"`{n}`" for n in names[:12]) + (", ..." if len(names) > 12 else "")
            raise ValueError(
                f"the model has no submodule `{ref}` (the {role}); its submodules are {shown}"
            ) from None
    if isinstance(ref, nn.Module):
        for name, module in model.named_modules():
            if module is ref:
                return name or type(model).__name__, module
        raise ValueError(
            f"the {role} {type(ref).__name__} is not a submodule of the model passed to `attach`"
        )
    raise TypeError(f"the {role} must be a submodule name or an nn.Module, got {type(ref)}")


class Attachment:
    """Hooks that a feature-level method's ``attach`` put on a model; :meth:`remove` takes them off.

    Returned by :meth:`~balanced_losses.GradientBalancer.attach` (and
    every feature-level method's ``attach``); not built directly. Also a context manager:
    ``with weighting.attach(model, ...):`` removes the hooks on exit.

    Example:
        >>> import torch
        >>> from balanced_losses import DBMTL
        >>> layers = {"trunk": (3, 8), "a": (8, 1), "b": (8, 4)}
        >>> model = torch.nn.ModuleDict({k: torch.nn.Linear(*io) for k, io in layers.items()})
        >>> hooks = DBMTL(["a", "b"]).attach(model, "trunk", {"a": "a", "b": "b"})
        >>> hooks
        Attachment(trunk='trunk', heads={'a': ['a'], 'b': ['b']}, attached)
        >>> hooks.remove()
        >>> hooks
        Attachment(trunk='trunk', heads={'a': ['a'], 'b': ['b']}, removed)
    """

    def __init__(
        self,
        weighting: _Branching,
        model: nn.Module,
        trunk: ModuleRef,
        heads: Mapping[str, ModuleRef | Sequence[ModuleRef]] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"`model` must be an nn.Module, got {type(model)}")
        self._weighting = weighting
        self.trunk_name, self._trunk = _resolve(model, trunk, "trunk")
        #: Task name -> qualified names of its heads (empty when the heads are not named).
        self.heads: dict[str, list[str]] = {}
        #: Whether each task's gradient is measured in the weighting's forward (no heads named)
        #: rather than routed through views in the heads' inputs.
        self.measures = heads is None
        # The trunk's last output, its tensors and each task's views, until the weighting's
        # forward consumes the step. Python references: no copy, no sync.
        self._output: Any = None
        self._leaves: list[Tensor] = []
        self._views: dict[str, Any] | None = None
        # Measuring needs the trunk's output itself on the losses' graph; inside a compiled
        # graph it is not (autograd sees the graph's outputs only), so that hook runs eagerly:
        # one graph break under torch.compile, none with the heads named.
        after_trunk = self._after_trunk
        if self.measures:
            reason = "attach without heads measures at the trunk's output: eager only"
            after_trunk = torch.compiler.disable(after_trunk, reason=reason)  # type: ignore[no-untyped-call]
        self._handles: list[RemovableHandle] = [self._trunk.register_forward_hook(after_trunk)]
        if heads is not None:
            self._hook_heads(model, heads)
        weighting._attachments.append(self)

    def _hook_heads(
        self, model: nn.Module, heads: Mapping[str, ModuleRef | Sequence[ModuleRef]]
    ) -> None:
        if not isinstance(heads, Mapping):
            raise TypeError(
                "`heads` must map each task name to its head (a submodule name or module), "
                f"got {type(heads)}"
            )
        tasks = self._weighting.tasks
        unknown = sorted(set(heads) - set(tasks))
        if unknown:
            raise KeyError(f"unknown task(s) {unknown} in `heads`; expected {list(tasks)}")
        missing = [task for task in tasks if task not in heads]
        if missing:
            raise ValueError(
                f"`heads` names no head for task(s) {missing}: every task's head must receive "
                "its view of the trunk's output"
            )
        resolved: list[tuple[str, str, nn.Module]] = []
        for task in tasks:
            refs = heads[task]
            refs_list = list(refs) if isinstance(refs, (list, tuple)) else [refs]
            if not refs_list:
                raise ValueError(f"`heads` gives no module for task `{task}`")
            for ref in refs_list:
                name, module = _resolve(model, ref, f"head of task `{task}`")  # type: ignore[arg-type]
                if module is self._trunk:
                    raise ValueError(
                        f"the head of task `{task}` is the trunk `{name}` itself; name the "
                        "module whose input is the trunk's output"
                    )
                resolved.append((task, name, module))
                self.heads.setdefault(task, []).append(name)
        for task, name, module in resolved:
            self._handles.append(
                module.register_forward_pre_hook(self._head_hook(task, name), with_kwargs=True)
            )

    # ---------------------------------------------------------------------------------- hooks

    def _after_trunk(self, module: nn.Module, args: Any, output: Any) -> None:
        # Activation checkpointing runs the trunk again inside the backward pass: that
        # recomputation belongs to a step already routed, and its heads are not run again.
        if not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1:
            return
        weighting = self._weighting
        if not weighting._updating:
            self._output, self._leaves, self._views = None, [], None
            return
        self._output = output
        self._leaves = _tensors(output)
        if not self.measures:
            self._views = weighting.branch(output)

    def _tracked(self) -> list[Tensor] | None:
        """The trunk output's tensors that the last training step can balance, or None.

        None when the trunk has not run in training since the weighting's last forward.
        """
        if self._output is None:
            return None
        return [t for t in self._leaves if t.is_floating_point() and t.requires_grad]

    def _head_hook(self, task: str, name: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if self._views is None:
                # Eval mode or no_grad, or a head run outside a training step: nothing to route.
                return None
            if not args:
                raise RuntimeError(
                    f"head `{name}` of task `{task}` was called without a positional input; "
                    "`attach` routes the first positional input, which must be the output of "
                    f"trunk `{self.trunk_name}`"
                )
            received = args[0]
            view = self._view_for(task, received)
            if view is None:
                raise RuntimeError(
                    f"head `{name}` of task `{task}` received {_describe(received)}, which is "
                    f"not the output of trunk `{self.trunk_name}` ({_describe(self._output)}) "
                    "nor one of its tensors. Named heads must take the trunk's output as it is: "
                    "leave out `heads` (attach then measures each task's gradient at the "
                    "trunk's output, whatever happens between), or name as `trunk` the module "
                    "whose output the heads take"
                )
            return (view, *args[1:]), kwargs

        return hook

    def _view_for(self, task: str, received: Any) -> Any:
        assert self._views is not None
        views = self._views[task]
        if received is self._output:
            return views
        for i, leaf in enumerate(self._leaves):
            if received is leaf:
                return _tensors(views)[i]
        return None

    # ------------------------------------------------------------------------------ control

    def _release(self) -> None:
        """Drop the references to the last step's features (the weighting's forward ran)."""
        self._output, self._leaves, self._views = None, [], None

    def remove(self) -> None:
        """Take the hooks off the model; the model then runs as before ``attach``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._release()
        if self in self._weighting._attachments:
            self._weighting._attachments.remove(self)

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self._handles else "removed"
        heads = "measured" if self.measures else self.heads
        return f"Attachment(trunk={self.trunk_name!r}, heads={heads}, {state})"


def _tensors(value: Any) -> list[Tensor]:
    """The tensors of a trunk output (a Tensor, a tuple/list or a mapping of them), in order."""
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [v for v in value.values() if isinstance(v, Tensor)]
    if isinstance(value, (tuple, list)):
        return [v for v in value if isinstance(v, Tensor)]
    return []
