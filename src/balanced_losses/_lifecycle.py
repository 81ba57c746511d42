"""The calls a training loop makes around the optimizer step, as no-ops a method may override.

A loop written once for every method calls :meth:`Lifecycle.after_step` after each optimizer
step and :meth:`Lifecycle.epoch_end` at the end of each epoch. Most methods do nothing there;
a method that learns from the change of the losses over a step (``FAMO``) or keeps per-epoch
statistics (``DWA``) overrides the call it needs, so the loop never asks which method it runs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import Tensor

__all__ = ["Lifecycle", "StepLosses"]

#: The losses after an optimizer step: a mapping, or a function that computes one on demand.
StepLosses = Mapping[str, "Tensor | None"] | Callable[[], Mapping[str, "Tensor | None"]]


class Lifecycle:
    """The loop's calls around the optimizer step; both are no-ops unless a method needs them."""

    def after_step(self, losses: StepLosses) -> None:
        """Call after each optimizer step with the losses recomputed on the same batch.

        A no-op, except for methods that learn from how much each loss fell over the step
        (``FAMO``). Pass a function that returns the losses to compute them only when the
        method needs them: the others never call it, so a generic loop pays nothing.

        Args:
            losses: Task name to the loss on the step's batch after the optimizer step, or a
                function of no arguments that returns that mapping (called under
                ``torch.no_grad()``).
        """

    def epoch_end(self) -> None:
        """Call once at the end of each training epoch.

        A no-op, except for methods whose weights follow per-epoch statistics (``DWA``).
        """
