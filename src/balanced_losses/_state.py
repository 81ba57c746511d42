"""State declared once per task: registration, resets, precision and checkpoints by task name."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

__all__ = ["StateKind", "TaskState"]

#: What a declared tensor is: see :meth:`TaskState._add_state`.
StateKind = Literal["statistic", "config", "output", "constant", "parameter"]
_HALF = (torch.float16, torch.bfloat16)


def _initial(default: Tensor) -> Tensor:
    """The registered copy of a declared default: floating point in float32."""
    return default.float() if default.is_floating_point() else default.clone()


class TaskState(nn.Module):
    """A module whose tensors are declared once, per task, in a fixed task order.

    From the declaration (:meth:`_add_state`, :meth:`_add_parameter`) follow :meth:`reset`,
    :meth:`reset_running_stats`, :meth:`reset_parameters`, the precision rule (a half-precision
    conversion of a parent model leaves the tensors bit-identical) and the mapping of checkpoints
    by task name. :class:`~balanced_losses.Weighting` builds on it; it is not used on its own.
    """

    # Version history of the state format shared by every weighting:
    # 1 and 2: per-class layouts (see each class's ``_upgrade_state_dict``);
    # 3: the task names travel in ``_extra_state``; counters are named ``num_steps``.
    _version: int = 3

    def __init__(self, tasks: tuple[str, ...]) -> None:
        """Hold ``tasks``, already checked (unique non-empty names, in order)."""
        super().__init__()
        self._tasks = tasks
        self._index = {name: i for i, name in enumerate(self._tasks)}
        # name -> (kind, default, task axis) of every declared tensor; see _add_state.
        self._declared: dict[str, tuple[StateKind, Tensor, int | None]] = {}

    @property
    def tasks(self) -> tuple[str, ...]:
        """The task names, in the order of every per-task tensor of this module."""
        return self._tasks

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
            if isinstance(child, TaskState):
                child.reset()
        self._reset_python_state()

    def _reset_python_state(self) -> None:
        """Reset state kept in Python attributes (see :meth:`_get_python_state`)."""

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

    # ---------------------------------------------------------------------------- precision

    def _apply(self, fn: Any, recurse: bool = True) -> TaskState:
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
