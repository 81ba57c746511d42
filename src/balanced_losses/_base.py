"""The shared base of every loss weighting: task bookkeeping, input checks, logging, versioning."""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from balanced_losses import distributed
from balanced_losses._autograd import constant_factor, scale_gradient
from balanced_losses._checks import (
    check_loss,
    check_loss_mapping,
    check_task_names,
    check_task_weights,
)

__all__ = ["StateKind", "Weighting"]

#: What a declared tensor is: see :meth:`Weighting._add_state`.
StateKind = Literal["statistic", "config", "output", "constant", "parameter"]
_HALF = (torch.float16, torch.bfloat16)
# Forward calls in a row with gradients but unchanged parameters before _watch_parameters
# warns: more than any gradient-accumulation window in practice.
_STALE_STEPS = 50

# Ids of the weightings' learned parameters, and of those an optimizer stepped since the last
# check: filled by a step hook that every torch optimizer calls, registered on first use.
_WATCHED: dict[int, weakref.ref[Tensor]] = {}
_STEPPED: dict[int, bool] = {}
_HOOK: list[Any] = []


def _mark_stepped(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    for group in optimizer.param_groups:
        for param in group["params"]:
            ref = _WATCHED.get(id(param))
            if ref is not None and ref() is param:
                _STEPPED[id(param)] = True


def _forget(ref: weakref.ref[Tensor]) -> None:
    for key in [key for key, value in _WATCHED.items() if value is ref]:
        del _WATCHED[key]
        _STEPPED.pop(key, None)


def _watch(params: list[nn.Parameter]) -> None:
    if not _HOOK:
        _HOOK.append(register_optimizer_step_post_hook(_mark_stepped))
    for param in params:
        ref = _WATCHED.get(id(param))
        # Ids are reused once an object is freed: a dead or foreign entry is replaced.
        if ref is None or ref() is not param:
            _WATCHED[id(param)] = weakref.ref(param, _forget)
            _STEPPED.pop(id(param), None)


def _initial(default: Tensor) -> Tensor:
    """The registered copy of a declared default: floating point in float32."""
    return default.float() if default.is_floating_point() else default.clone()


class Weighting(nn.Module):
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
    - **Logging**: :attr:`weights` holds the effective weight of each task at the last step,
      :math:`\partial\,\text{total} / \partial L_k` (your factor included), as tensors (no
      sync until you ask). A feature-level method acts in backward, not on the total: its
      weights are the multipliers it applied to each task's gradient at the shared features.
      :meth:`log_dict` turns a step into a flat dict of floats for a logger, every N steps.
    - **Distributed**: with ``sync_dist=True`` (the default) and an initialized multi-rank
      process group, the losses that enter statistics are first averaged over ranks, so every
      rank keeps the same statistics and applies the same weights.
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
      lets old checkpoints be upgraded in :meth:`_upgrade_state_dict`.

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
        ...     def forward(self, losses):
        ...         values, present = self._stack(losses)
        ...         weights = present.to(values.dtype)
        ...         self._record(weights, present)
        ...         return (weights * values).sum()
        >>> plain_sum = PlainSum(["pointer", "countdown"], allow_missing=True)
        >>> plain_sum({"pointer": torch.tensor(0.5), "countdown": torch.tensor(3.0)})
        tensor(3.5000)
        >>> plain_sum({"pointer": torch.tensor(0.5)})  # no countdown label in this batch
        tensor(0.5000)
        >>> plain_sum.weights
        {'pointer': tensor(1.), 'countdown': tensor(0.)}
    """

    # Version history of the state format shared by every weighting:
    # 1 and 2: per-class layouts (see each class's ``_upgrade_state_dict``);
    # 3: the task names travel in ``_extra_state``; counters are named ``num_steps``.
    _version: int = 3
    #: Lowest loss value a subclass accepts under ``check_inputs``: None (any finite value),
    #: "nonnegative" or "positive".
    _loss_domain: str | None = "nonnegative"

    #: Whether the method cancels a constant factor of a loss (so a hand-tuned factor
    #: multiplied into the loss has no effect, and :meth:`_stack` warns about one).
    _cancels_factors: bool = False

    last_weights: Tensor
    last_losses: Tensor
    last_total: Tensor
    task_weights: Tensor
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
        super().__init__()
        self._tasks = check_task_names(tasks)
        self._index = {name: i for i, name in enumerate(self._tasks)}
        self.allow_missing = bool(allow_missing)
        self.check_inputs = bool(check_inputs)
        self.sync_dist = bool(sync_dist)
        # name -> (kind, default, task axis) of every declared tensor; see _add_state.
        self._declared: dict[str, tuple[StateKind, Tensor, int | None]] = {}
        # Forward calls in a row with gradients and no optimizer step (never saved).
        self._stale_steps = 0
        self._parameters_warned = False
        # Python-side bookkeeping (never saved): whether the losses were checked for constant
        # factors, how often log_dict was called.
        self._factors_checked = False
        self._log_calls = 0
        # Models this method is attached to (feature-level methods' ``attach``).
        self._attachments: list[Any] = []
        k = len(self._tasks)
        weight_list = check_task_weights(self._tasks, weights)
        #: The user's factors as floats, for code that must not touch a tensor (backward hooks).
        self._weight_list = weight_list
        self._weighted = any(w != 1.0 for w in weight_list)
        self._add_state("task_weights", torch.tensor(weight_list), kind="constant")
        self._add_state("last_weights", torch.zeros(k), kind="output")
        self._add_state("last_losses", torch.full((k,), math.nan), kind="output")
        self._add_state("last_total", torch.tensor(math.nan), kind="output", task_axis=None)
        self._add_state("_all_present", torch.ones(k, dtype=torch.bool), kind="constant")

    # ------------------------------------------------------------------------ declared state

    def _add_state(
        self,
        name: str,
        default: Tensor,
        *,
        kind: StateKind = "statistic",
        task_axis: int | None = 0,
    ) -> None:
        """Declare a tensor of this module's state, registered as a buffer.

        Args:
            name: Attribute name.
            default: Initial value; :meth:`reset` restores it. A floating default is
                registered in float32 and kept as given for resets: give it in float64 so a
                module converted with ``.double()`` resets to the exact value.
            kind: ``"statistic"``: needed to resume (persistent), reset by
                :meth:`reset_running_stats`. ``"output"``: recomputed every step for logging
                (not persistent), reset by :meth:`reset`. ``"config"``: chosen at construction
                and saved (persistent), never reset, such as a seed. ``"constant"``: derived
                from the constructor's arguments (not persistent), never reset.
            task_axis: The axis indexed by task, in task order (None when there is none):
                checkpoints saved with the tasks in another order are permuted along it.
        """
        if kind not in ("statistic", "config", "output", "constant"):
            raise ValueError(
                f"`kind` must be 'statistic', 'config', 'output' or 'constant', got {kind!r}"
            )
        self.register_buffer(name, _initial(default), persistent=kind in ("statistic", "config"))
        self._declared[name] = (kind, default.clone(), task_axis)

    def _add_parameter(self, name: str, default: Tensor, *, task_axis: int | None = 0) -> None:
        """Declare a learned tensor (an ``nn.Parameter``), reset by :meth:`reset_parameters`."""
        self.register_parameter(name, nn.Parameter(_initial(default)))
        self._declared[name] = ("parameter", default.clone(), task_axis)

    def _restore(self, kinds: tuple[str, ...]) -> None:
        with torch.no_grad():
            for name, (kind, default, _) in self._declared.items():
                if kind in kinds:
                    tensor = getattr(self, name)
                    tensor.copy_(default.to(device=tensor.device, dtype=tensor.dtype))

    def reset_running_stats(self) -> None:
        """Forget the running statistics, as if no training step had been taken."""
        self._restore(("statistic",))

    def reset_parameters(self) -> None:
        """Set the learned parameters back to their initial values."""
        self._restore(("parameter",))

    def reset(self) -> None:
        """Forget everything learned or tracked, as if freshly constructed."""
        self._restore(("statistic", "parameter", "output"))
        for child in self.children():
            if isinstance(child, Weighting):
                child.reset()
        self._reset_python_state()

    def _reset_python_state(self) -> None:
        """Reset state kept in Python attributes (see :meth:`_get_python_state`)."""

    def __getstate__(self) -> dict[str, Any]:
        # A copy or a pickle of a weighting is not attached to the original's model (and must
        # not drag that model along).
        state = dict(self.__dict__)
        state["_attachments"] = []
        return state

    def _get_python_state(self) -> dict[str, Any]:
        """Python (non-tensor) state needed to resume; saved in ``_extra_state``."""
        return {}

    def _set_python_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`_get_python_state` saved."""

    def get_extra_state(self) -> dict[str, Any]:
        """The task names, in order, and any Python state: saved with the tensors."""
        return {"tasks": list(self._tasks), **self._get_python_state()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the Python state (the task names were checked on loading)."""
        self._set_python_state({key: value for key, value in state.items() if key != "tasks"})

    def _watch_parameters(self) -> None:
        """Warn once when the learned parameters get gradients but no optimizer steps them.

        That happens when they were not given to any optimizer: the weighting then stays at its
        initial values, silently. Read from Python-side records (which parameters an optimizer
        stepped, through torch's optimizer step hook; whether a gradient exists): no sync.
        """
        if self._parameters_warned or not self._updating or torch.compiler.is_compiling():
            return
        params = [p for p in self.parameters(recurse=False) if p.requires_grad]
        _watch(params)
        stepped = any(_STEPPED.pop(id(p), False) for p in params)
        got_grad = any(p.grad is not None for p in params)
        self._stale_steps = self._stale_steps + 1 if got_grad and not stepped else 0
        if self._stale_steps >= _STALE_STEPS:
            self._parameters_warned = True
            names = ", ".join(f"`{name}`" for name, _ in self.named_parameters(recurse=False))
            warnings.warn(
                f"{type(self).__name__}'s parameters {names} have received gradients for "
                f"{_STALE_STEPS} steps and no optimizer stepped them: pass "
                "`weighting.parameters()` to the optimizer (e.g. "
                "`torch.optim.Adam([*model.parameters(), *weighting.parameters()])`), or the "
                "weights stay at their initial values",
                UserWarning,
                stacklevel=3,
            )

    @property
    def _updating(self) -> bool:
        """Whether this call may move statistics: training mode with gradients enabled."""
        return self.training and torch.is_grad_enabled()

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names, in the order of every per-task tensor of this module."""
        return self._tasks

    @property
    def weights(self) -> dict[str, Tensor]:
        """Effective weight of each task at the last step, d total / d loss, as 0-dim tensors."""
        # Copies: the buffer is overwritten in place at the next step, and a user who keeps
        # these tensors to convert on a later logging step must see this step's values.
        return {name: self.last_weights[i].clone() for i, name in enumerate(self._tasks)}

    def _sent_to_features(self) -> tuple[Tensor, Tensor] | None:
        """The last backward's multiplier and gradient norm of each task at the shared features.

        None for a method that does not see gradients (the loss-level ones).
        """
        return None

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
        - ``weight/<task>``: the effective weight of :attr:`weights`;
        - ``grad_share/<task>``: for the feature-level methods, each task's part of the gradient
          sent into the shared features, :math:`|c_k|\,\lVert g_k\rVert / \sum_j |c_j|\,\lVert
          g_j\rVert` (the loss-level methods do not see gradients: use
          :class:`~balanced_losses.diagnostics.GradientMonitor` there).

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
        # float64 where the device has it (MPS does not): products of large weights and norms.
        wide = torch.float32 if device.type == "mps" else torch.float64
        losses = self.last_losses.detach().to(wide)
        parts = [
            losses,
            torch.nansum(losses).reshape(1),
            self.last_total.detach().to(device, wide).reshape(1),
            self.last_weights.detach().to(device, wide),
        ]
        measured = self._sent_to_features()
        if measured is not None:
            multipliers, norms = measured
            sent = multipliers.detach().to(device, wide).abs() * norms.detach().to(device, wide)
            total = sent.sum()
            tiny = torch.finfo(wide).tiny
            parts.append(torch.where(total > 0, sent / total.clamp_min(tiny), math.nan))
        numbers = torch.cat(parts).tolist()  # the one sync
        out: dict[str, float] = {}
        for i, task in enumerate(self._tasks):
            out[f"{prefix}loss/{task}"] = numbers[i]
        out[f"{prefix}loss/sum"] = numbers[k]
        out[f"{prefix}loss/total"] = numbers[k + 1]
        for i, task in enumerate(self._tasks):
            out[f"{prefix}weight/{task}"] = numbers[k + 2 + i]
        if measured is not None:
            for i, task in enumerate(self._tasks):
                out[f"{prefix}grad_share/{task}"] = numbers[2 * k + 2 + i]
        return out

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
            self._check_values(values, present)
        if self._cancels_factors and not self._factors_checked and self._updating:
            self._check_factors(given)
        if self._updating:
            # For log_dict: the raw losses of this training step (NaN where absent).
            with torch.no_grad():
                raw = torch.where(present, values.detach(), math.nan)
                self.last_losses.copy_(raw)
        if scale_gradients and self._weighted and values.requires_grad:
            values = scale_gradient(values, self.task_weights.to(values.device, values.dtype))
        return values, present

    def _check_factors(self, given: Mapping[str, Tensor]) -> None:
        """Warn once about losses multiplied by a Python number, which this method cancels."""
        if torch.compiler.is_compiling():
            return
        self._factors_checked = True
        factors = {name: constant_factor(loss) for name, loss in given.items()}
        found = {name: f for name, f in factors.items() if f is not None and f != 1.0}
        if not found:
            return
        shown = ", ".join(f"`{name}` (x{f:g})" for name, f in found.items())
        suggestion = ", ".join(f"{name!r}: {f:g}" for name, f in found.items())
        method = getattr(self, "_method_name", type(self).__name__)
        warnings.warn(
            f"{method}: the losses of {shown} are multiplied by a constant, and {method} "
            "cancels a constant factor of a loss, so that factor does not change training. "
            f"Drop it from the loss and pass `weights={{{suggestion}}}` to {method} instead: "
            "that scales the task's gradient after balancing",
            UserWarning,
            stacklevel=2,
        )

    def _check_values(self, values: Tensor, present: Tensor) -> None:
        # Opt-in: every .tolist() here is a host-device sync.
        for name, value, ok in zip(self._tasks, values.tolist(), present.tolist(), strict=True):
            if not ok:
                continue
            if not math.isfinite(value):
                raise ValueError(f"loss of task `{name}` must be finite, got {value}")
            if self._loss_domain == "nonnegative" and value < 0:
                raise ValueError(f"loss of task `{name}` must be >= 0, got {value}")
            if self._loss_domain == "positive" and value <= 0:
                raise ValueError(f"loss of task `{name}` must be > 0, got {value}")

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
        """Keep a training step's total for :meth:`log_dict`; return it (every forward's end).

        Also drops the features that ``attach`` held for the step: the heads have run.
        """
        for attachment in self._attachments:
            attachment._release()
        if self._updating:
            with torch.no_grad():
                self.last_total.copy_(total.detach())
        return total

    def _record(self, weights: Tensor, present: Tensor) -> None:
        """Store the effective weights of this step for :attr:`weights` (0 for absent tasks).

        ``weights`` are the method's own; the user's factors are multiplied in here.
        """
        # Logging only: the stored copy must not keep the graph alive.
        effective = weights.detach()
        if self._weighted:
            effective = effective * self.task_weights.to(effective.device, effective.dtype)
        shown = torch.where(present, effective, torch.zeros_like(effective))
        # A finite weight beyond the buffer's range (a geometric mean's G / (K L) with L near
        # 1e-30) is logged as the largest finite value, not inf; NaN stays NaN.
        if shown.dtype != self.last_weights.dtype:
            limit = torch.finfo(self.last_weights.dtype).max
            shown = shown.clamp(-limit, limit)
        self.last_weights.copy_(shown)

    def _apply(self, fn: Any, recurse: bool = True) -> Weighting:
        # `model.half()` / `model.to(torch.bfloat16)` reach a weighting that is a submodule of
        # the model. Statistics must come through bit-identical, so a conversion to a half
        # dtype is never applied to a wider tensor (casting down and back up would round it):
        # the tensor only moves to the converted tensor's device. `.double()` still widens.
        def keep_precision(tensor: Tensor) -> Tensor:
            converted: Tensor = fn(tensor)
            narrowed = converted.dtype in _HALF and tensor.dtype not in _HALF
            if narrowed and tensor.is_floating_point():
                return tensor.to(device=converted.device)
            return converted

        super()._apply(keep_precision, recurse)  # type: ignore[no-untyped-call]
        return self

    # ------------------------------------------------------------------------- checkpoints

    def _upgrade_state_dict(self, state_dict: dict[str, Any], prefix: str, version: int) -> None:
        """Rewrite ``state_dict`` entries saved by an older ``_version`` in place."""

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        version = local_metadata.get("version")
        version = 0 if version is None else version
        if version < self._version:
            self._upgrade_state_dict(state_dict, prefix, version)
            if version < 3:
                # Saved before task names were stored: the order is taken to be this module's.
                extra = state_dict.get(prefix + "_extra_state")
                extra = dict(extra) if isinstance(extra, dict) else {}
                state_dict[prefix + "_extra_state"] = {"tasks": list(self._tasks), **extra}
        if not self._map_tasks_by_name(state_dict, prefix, error_msgs):
            # Another task set: load nothing, so a caller who catches the error keeps this
            # module's state intact rather than another task's statistics.
            return
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _map_tasks_by_name(
        self, state_dict: dict[str, Any], prefix: str, error_msgs: list[str]
    ) -> bool:
        """Permute the per-task entries of ``state_dict`` from the saved order to this one.

        Returns False (with an error message) when the state was saved for other tasks.
        """
        extra = state_dict.get(prefix + "_extra_state")
        if not isinstance(extra, dict) or extra.get("tasks") is None:
            return True
        saved = list(extra["tasks"])
        if tuple(saved) == self._tasks:
            return True
        if sorted(saved) != sorted(self._tasks):
            error_msgs.append(
                f"the state was saved for tasks {saved}, but this "
                f"{type(self).__name__} has tasks {list(self._tasks)}"
            )
            return False
        order = torch.tensor([saved.index(name) for name in self._tasks])
        for name, (kind, _, axis) in self._declared.items():
            key = prefix + name
            if axis is None or kind in ("output", "constant") or key not in state_dict:
                continue
            value = state_dict[key]
            state_dict[key] = value.index_select(axis, order.to(value.device))
        state_dict[prefix + "_extra_state"] = {**extra, "tasks": list(self._tasks)}
        return True

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self._tasks)}"
