"""Real gait recording: pointer/countdown on the steps of an accelerometer recording in aeon.

Held-out problem of the default study's second round: its code, data and budget were committed
before any method ran on it; the git history shows the order.

The recording is S06R02E0 of the Daphnet freezing-of-gait data set (Bachlin et al., "Wearable
assistant for Parkinson's disease patients with the freezing of gait symptom", IEEE TITB 2010),
which aeon ships in its wheel (``aeon/datasets/data/Daphnet_S06R02E0/S06R02E0.csv``: a
timestamp, nine acceleration channels from sensors at the ankle, the thigh and the trunk, each
forward, vertical and lateral, in mg, and an ``is_anomaly`` column); it is read from the
installed package, so nothing is downloaded. 7040 samples at 64 Hz, 110 s of walking; the
recording has no freezing episode (``is_anomaly`` is 0 throughout, which ``data()`` checks),
so that column is not used.

The problem has the shape of ``blood_pressure`` (a pointer with 2 outputs in Huber's quadratic
regime, a per-step countdown in its linear regime, a phase class read at the last step), on
another signal, sensor and rhythm:

- Events: the strides, found on the ankle's vertical acceleration smoothed by a moving mean of
  8 samples: its peaks (``scipy.signal.find_peaks`` with a distance of 40 steps and a prominence
  of half the training part's 5th-95th percentile range), and each stride's onset, the minimum
  between the previous peak and this one. 77 peaks are found, so 76 strides have an onset;
  peaks come every 64-71 steps (quartiles), onsets 12-79 steps before their peaks (5th-95th
  percentiles).
- The first 70% (4928 steps) is the training part, the rest (2112 steps) the validation part.
- Windows of T=128 steps (2 s), every 2 steps in the training part and every 4 in the
  validation part; no window crosses the boundary. A window's event is the first onset inside
  it whose peak is inside it too; windows without one are dropped: 1500 training windows are
  kept and 901 dropped, 443 validation windows kept and 54 dropped (``dropped`` lists what is
  dropped; each ``data()`` fills ``counts``).
- Inputs per step: the nine channels, each standardized with the training part's mean and
  standard deviation.

Tasks, on the same trunk of dilated 1-D convolutions as ``blood_pressure`` (nine input
channels): ``pointer`` ((onset, peak) / T, mean over time then linear; MAE in steps),
``countdown`` (clip(onset - t, -20, 20) at every step, a linear layer per step; MAE in steps)
and ``phase`` (at the window's last step: 0 rising from an onset to its peak, 1 the peak and
the 29 steps after it, 2 otherwise; cross-entropy on the last step's features; error rate).

The budget (Adam at 1e-3, batch 32, 15 epochs, as ``blood_pressure``) was fixed before any run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from . import Budget, aeon_data
from .blood_pressure import BloodPressure, _events

__all__ = ["PROBLEM", "Gait"]

_SAMPLES = 7040
_CHANNELS = 9
_TRAIN_FRACTION = 0.7
_SMOOTH = 8  # samples in the moving mean before the peaks are found
_DISTANCE = 40  # find_peaks: at least 40 steps between stride peaks (they come every ~67)
_VERTICAL_ANKLE = 1  # the channel the strides are found on


def _data_file() -> Path:
    return aeon_data("gait", "Daphnet S06R02E0 file", "Daphnet_S06R02E0") / "S06R02E0.csv"


def _load_recording() -> np.ndarray:
    """The nine acceleration channels, ``(7040, 9)``, after checking the file's shape."""
    path = _data_file()
    if not path.is_file():
        raise FileNotFoundError(f"gait: the data file {path} is missing")
    table = np.genfromtxt(path, delimiter=",", skip_header=1, usecols=range(1, 11))
    if table.shape != (_SAMPLES, _CHANNELS + 1) or not np.isfinite(table).all():
        raise ValueError(
            f"gait: expected {path} to hold {_SAMPLES} rows of {_CHANNELS} finite channels and "
            f"an is_anomaly column; got shape {table.shape}"
        )
    if table[:, -1].any():
        raise ValueError(f"gait: {path} marks freezing episodes; this problem assumes none")
    return table[:, :_CHANNELS]


class Gait(BloodPressure):
    """Windows of walking: point at a stride, count down to it, name its phase."""

    name = "gait"
    title = "gait accelerometers (aeon Daphnet S06R02E0), dilated CNN: stride pointer, countdown"
    channels = _CHANNELS
    #: One validation window of the error-rate metric (in %), for Δm when a task trained alone
    #: scores 0; the count is checked by the tests.
    metric_floor: Mapping[str, float] = {"phase": 100 / 443}
    #: Fixed before any method ran on this problem (held out): not tuned.
    budget = Budget(epochs=15, batch_size=32, lr=1e-3)
    #: What ``data()`` drops, counted once by hand; ``counts`` is filled by each ``data()``.
    dropped: Mapping[str, int] = {
        "the is_anomaly column (0 throughout)": 1,
        "peaks without an onset (the first)": 1,
        # Onsets come up to 79 steps before their peaks: many windows hold no whole stride.
        "training windows without an event": 901,
        "validation windows without an event": 54,
    }

    def _recording(self) -> tuple[Tensor, int, np.ndarray, np.ndarray, np.ndarray]:
        raw = _load_recording()
        cut = round(_TRAIN_FRACTION * len(raw))
        kernel = np.ones(_SMOOTH) / _SMOOTH
        vertical = np.convolve(raw[:, _VERTICAL_ANKLE], kernel, mode="same")
        peaks, onsets, beat_peaks = _events(vertical, cut, _DISTANCE)
        values = torch.as_tensor(raw)
        mean, std = values[:cut].mean(0), values[:cut].std(0)
        x = ((values - mean) / std).float()  # (steps, 9)
        return x, cut, peaks, onsets, beat_peaks


PROBLEM = Gait()
