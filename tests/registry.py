"""Every public loss weighting, built the same way, for the suites that must cover all of them.

A :class:`Case` builds a weighting for given task names and knows the calls a training loop makes
around it (an epoch-end ``step()``, an ``update()`` after the optimizer step). Adding a weighting
to the package means adding one entry here; compile, resume, AMP, DDP and fuzz tests pick it up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

import balanced_losses as bl


@dataclass(frozen=True)
class Case:
    """How to build one weighting and drive it like a training loop does."""

    name: str
    #: ``build(tasks, allow_missing)`` returns a fresh weighting.
    build: Callable[[Sequence[str], bool], bl.Weighting]
    #: Losses must be > 0 (the method takes logs or products).
    positive: bool = False
    #: Called after each optimizer step with the losses of the step (FAMO's ``update``).
    after_step: Callable[[bl.Weighting, Mapping[str, Tensor]], None] | None = None
    #: Called every ``epoch_length`` steps (DWA's ``step``).
    epoch_end: Callable[[bl.Weighting], None] | None = None
    epoch_length: int = 3

    def __str__(self) -> str:
        return self.name


def _sizes(tasks: Sequence[str]) -> dict[str, int]:
    return {t: 1 + 13 * i for i, t in enumerate(tasks)}


CASES: list[Case] = [
    Case("LossNormalizer", lambda t, m: bl.LossNormalizer(_sizes(t), allow_missing=m)),
    Case(
        "LossNormalizer-none",
        lambda t, m: bl.LossNormalizer(_sizes(t), correction="none", momentum=0.0, allow_missing=m),
    ),
    Case(
        "LossNormalizer-accumulate",  # resumed mid-window by the checkpoint test
        lambda t, m: bl.LossNormalizer(_sizes(t), accumulation_steps=3, allow_missing=m),
    ),
    Case("UncertaintyWeighting", lambda t, m: bl.UncertaintyWeighting(t, allow_missing=m)),
    Case(
        "UncertaintyWeighting-positive",
        lambda t, m: bl.UncertaintyWeighting(
            t,
            regularizer="positive",
            output_sizes=_sizes(t),
            correction="sqrt",
            allow_missing=m,
        ),
    ),
    Case(
        "DWA",
        lambda t, m: bl.DWA(t, allow_missing=m),
        epoch_end=lambda w: w.step(),  # type: ignore[operator]
    ),
    Case("RLW", lambda t, m: bl.RLW(t, seed=0, allow_missing=m)),
    Case("IMTLL", lambda t, m: bl.IMTLL(t, allow_missing=m)),
    Case(
        "FAMO",
        lambda t, m: bl.FAMO(t, allow_missing=m),
        positive=True,
        after_step=lambda w, losses: w.update(losses),  # type: ignore[operator]
    ),
    Case("GeometricMean", lambda t, m: bl.GeometricMean(t, allow_missing=m), positive=True),
    Case("DBMTL", lambda t, m: bl.DBMTL(t, allow_missing=m, balance_features=False), positive=True),
]


def learnable(weighting: nn.Module) -> list[nn.Parameter]:
    """Parameters a training loop must give its optimizer."""
    return [p for p in weighting.parameters() if p.requires_grad]
