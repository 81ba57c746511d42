"""The shared base of every loss weighting: task bookkeeping, input checks, logging, versioning."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from balanced_losses import distributed

__all__ = ["Weighting"]


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
    - **Logging**: :attr:`weights` holds the effective weight of each task at the last step,
      :math:`\partial\,\text{total} / \partial L_k`, as tensors (no sync until you ask).
      :class:`~balanced_losses.GradientBalancer` acts in backward, not on the total: its
      weights are the multipliers it applied to each task's gradient at the shared features.
    - **Distributed**: with ``sync_dist=True`` (the default) and an initialized multi-rank
      process group, the losses that enter statistics are first averaged over ranks, so every
      rank keeps the same statistics and applies the same weights.
    - **Checkpoints**: all state needed to resume lives in ``state_dict``; ``_version`` lets old
      checkpoints be upgraded in :meth:`_upgrade_state_dict`.

    Args:
        tasks: Task names, in order.
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

    _version: int = 1
    #: Lowest loss value a subclass accepts under ``check_inputs``: None (any finite value),
    #: "nonnegative" or "positive".
    _loss_domain: str | None = "nonnegative"

    last_weights: Tensor
    _all_present: Tensor

    def __init__(
        self,
        tasks: Iterable[str],
        *,
        allow_missing: bool = False,
        check_inputs: bool = False,
        sync_dist: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(tasks, str):
            raise TypeError(f"`tasks` must be a sequence of task names, got the string {tasks!r}")
        names = tuple(tasks)
        if len(names) == 0:
            raise ValueError("a weighting needs at least one task, got none")
        for name in names:
            if not isinstance(name, str) or not name:
                raise ValueError(f"task names must be non-empty strings, got {name!r}")
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"task names must be unique, got duplicates {duplicates}")
        self._tasks = names
        self._index = {name: i for i, name in enumerate(names)}
        self.allow_missing = bool(allow_missing)
        self.check_inputs = bool(check_inputs)
        self.sync_dist = bool(sync_dist)
        # Output only, recomputed every step: not needed to resume, so not persistent.
        self.register_buffer("last_weights", torch.zeros(len(names)), persistent=False)
        self.register_buffer(
            "_all_present", torch.ones(len(names), dtype=torch.bool), persistent=False
        )

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

    def reset(self) -> None:
        """Forget everything learned or tracked, as if freshly constructed."""
        self.last_weights.zero_()

    # ------------------------------------------------------------------ helpers for subclasses

    def _unknown(self, names: Iterable[str]) -> KeyError:
        unknown = sorted(set(names) - set(self._tasks))
        label = "task" if len(unknown) == 1 else "tasks"
        shown = ", ".join(f"`{name}`" for name in unknown)
        return KeyError(f"unknown {label} {shown}; expected one of {list(self._tasks)}")

    def _stack(self, losses: Mapping[str, Tensor | None]) -> tuple[Tensor, Tensor]:
        """Stack a loss mapping into ``(values, present)``, both of shape ``(K,)``.

        ``values`` is differentiable, in the losses' floating dtype promoted to at least float32;
        absent entries are 0. ``present`` is boolean.
        """
        if not isinstance(losses, Mapping):
            raise TypeError(
                f"`losses` must be a mapping from task name to scalar loss, got {type(losses)}"
            )
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
            if not isinstance(loss, Tensor):
                raise TypeError(f"loss of task `{name}` must be a Tensor, got {type(loss)}")
            if loss.dim() != 0:
                raise ValueError(
                    f"loss of task `{name}` must be a scalar (0-dim) tensor, got shape "
                    f"{tuple(loss.shape)}; reduce it first"
                )
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
        return values, present

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

    def _record(self, weights: Tensor, present: Tensor) -> None:
        """Store the effective weights of this step for :attr:`weights` (0 for absent tasks)."""
        # Logging only: the stored copy must not keep the graph alive.
        shown = torch.where(present, weights.detach(), torch.zeros_like(weights.detach()))
        self.last_weights.copy_(shown)

    def _apply(self, fn: Any, recurse: bool = True) -> Weighting:
        # `model.half()` / `model.to(torch.bfloat16)` reach a weighting that is a submodule of
        # the model. Half-precision statistics stop moving (an EMA update below the dtype's
        # resolution rounds away) and Adam's eps underflows, so buffers stay at least float32.
        # Devices still move, and `.double()` still widens.
        super()._apply(fn, recurse)  # type: ignore[no-untyped-call]
        for name, buffer in self._buffers.items():
            if buffer is not None and buffer.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = buffer.float()
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
        if version is None or version < self._version:
            self._upgrade_state_dict(state_dict, prefix, 0 if version is None else version)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        """Hyperparameters shown in the module's repr."""
        return f"tasks={list(self._tasks)}"
