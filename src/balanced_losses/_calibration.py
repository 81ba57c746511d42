"""Calibrate, then freeze: the lifecycle shared by the two calibrated methods.

``CalibratedBalancer`` (norms at the shared features) and ``CalibratedWeighting`` (norms at the
shared parameters) measure for their first ``steps`` training steps and then fix the
multipliers they reached. What is common is here, once: the step count (a Python mirror of a
buffer, so that deciding costs no host-device sync), the freeze, the properties a user reads,
and what a reset and a checkpoint load must restore.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from balanced_losses._base import Weighting
from balanced_losses._checks import check_count

__all__ = ["FreezeAfterCalibration"]


class FreezeAfterCalibration(Weighting):
    """Counts training steps and fixes the multipliers after ``steps`` of them.

    A subclass calls :meth:`_declare_calibration` in its ``__init__``, gives :meth:`_scales` (the
    multipliers its statistics give now), calls :meth:`_count_step` once per training step and
    :meth:`_freeze_if_calibrated` before it decides whether to measure.
    """

    steps: int
    steps_done: Tensor
    frozen_scale: Tensor

    def _declare_calibration(self, steps: int) -> None:
        self.steps = check_count("steps", steps)
        self._add_state("steps_done", torch.zeros((), dtype=torch.long), task_axis=None)
        self._add_state("frozen_scale", torch.ones(len(self.tasks)))

    if TYPE_CHECKING:  # each subclass's own; a stub here would shadow a base's in the MRO

        def _scales(self) -> Tensor: ...

    def _reset_python_state(self) -> None:
        super()._reset_python_state()
        # Training steps counted so far, and whether they reached ``steps``: Python values, so
        # that deciding costs no host-device sync (``steps_done`` mirrors the count).
        self._python_steps = 0
        self._frozen = False

    @property
    def frozen(self) -> bool:
        """Whether the calibration is over and the weights are fixed."""
        return self._frozen

    @property
    def frozen_weights(self) -> Tensor:
        r"""The multipliers :math:`s_k` frozen at the end of the calibration (1 before it)."""
        return self.frozen_scale.clone()

    def _freeze_if_calibrated(self) -> None:
        """At the first training call after ``steps`` measured steps, fix the multipliers."""
        if not self._frozen and self._updating and self._python_steps >= self.steps:
            self._freeze()

    def _freeze(self) -> None:
        with torch.no_grad():
            self.frozen_scale.copy_(self._scales())
        self._frozen = True

    def _count_step(self) -> None:
        """Count a training step (after the calibration too: a checkpoint says when it froze)."""
        if self._updating:
            self._python_steps += 1
            self.steps_done.add_(1)

    def reset_running_stats(self) -> None:
        """Forget the statistics and the frozen weights: the next steps calibrate again."""
        super().reset_running_stats()
        self._python_steps = 0
        self._frozen = False

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args)
        # Loading is not a training step: reading the count on the host costs nothing here.
        self._python_steps = int(self.steps_done)
        self._frozen = False
        if self._python_steps >= self.steps:
            # Saved between the last calibration step and the freeze, the stored multipliers
            # are still the initial ones; the statistics, which no longer move, give the
            # frozen ones.
            self._freeze()
