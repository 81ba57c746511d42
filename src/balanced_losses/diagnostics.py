"""See each task's share of the gradient: per-task norms, pairwise cosines, reports, a monitor.

Call these *before* ``total.backward()`` (they use ``torch.autograd.grad`` with
``retain_graph=True``, so the graph survives them and no ``.grad`` attribute is touched). After
a plain ``backward()`` the graph is freed and they raise an error that says so; to measure
afterwards, call ``total.backward(retain_graph=True)``::

    losses = {"pointer": lp, "countdown": lc}
    print(gradient_report(losses, model.encoder))
    # task             norm    share  vs largest
    # pointer        0.4812   97.5 %          1x
    # countdown      0.0123    2.5 %     0.0256x
    # `countdown` receives 2.56 % of `pointer`'s gradient.

``params`` may be an ``nn.Module`` (its parameters that require grad), one tensor, or an
iterable of tensors: parameters, or intermediate activations such as the shared features (the
place where :class:`~balanced_losses.GradientBalancer` balances). A tensor that a task does
not use counts as a zero gradient for that task.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from balanced_losses._autograd import as_tensors, task_gradients
from balanced_losses._checks import check_loss, check_loss_mapping
from balanced_losses._numerics import gradient_norm

__all__ = [
    "GradientMonitor",
    "GradientReport",
    "gradient_cosines",
    "gradient_report",
    "task_gradient_norms",
]

Params = nn.Module | Tensor | Iterable[Tensor]


def _check_losses(losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
    # The same errors as the weightings' (Weighting._stack).
    check_loss_mapping(losses)
    if not losses:
        raise ValueError("`losses` must name at least one task, got an empty mapping")
    return {name: check_loss(name, loss) for name, loss in losses.items()}


# The start of autograd's message when a graph's saved tensors were freed by a backward pass.
_FREED_GRAPH = "Trying to backward through the graph a second time"


def _task_gradients(name: str, loss: Tensor, tensors: list[Tensor]) -> list[Tensor | None]:
    """``task_gradients``, with autograd's freed-graph error said in terms of the call."""
    try:
        return task_gradients(loss, tensors)
    except RuntimeError as err:
        if _FREED_GRAPH not in str(err):
            raise
        raise RuntimeError(
            f"cannot measure the gradient of task `{name}`: the graph of its loss was freed by a "
            "`backward()` (or `torch.autograd.grad`) call before this one. Call the diagnostics "
            "before `loss.backward()`, or pass `retain_graph=True` to that backward call."
        ) from err


def _flat_gradient(name: str, loss: Tensor, tensors: list[Tensor]) -> Tensor:
    """The gradient of ``loss`` over ``tensors`` as one float vector (zeros where unused)."""
    grads = _task_gradients(name, loss, tensors)
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    device = tensors[0].device
    parts = [
        torch.zeros(t.numel(), dtype=dtype, device=device)
        if g is None
        else g.reshape(-1).to(device=device, dtype=dtype)
        for g, t in zip(grads, tensors, strict=True)
    ]
    return torch.cat(parts)


def task_gradient_norms(losses: Mapping[str, Tensor], params: Params) -> dict[str, Tensor]:
    r"""The norm :math:`\lVert \nabla_\theta L_k \rVert_2` of each task's gradient over ``params``.

    Args:
        losses: Task name to scalar loss, whose graph has not been freed by a ``backward()``.
        params: An ``nn.Module``, a tensor or an iterable of tensors (see the module docstring).

    Returns:
        Task name to a detached 0-dim tensor (at least float32).

    Raises:
        RuntimeError: A loss's graph was freed by an earlier ``backward()``; the message names
            the task and says to measure before ``backward()`` or pass ``retain_graph=True``.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> norms = task_gradient_norms({"a": (3 * w).sum(), "b": w.square().sum()}, [w])
        >>> {k: round(v.item(), 4) for k, v in norms.items()}  # |(3, 3)|, |(2, 4)|
        {'a': 4.2426, 'b': 4.4721}
    """
    checked = _check_losses(losses)
    tensors = as_tensors(params)
    result = {}
    for name, loss in checked.items():
        norm = gradient_norm(_task_gradients(name, loss, tensors))
        if norm is None:
            norm = torch.zeros((), dtype=torch.float32, device=tensors[0].device)
        # A measurement for reading, not part of any graph.
        result[name] = norm.detach()
    return result


