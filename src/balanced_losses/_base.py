"""The shared base of every loss weighting: task bookkeeping, input checks, logging, DDP."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping
from typing import ClassVar

import torch
from torch import Tensor

from balanced_losses import distributed
from balanced_losses._autograd import scale_gradient, warn_constant_factors
from balanced_losses._checks import (
    check_loss,
    check_loss_mapping,
    check_loss_values,
    check_task_names,
    check_task_weights,
)
from balanced_losses._lifecycle import Lifecycle
from balanced_losses._numerics import wide_dtype
from balanced_losses._state import StateKind, TaskState
from balanced_losses._watch import ParameterWatch

__all__ = ["StateKind", "Weighting"]


def _deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"`{old}` is deprecated and will be removed in the next release; use `{new}`",
        DeprecationWarning,
        stacklevel=3,
    )


class Weighting(Lifecycle, TaskState):
    r"""Base class of the weightings: ``forward(losses: Mapping[str, Tensor]) -> Tensor``.

    A subclass turns a mapping from task name to scalar loss into one differentiable total. The
    base class gives every weighting the same contract:

    - **Task names** are fixed at construction, in order. An unknown name raises ``KeyError``
      that lists the expected ones. A missing task raises too, unless ``allow_missing=True``:
      then a task that is absent from the mapping, or whose loss is ``None``, contributes
      nothing to the total, gets weight 0 for that step and leaves its statistics untouched.
      The present tasks keep the weights they would have had; nothing is renormalized.
    - **Non-finite losses** never enter running statistics (selected with ``torch.where``, so
      no host-device sync). The total of such a step is non-finite too, as the user's plain sum
      would be, so the problem stays visible; the next finite step behaves as if the bad step
      had not happened.
    - **Input checks** that need the loss *values* (finite, non-negative, positive) cost a
      host-device sync, so they run only when ``check_inputs=True``.
    - **Your own factors** go in ``weights={task: factor}`` (default 1 each), not into the
      losses: many methods cancel a constant factor of a loss (a normalizer divides it out, a
      logarithm turns it into a constant). A factor :math:`w_k` multiplies the gradient that
      task :math:`k` sends (to its head and to the shared parameters) *after* the method has
      balanced it; the method's statistics and the value of the total never see it. A loss
      multiplied by a Python number before a method that cancels such factors warns once.
    - **Logging**: :attr:`last_weights` holds the effective weight of each task at the last
      step, :math:`\partial\,\text{total} / \partial L_k` (your factor included), a ``(K,)``
      tensor in task order (no sync until you ask). A feature-level method acts in backward,
      not on the total: its weights are the multipliers it applied to each task's gradient at
      the shared features.
      :meth:`log_dict` turns a step into a flat dict of floats for a logger, every N steps.
    - **Distributed**: with ``sync_dist=True`` (the default) and an initialized multi-rank
      process group, the losses that enter statistics are first averaged over ranks, so every
      rank keeps the same statistics and applies the same weights.
    - **One hook**: :meth:`forward` stacks and checks the losses, calls :meth:`combine` with
      them, records the weights it returns and keeps the step for :meth:`log_dict`. A
      loss-level method implements :meth:`combine` and nothing else of this contract.
    - **One loop for every method**: :meth:`after_step` (after each optimizer step) and
      :meth:`epoch_end` do nothing unless the method needs them (FAMO, DWA).
    - **State** is declared once, with :meth:`_add_state` (running statistics, logged outputs,
      constants) and :meth:`_add_parameter` (learned values). From the declaration follow
      :meth:`reset`, :meth:`reset_running_stats`, :meth:`reset_parameters`, the precision rule
      below and the mapping of checkpoints by task name.
    - **When statistics move**: only in training mode *and* with gradients enabled. A
      validation loop under ``torch.no_grad()`` or ``torch.inference_mode()`` leaves every
      statistic untouched even if the weighting was left in training mode; it then applies the
      weights the current statistics give.
    - **Precision**: ``model.half()`` or ``model.to(torch.bfloat16)`` reach a weighting that is a
      submodule of the model. Its statistics and parameters keep their dtype through such a
      conversion, bit for bit (half-precision statistics would stop moving: an EMA update below
      the dtype's resolution rounds away). Devices still move, and ``.double()`` still widens.
    - **Checkpoints**: all state needed to resume lives in ``state_dict``, with the task names.
      Loading a state saved with the same tasks in another order maps every per-task entry by
      name; a state saved with other tasks raises an error that names both lists. ``_version``
      lets old checkpoints be upgraded in :meth:`_upgrade_state_dict`. (Declared state,
      precision and checkpoints live in :class:`~balanced_losses._state.TaskState`.)

    Args:
        tasks: Task names, in order.
        weights: Your fixed factor per task (finite, >= 0; 1 for a task not named), applied
            after the method's balancing (see above).
        allow_missing: Accept mappings without some tasks (partial labels).
        check_inputs: Validate loss values, at the cost of a host-device sync per step.
        sync_dist: Average statistics' inputs across ranks when ``torch.distributed`` is
            initialized with more than one rank.

    Example:
        A plain sum written as a weighting, with partial labels:

        >>> import torch
        >>> class PlainSum(Weighting):
        ...     def combine(self, values, present):
        ...         weights = present.to(values.dtype)
        ...         return (weights * values).sum(), weights
        >>> plain_sum = PlainSum(["pointer", "countdown"], allow_missing=True)
        >>> plain_sum({"pointer": torch.tensor(0.5), "countdown": torch.tensor(3.0)})
        tensor(3.5000)
        >>> plain_sum({"pointer": torch.tensor(0.5)})  # no countdown label in this batch
        tensor(0.5000)
        >>> plain_sum.last_weights
        tensor([1., 0.])
    """

    #: Lowest loss value a subclass accepts under ``check_inputs``: None (any finite value),
    #: "nonnegative" or "positive".
    _loss_domain: str | None = "nonnegative"

    #: Whether the method cancels a constant factor of a loss (so a hand-tuned factor
    #: multiplied into the loss has no effect, and :meth:`_stack` warns about one).
    _cancels_factors: bool = False

    #: The name warnings give this method; None for the class's name. A module that serves
    #: a composite method (DBMTL's gradient half) names the composite.
    _display_name: ClassVar[str | None] = None

    last_weights: Tensor
    last_losses: Tensor
    last_total: Tensor
    _fixed_weights: Tensor
    _all_present: Tensor

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        weights: Mapping[str, float] | None = None,
        allow_missing: bool = False,
        check_inputs: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__(check_task_names(tasks))
        self.allow_missing = bool(allow_missing)
        self.check_inputs = bool(check_inputs)
        self.sync_dist = bool(sync_dist)
        # Whether an optimizer steps the learned parameters (Python-side, never saved).
        self._parameter_watch = ParameterWatch()
        # Python-side bookkeeping (never saved): whether the losses were checked for constant
        # factors, how often log_dict was called.
        self._factors_checked = False
        self._log_calls = 0
        k = len(self._tasks)
        weight_list = check_task_weights(self._tasks, weights)
        #: The user's factors as floats, for code that must not touch a tensor (backward hooks).
        self._weight_list = weight_list
        self._weighted = any(w != 1.0 for w in weight_list)
        self._add_state("_fixed_weights", torch.tensor(weight_list), kind="constant")
        self._add_state("last_weights", torch.zeros(k), kind="output")
        self._add_state("last_losses", torch.full((k,), math.nan), kind="output")
        self._add_state("last_total", torch.tensor(math.nan), kind="output", task_axis=None)
        self._add_state("_all_present", torch.ones(k, dtype=torch.bool), kind="constant")

    # ------------------------------------------------------------------------------ forward

    def forward(self, losses: Mapping[str, Tensor | None]) -> Tensor:
        """Return the total of ``losses`` (task name to scalar loss): see :meth:`combine`."""
        values, present = self._stack(losses)
        self._watch_parameters()
        total, weights = self.combine(values, present)
        self._record(weights, present)
        return self._returned(total)

    def combine(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        r"""The method: the total of this step and each task's weight in it.

        The one hook a loss-level method implements; :meth:`forward` calls it. It may update
        the method's statistics (only when ``self._updating``, under ``torch.no_grad()``).

        Args:
            values: The losses in task order, ``(K,)``, differentiable, 0 where absent; your
                factors (``weights=``) already act on their gradients, not on their values.
            present: Which tasks have a loss this step, ``(K,)`` boolean.

        Returns:
            ``(total, weights)``: the differentiable scalar total, and the weights
            :math:`\partial\,\text{total} / \partial L_k` for logging, ``(K,)`` (absent
            tasks are logged as 0 whatever is given for them).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement `combine`")

    # ---------------------------------------------------------------------------- vocabulary

    @property
    def _updating(self) -> bool:
        """Whether this call may move statistics: training mode with gradients enabled."""
        return self.training and torch.is_grad_enabled()

    @property
    def _method_name(self) -> str:
        """The name warnings give this method (see ``_display_name``)."""
        return self._display_name or type(self).__name__

    @property
    def weights(self) -> dict[str, Tensor]:
        """Deprecated: use :attr:`last_weights`, a ``(K,)`` tensor in task order.

        Effective weight of each task at the last step, d total / d loss, as 0-dim tensors
        (copies). ``dict(zip(w.tasks, w.last_weights.clone()))`` gives the same.
        """
        _deprecated(f"{type(self).__name__}.weights", "last_weights")
        # Copies: the buffer is overwritten in place at the next step, and a user who keeps
        # these tensors to convert on a later logging step must see this step's values.
        return {name: self.last_weights[i].clone() for i, name in enumerate(self._tasks)}

    @property
    def task_weights(self) -> Tensor:
        """Deprecated: your fixed factors are the ``weights=`` you passed to the constructor."""
        _deprecated(f"{type(self).__name__}.task_weights", "the constructor's `weights=`")
        return self._fixed_weights

    def _watch_parameters(self) -> None:
        """Warn once when the learned parameters get gradients but no optimizer steps them."""
        if self._updating:
            self._parameter_watch.check(self)

    def log_dict(self, every: int = 1, *, prefix: str = "") -> dict[str, float]:
        r"""The last training step as a flat dict of Python floats, on every ``every``-th call.

        Call it once per training step, after ``backward``; it returns ``{}`` on the other calls
        (no host-device sync there), and on calls 0, ``every``, ``2 * every``, ... one dict read
        with a single sync:

        - ``loss/<task>``: the raw loss the method received (NaN for an absent task);
        - ``loss/sum``: the plain sum of the raw losses. Unlike the weighting's total (negative
          under a logarithm, divided by running means under a normalizer), it means what a
          plain-sum training loss means: print or log it to compare with a validation loss;
        - ``loss/total``: the value the weighting returned;
        - ``weight/<task>``: the effective weight of :attr:`last_weights`;
        - ``grad_share/<task>``: for the feature-level methods, each task's part of the gradient
          sent into the shared features, :math:`|c_k|\,\lVert g_k\rVert / \sum_j |c_j|\,\lVert
          g_j\rVert`; for :class:`~balanced_losses.CalibratedWeighting` while it calibrates,
          the same at the shared parameters (the other loss-level methods do not see gradients:
          use :class:`~balanced_losses.diagnostics.GradientMonitor` there).

        Args:
            every: Return the dict on every this many calls (an integer >= 1).
            prefix: Prepended to every key (e.g. ``"train/"``).
        """
        if isinstance(every, bool) or not (isinstance(every, int) and every >= 1):
            raise ValueError(f"`every` must be an integer >= 1, got {every!r}")
        due = self._log_calls % every == 0
        self._log_calls += 1
        if not due:
            return {}
        k = len(self._tasks)
        device = self.last_losses.device
        # Products of large weights and norms: in the wide dtype.
        wide = wide_dtype(device)
        losses = self.last_losses.detach().to(wide)
        parts = [
            losses,
            torch.nansum(losses).reshape(1),
            self.last_total.detach().to(device, wide).reshape(1),
            self.last_weights.detach().to(device, wide),
        ]
        extra = self._logged_per_task(device, wide)
        parts.extend(extra.values())
        numbers = torch.cat(parts).tolist()  # the one sync
        out: dict[str, float] = {}
        for i, task in enumerate(self._tasks):
            out[f"{prefix}loss/{task}"] = numbers[i]
        out[f"{prefix}loss/sum"] = numbers[k]
        out[f"{prefix}loss/total"] = numbers[k + 1]
        for i, task in enumerate(self._tasks):
            out[f"{prefix}weight/{task}"] = numbers[k + 2 + i]
        for j, key in enumerate(extra):
            for i, task in enumerate(self._tasks):
                out[f"{prefix}{key}/{task}"] = numbers[(2 + j) * k + 2 + i]
        return out

    def _logged_per_task(self, device: torch.device, dtype: torch.dtype) -> dict[str, Tensor]:
        """More per-task entries for :meth:`log_dict`: key -> ``(K,)`` tensor on ``device``."""
        return {}

    # ------------------------------------------------------------------ helpers for subclasses

    def _unknown(self, names: Iterable[str]) -> KeyError:
        unknown = sorted(set(names) - set(self._tasks))
        label = "task" if len(unknown) == 1 else "tasks"
        shown = ", ".join(f"`{name}`" for name in unknown)
        return KeyError(f"unknown {label} {shown}; expected one of {list(self._tasks)}")

    def _stack(
        self, losses: Mapping[str, Tensor | None], *, scale_gradients: bool = True
    ) -> tuple[Tensor, Tensor]:
        """Stack a loss mapping into ``(values, present)``, both of shape ``(K,)``.

        ``values`` is differentiable, in the losses' floating dtype promoted to at least float32;
        absent entries are 0. ``present`` is boolean. With ``scale_gradients`` (the default) and
        user ``weights``, the gradient reaching loss :math:`k` through ``values`` is multiplied
        by :math:`w_k`, while the values themselves, which statistics see, are unchanged.
        """
        check_loss_mapping(losses)
        if any(name not in self._index for name in losses):
            raise self._unknown(losses)
        missing = [name for name in self._tasks if losses.get(name) is None]
        if missing and not self.allow_missing:
            raise KeyError(
                f"missing loss for task(s) {missing}; expected all of {list(self._tasks)} "
                "(pass allow_missing=True to accept partial labels)"
            )
        given: dict[str, Tensor] = {}
        for name in self._tasks:
            loss = losses.get(name)
            if loss is None:
                continue
            loss = check_loss(name, loss)
            if not loss.is_floating_point():
                raise ValueError(f"loss of task `{name}` must be floating point, got {loss.dtype}")
            given[name] = loss
        device = next(iter(given.values())).device if given else self.last_weights.device
        dtype = torch.float32
        for loss in given.values():
            dtype = torch.promote_types(dtype, loss.dtype)
        zero = torch.zeros((), dtype=dtype, device=device)
        values = torch.stack([given.get(n, zero).to(dtype) for n in self._tasks])
        if not given:
            # No task present: the total is a constant 0. Make it a leaf that requires grad so
            # that the usual `total.backward()` of a training loop still runs (and does nothing).
            values.requires_grad_(True)
        present = self._all_present.to(device)
        if missing:
            present = present.clone()
            for name in missing:
                present[self._index[name]] = False
        if self.check_inputs:
            check_loss_values(self._tasks, values, present, self._loss_domain)
        if (
            self._cancels_factors
            and not self._factors_checked
            and self._updating
            and not torch.compiler.is_compiling()
        ):
            self._factors_checked = True
            warn_constant_factors(self._method_name, given)
        if self._updating:
            # For log_dict: the raw losses of this training step (NaN where absent).
            with torch.no_grad():
                raw = torch.where(present, values.detach(), math.nan)
                self.last_losses.copy_(raw)
        if scale_gradients and self._weighted and values.requires_grad:
            values = scale_gradient(values, self._fixed_weights.to(values.device, values.dtype))
        return values, present

    def _stats_input(self, values: Tensor, present: Tensor) -> tuple[Tensor, Tensor]:
        """Return the detached values that may enter statistics, and where they are valid.

        Non-finite and absent entries are invalid. Under ``sync_dist`` with several ranks the
        values are the mean over the ranks where they are valid.
        """
        # Statistics are measurements of the losses, not part of the graph: cut the gradient.
        # Cast to the statistics' dtype first: a finite float64 loss above float32's range
        # becomes inf there and must be rejected, not stored.
        detached = values.detach().to(self.last_weights.dtype)
        valid = present & torch.isfinite(detached)
        if self.sync_dist:
            return distributed.mean_over_ranks(detached, valid)
        return torch.where(valid, detached, torch.zeros_like(detached)), valid

    def _returned(self, total: Tensor) -> Tensor:
        """Keep a training step's total for :meth:`log_dict`; return it (every forward's end)."""
        if self._updating:
            with torch.no_grad():
                self.last_total.copy_(total.detach())
        return total

    def _record(self, weights: Tensor, present: Tensor) -> None:
        """Store the effective weights of this step in :attr:`last_weights` (0 where absent).

        ``weights`` are the method's own; the user's factors are multiplied in here.
        """
        # Logging only: the stored copy must not keep the graph alive.
        effective = weights.detach()
        if self._weighted:
            effective = effective * self._fixed_weights.to(effective.device, effective.dtype)
        shown = torch.where(present, effective, torch.zeros_like(effective))
        # A finite weight beyond the buffer's range (a geometric mean's G / (K L) with L near
        # 1e-30) is logged as the largest finite value, not inf; NaN stays NaN.
        if shown.dtype != self.last_weights.dtype:
            limit = torch.finfo(self.last_weights.dtype).max
            shown = shown.clamp(-limit, limit)
        self.last_weights.copy_(shown)
