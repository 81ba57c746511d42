"""The pointer/countdown problem on the demo's own generator: the regime DBMTL lost a seed in.

Everything is problem 1's (``pointer_countdown``: the GRU, the heads, the losses, the setup's
budget) except the generator: events start anywhere in bars 10-70 and last 10-30 bars, as in
``examples/pointer_countdown.py``. Measured outside the suite, ``DBMTL`` at its defaults lost the
countdown on one seed in five here (Δm +90 %), which the calibrated generator of problem 1 did
not show. It is a development problem: the failure it shows was known before it was added, and
``benchmarks/failure_modes.py`` logs that failure step by step.
"""

from __future__ import annotations

import sys
from pathlib import Path

from problems import Split
from problems.pointer_countdown import PointerCountdown

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
import _pointer_countdown_lib as lib


class UserRegime(PointerCountdown):
    name = "user_regime"
    title = "pointer/countdown on the demo's generator (events anywhere in bars 10-70)"

    @staticmethod
    def _split(n: int, seed: int) -> Split:
        b = lib.make_data(n, seed=seed)
        targets = {"pointer": b.pointer, "countdown": b.countdown, "start": b.start, "end": b.end}
        return Split(b.x, targets)


PROBLEM = UserRegime()