def gradient_cosines(losses: Mapping[str, Tensor], params: Params) -> dict[tuple[str, str], Tensor]:
    r"""Cosine :math:`\langle g_i, g_j\rangle / (\lVert g_i\rVert \lVert g_j\rVert)` for each pair.

    Negative values mean the tasks pull the shared parameters in conflicting directions. A pair
    involving a zero gradient has no direction: its cosine is NaN.

    Args:
        losses: Task name to scalar loss.
        params: An ``nn.Module``, a tensor or an iterable of tensors.

    Returns:
        ``(task_i, task_j)`` to a detached 0-dim tensor, for ``i < j`` in the mapping's order.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 0.0], requires_grad=True)
        >>> cos = gradient_cosines({"a": w.sum(), "b": w[0] - w[1]}, w)
        >>> round(cos[("a", "b")].item(), 4)  # (1, 1) against (1, -1)
        0.0
    """
    checked = _check_losses(losses)
    tensors = as_tensors(params)
    names = list(checked)
    # Flattened gradients of every task: K vectors of the size of params, at once.
    flat = torch.stack([_flat_gradient(name, checked[name], tensors) for name in names]).detach()
    gram = flat @ flat.T
    norms = gram.diagonal().sqrt()
    result = {}
    for i, first in enumerate(names):
        for j in range(i + 1, len(names)):
            denominator = norms[i] * norms[j]
            cosine = torch.where(denominator > 0, gram[i, j] / denominator, torch.nan)
            result[(first, names[j])] = cosine.clamp(-1.0, 1.0)
    return result


@dataclass(frozen=True)
class GradientReport:
    """Per-task gradient norms over a set of parameters, with shares and ratios, as floats.

    Attributes:
        norms: Task name to the norm of its gradient.
        shares: Task name to its norm divided by the sum of the norms (0 to 1).
        ratios: Task name to its norm divided by the largest norm (the largest task has 1).
        cosines: ``(task_i, task_j)`` to the cosine of their gradients (empty unless requested).
    """

    norms: dict[str, float]
    shares: dict[str, float]
    ratios: dict[str, float]
    cosines: dict[tuple[str, str], float] = field(default_factory=dict)

    @property
    def largest(self) -> str:
        """The task with the largest gradient norm."""
        return max(self.norms, key=lambda name: self.norms[name])

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        """Plain floats for a logger: ``grad_norm/<task>``, ``grad_share/<task>``, ...

        Keys are ``grad_norm/<task>``, ``grad_share/<task>``, ``grad_ratio/<task>`` and
        ``grad_cos/<task_i>-<task_j>``, each preceded by ``prefix``.
        """
        out: dict[str, float] = {}
        for name in self.norms:
            out[f"{prefix}grad_norm/{name}"] = self.norms[name]
            out[f"{prefix}grad_share/{name}"] = self.shares[name]
            out[f"{prefix}grad_ratio/{name}"] = self.ratios[name]
        for (first, second), cosine in self.cosines.items():
            out[f"{prefix}grad_cos/{first}-{second}"] = cosine
        return out

    def __str__(self) -> str:
        width = max(len("task"), *(len(name) for name in self.norms))
        lines = [f"{'task':<{width}}  {'norm':>10}  {'share':>7}  {'vs largest':>10}"]
        for name, norm in self.norms.items():
            lines.append(
                f"{name:<{width}}  {norm:>10.4g}  {100 * self.shares[name]:>5.1f} %  "
                f"{self.ratios[name]:>9.3g}x"
            )
        largest = self.largest
        for name, ratio in self.ratios.items():
            if name != largest:
                lines.append(f"`{name}` receives {100 * ratio:.3g} % of `{largest}`'s gradient.")
        for (first, second), cosine in self.cosines.items():
            lines.append(f"cosine between `{first}` and `{second}`: {cosine:+.3f}")
        return "\n".join(lines)


def gradient_report(
    losses: Mapping[str, Tensor], params: Params, *, cosines: bool = False
) -> GradientReport:
    """Measure each task's gradient norm over ``params`` and summarize it (syncs: for reading).

    Args:
        losses: Task name to scalar loss.
        params: An ``nn.Module``, a tensor or an iterable of tensors.
        cosines: Also compute the pairwise cosines (memory: one flat gradient per task).

    Returns:
        A :class:`GradientReport`; ``print`` it for a table.

    Raises:
        RuntimeError: Called after a ``backward()`` that freed a loss's graph (see
            :func:`task_gradient_norms`).

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> report = gradient_report({"big": 10 * w.sum(), "small": 0.25 * w.sum()}, w)
        >>> print(report)
        task         norm    share  vs largest
        big         14.14   97.6 %          1x
        small      0.3536    2.4 %      0.025x
        `small` receives 2.5 % of `big`'s gradient.
    """
    # Materialize once: a generator such as model.parameters() would be empty the second time.
    params = as_tensors(params)
    norms = {name: float(norm) for name, norm in task_gradient_norms(losses, params).items()}
    total = sum(norms.values())
    largest = max(norms.values())
    shares = {name: (n / total if total > 0 else math.nan) for name, n in norms.items()}
    ratios = {name: (n / largest if largest > 0 else math.nan) for name, n in norms.items()}
    cos: dict[tuple[str, str], float] = {}
    if cosines and len(norms) > 1:
        cos = {pair: float(c) for pair, c in gradient_cosines(losses, params).items()}
    return GradientReport(norms=norms, shares=shares, ratios=ratios, cosines=cos)


class GradientMonitor:
    """Compute a :class:`GradientReport` every ``every`` steps; the other steps cost a counter.

    Call :meth:`step` once per training step, before ``total.backward()``. On steps ``0``,
    ``every``, ``2 * every``, ... it measures (extra ``autograd.grad`` calls per task, and a
    host-device sync to read the numbers); on the others it only counts.

    Args:
        params: An ``nn.Module``, a tensor or an iterable of tensors. For intermediate tensors
            (e.g. shared features that change every step) pass them to :meth:`step` instead.
        every: Measure every this many steps (>= 1).
        cosines: Also log pairwise cosines.
        prefix: Prepended to every key of :meth:`as_dict`.

    Example:
        >>> import torch
        >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> monitor = GradientMonitor([w], every=2)
        >>> for step in range(3):
        ...     report = monitor.step({"a": w.sum(), "b": 3 * w.sum()})
        ...     print(step, report is not None)
        0 True
        1 False
        2 True
        >>> round(monitor.as_dict()["grad_share/a"], 4)
        0.25
    """

    def __init__(
        self,
        params: Params | None = None,
        *,
        every: int = 100,
        cosines: bool = False,
        prefix: str = "",
    ) -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"`every` must be an integer >= 1, got {every!r}")
        # Validate now so a bad argument fails at construction, not after `every` steps.
        self._params = None if params is None else as_tensors(params)
        self.every = every
        self.cosines = bool(cosines)
        self.prefix = prefix
        self.steps = 0
        self._latest: GradientReport | None = None

    def step(
        self, losses: Mapping[str, Tensor], params: Params | None = None
    ) -> GradientReport | None:
        """Count a step; on every ``every``-th, measure and return the report (else None)."""
        due = self.steps % self.every == 0
        self.steps += 1
        if not due:
            return None
        chosen = params if params is not None else self._params
        if chosen is None:
            raise ValueError("pass `params` to GradientMonitor(...) or to step(...)")
        self._latest = gradient_report(losses, chosen, cosines=self.cosines)
        return self._latest

    def latest(self) -> GradientReport | None:
        """The last report, or None before the first measurement."""
        return self._latest

    def as_dict(self) -> dict[str, float]:
        """The last report as plain floats for a logger; empty before the first measurement."""
        return {} if self._latest is None else self._latest.as_dict(self.prefix)

    def __repr__(self) -> str:
        return f"GradientMonitor(every={self.every}, cosines={self.cosines}, steps={self.steps})"
