"""Real physiological waveform: pointer/countdown on the beats of a recording shipped in aeon.

Held-out problem: its code, data and budget were committed before any method ran on it; the git
history shows the order.

The recording is series 135 of the UCR anomaly archive, InternalBleeding16 (Keogh et al.,
"Multi-dataset Time-Series Anomaly Detection Competition", SIGKDD 2021), which aeon ships in its
wheel (``aeon/datasets/data/KDD-TSAD_135/135_UCR_Anomaly_InternalBleeding16_{TRAIN,TEST}.csv``,
columns timestamp,value,is_anomaly); it is read from the installed package, so nothing is
downloaded. It is a pulsatile, blood-pressure-like waveform (values 56-104) with one beat every
~183 samples. The TEST file is the whole recording (7501 samples); the TRAIN file is not a
separate part of it but its first 1200 samples again (the archive's anomaly-free training
prefix; ``data()`` checks that), so only the TEST file is used: concatenating the two would
repeat 1200 samples and put a jump at the seam. The archive marks 12 samples (4187-4198) as the
anomaly; they stay in (they fall in the training part) and are not used as a label.

The problem has the shape of ``pointer_countdown`` (two Huber losses, one in its quadratic
regime with 2 outputs, one in its linear regime with one output per step), on real data:

- The series is downsampled by 2 (the mean of each pair; the last, unpaired sample is dropped):
  3750 steps, one beat every ~91 steps. The first 70% (2625 steps) is the training part, the
  rest (1125 steps) the validation part; values are standardized with the training part's mean
  and standard deviation.
- Events: each beat's systolic peak (``scipy.signal.find_peaks`` with a distance of 60 steps and
  a prominence of half the training part's 5th-95th percentile range, about 20, where beats rise
  by 33-40: any prominence from 1 to 33 finds the same peaks) and its onset, the minimum between
  the previous peak and this one. 41 peaks are found, so 40 beats have an onset
  (the first peak has no previous peak: it is dropped as an event, but its falling phase counts).
  Onsets come 25-27 steps before their peaks.
- Windows of T=128 steps, every 2 steps in the training part and every 4 in the validation part;
  no window crosses the boundary. A window's event is the first onset inside it whose peak is
  inside it too; windows without one are dropped: 1234 training windows are kept and 15 dropped
  (the first 15: the first peak has no onset), 250 validation windows are kept and none dropped
  (``dropped`` lists what is dropped; each ``data()`` fills ``counts``).
- Inputs per step: the standardized value and its first difference (scaled to unit standard
  deviation on the training part; 0 at each part's first step, so no step reads across the
  boundary).

Tasks, on a trunk of dilated 1-D convolutions (per-step features, receptive field 63 steps):

- ``pointer``: (onset, peak) position / T, 2 outputs, Huber loss (delta 1): small residuals,
  Huber's quadratic regime; head: the mean over time, then a linear layer; metric: MAE in steps.
- ``countdown``: clip(onset - t, -20, 20) at every step t (signed steps until the onset), 128
  outputs, Huber loss (delta 1): large residuals, Huber's linear regime; head: a linear layer
  per step; metric: MAE in steps.
- ``phase``: the window's last step is 0 rising (from an onset up to its peak, the peak
  excluded), 1 falling (the peak and the 29 steps after it) or 2 resting (otherwise);
  cross-entropy; head: the last step's features, then a linear layer; metric: error rate (%).

The budget (Adam at 1e-3, batch 32, 15 epochs) was fixed before any run.
"""

from __future__ import annotations

from collections.abc import Mapping
from itertools import pairwise
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import Budget, Split, TaskModel, aeon_data, predict

__all__ = ["PROBLEM", "BloodPressure"]

_FILE = "135_UCR_Anomaly_InternalBleeding16_{}.csv"
_RAW = 7501  # samples in the TEST file, the whole recording
_PREFIX = 1200  # samples in the TRAIN file, the recording's first 1200
_DOWNSAMPLE = 2
T = 128
_TRAIN_FRACTION = 0.7
_STRIDES = (2, 4)  # window strides in the training and the validation part
_DISTANCE = 60  # find_peaks: at least 60 steps between peaks (beats come every ~91)
_CLIP = 20.0
_FALLING = 30  # steps from a peak (itself included) that are "falling"
_PHASES = 3  # rising, falling, resting
_SMOKE = (48, 24)


def _data_dir() -> Path:
    return aeon_data("blood_pressure", "KDD-TSAD 135 files", "KDD-TSAD_135")


def _read_values(path: Path) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"blood_pressure: the data file {path} is missing")
    table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 3 or not np.isfinite(table).all():
        raise ValueError(f"blood_pressure: {path} is not a finite timestamp,value,is_anomaly table")
    return table[:, 1]


def _load_recording() -> np.ndarray:
    """The whole recording, 7501 raw samples (the TEST file; the TRAIN file is its prefix)."""
    folder = _data_dir()
    train_path, test_path = folder / _FILE.format("TRAIN"), folder / _FILE.format("TEST")
    prefix, values = _read_values(train_path), _read_values(test_path)
    if (
        len(values) != _RAW
        or len(prefix) != _PREFIX
        or not np.array_equal(prefix, values[:_PREFIX])
    ):
        raise ValueError(
            f"blood_pressure: expected {test_path} to hold {_RAW} samples and {train_path} its "
            f"first {_PREFIX}; got {len(values)} and {len(prefix)} samples"
        )
    return values


def _events(
    series: np.ndarray, cut: int, distance: int = _DISTANCE
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All peaks, and the (onset, peak) of every beat that has a previous peak."""
    from scipy.signal import find_peaks

    low, high = np.percentile(series[:cut], [5, 95])
    # Half the training part's 5th-95th percentile range (about 20; beats rise by 33-40).
    peaks, _ = find_peaks(series, distance=distance, prominence=0.5 * (high - low))
    onsets = np.array([a + int(np.argmin(series[a:b])) for a, b in pairwise(peaks)])
    return peaks, onsets, peaks[1:]


def _phases(length: int, peaks: np.ndarray, onsets: np.ndarray, beat_peaks: np.ndarray) -> Tensor:
    """The phase of every step: 0 rising, 1 falling, 2 resting."""
    phase = torch.full((length,), 2, dtype=torch.long)
    for peak in peaks:
        phase[peak : peak + _FALLING] = 1
    for onset, peak in zip(onsets, beat_peaks, strict=True):
        phase[onset:peak] = 0
    return phase


class _Encoder(nn.Module):
    """Dilated 1-D convolutions over (batch, T, channels): per-step features (batch, T, 32)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv1d(channels, 32, 3, padding="same"), nn.ReLU()]
        for dilation in (2, 4, 8, 16):
            layers += [nn.Conv1d(32, 32, 3, dilation=dilation, padding="same"), nn.ReLU()]
        self.convs = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.convs(x.transpose(1, 2)).transpose(1, 2)
        return out


class _MeanOverTime(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(1)


class _LastStep(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x[:, -1]


class _Model(TaskModel):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.trunk = _Encoder(channels)
        self.pointer = nn.Sequential(_MeanOverTime(), nn.Linear(32, 2))
        self.countdown = nn.Sequential(nn.Linear(32, 1), nn.Flatten(1))  # (batch, T)
        self.phase = nn.Sequential(_LastStep(), nn.Linear(32, _PHASES))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.trunk(x)
        return {
            "pointer": self.pointer(features),
            "countdown": self.countdown(features),
            "phase": self.phase(features),
        }


class BloodPressure:
    """Windows of a pulsatile waveform: point at a beat, count down to it, name the phase."""

    name = "blood_pressure"
    title = "pulse waveform (aeon KDD-TSAD 135), dilated CNN: beat pointer, countdown, phase"
    tasks = ("pointer", "countdown", "phase")
    # Cross-entropy is one number per sample (not a mean over the 3 logits), so its size is 1.
    output_sizes: Mapping[str, int] = {"pointer": 2, "countdown": T, "phase": 1}
    metrics: Mapping[str, str] = {
        "pointer": "MAE (steps)",
        "countdown": "MAE (steps)",
        "phase": "error rate (%)",
    }
    #: The smallest non-zero value of each error-rate metric (one validation sample, in %), for
    #: Δm when a task trained alone scores 0. Added after the held-out runs began, when
    #: blood_pressure's phase trained alone scored 0 % on a seed; it changes nothing else.
    metric_floor: Mapping[str, float] = {"phase": 100 / 250}
    #: Fixed before any method ran on this problem (held out): not tuned.
    budget = Budget(epochs=15, batch_size=32, lr=1e-3)
    #: What ``data()`` drops, counted once by hand; ``counts`` is filled by each ``data()``.
    dropped: Mapping[str, int] = {
        "raw samples (the TRAIN file, a repeat of the TEST file's first 1200)": 1200,
        "raw samples (the last, unpaired one, at downsampling)": 1,
        "peaks without an onset (the first)": 1,
        # The first 15 (starts 0-28): the first peak has no onset, the next beat ends at 157.
        "training windows without an event": 15,
        "validation windows without an event": 0,
    }

    #: Input channels per step.
    channels = 2

    def __init__(self) -> None:
        #: Sizes and counts of the last ``data()``: steps, peaks, beats, windows kept and dropped.
        self.counts: dict[str, int] = {}

    def _recording(self) -> tuple[Tensor, int, np.ndarray, np.ndarray, np.ndarray]:
        """Inputs per step ``(steps, channels)``, the training part's length, and the events:
        every peak, and the (onset, peak) of each beat."""
        raw = _load_recording()
        pairs = len(raw) // _DOWNSAMPLE
        series = raw[: pairs * _DOWNSAMPLE].reshape(pairs, _DOWNSAMPLE).mean(1)
        cut = round(_TRAIN_FRACTION * len(series))
        peaks, onsets, beat_peaks = _events(series, cut)

        values = torch.as_tensor(series)
        values = (values - values[:cut].mean()) / values[:cut].std()
        parts = (values[:cut], values[cut:])
        diffs = [torch.cat([torch.zeros(1, dtype=part.dtype), part.diff()]) for part in parts]
        diff_std = parts[0].diff().std()
        x = torch.stack([values, torch.cat(diffs) / diff_std], dim=1).float()  # (steps, 2)
        return x, cut, peaks, onsets, beat_peaks

    def data(self, *, smoke: bool = False) -> tuple[Split, Split]:
        x, cut, peaks, onsets, beat_peaks = self._recording()
        steps = len(x)
        phase = _phases(steps, peaks, onsets, beat_peaks)
        splits, kept = [], []
        bounds = ((0, cut), (cut, steps))
        for (lo, hi), stride in zip(bounds, _STRIDES, strict=True):
            starts = list(range(lo, hi - T + 1, stride))
            split = self._windows(x, phase, onsets, beat_peaks, starts)
            kept.append((len(starts), len(split)))
            splits.append(split)
        self.counts = {
            "steps": steps,
            "training steps": cut,
            "peaks": len(peaks),
            "beats": len(onsets),
            "training windows": kept[0][1],
            "training windows dropped": kept[0][0] - kept[0][1],
            "validation windows": kept[1][1],
            "validation windows dropped": kept[1][0] - kept[1][1],
        }
        train, val = splits
        if smoke:
            train = train.take(torch.arange(_SMOKE[0]))
            val = val.take(torch.arange(_SMOKE[1]))
        return train, val

    @staticmethod
    def _windows(
        x: Tensor, phase: Tensor, onsets: np.ndarray, beat_peaks: np.ndarray, starts: list[int]
    ) -> Split:
        """The windows starting at ``starts`` that hold an event (an onset and its peak)."""
        kept, events = [], []
        for start in starts:
            inside = (onsets >= start) & (beat_peaks < start + T)
            if inside.any():
                beat = int(np.argmax(inside))  # the first onset whose peak is inside too
                kept.append(start)
                events.append((int(onsets[beat]) - start, int(beat_peaks[beat]) - start))
        begin = torch.tensor(kept, dtype=torch.long)
        index = begin[:, None] + torch.arange(T)
        event = torch.tensor(events, dtype=torch.long)  # (n, 2) positions in the window
        onset = event[:, :1].float()
        countdown = (onset - torch.arange(T).float()).clamp(-_CLIP, _CLIP)
        targets = {
            "pointer": event.float() / T,
            "countdown": countdown,
            "phase": phase[begin + T - 1],
            # Not tasks: the window's first step in the downsampled series, and the positions.
            "start": begin,
            "event": event,
        }
        return Split(x[index], targets)

    def model(self) -> TaskModel:
        return _Model(self.channels)

    def losses(self, outputs: Mapping[str, Tensor], batch: Split) -> dict[str, Tensor]:
        y = batch.targets
        return {
            "pointer": F.huber_loss(outputs["pointer"], y["pointer"], delta=1.0),
            "countdown": F.huber_loss(outputs["countdown"], y["countdown"], delta=1.0),
            "phase": F.cross_entropy(outputs["phase"], y["phase"]),
        }

    def evaluate(self, model: TaskModel, split: Split) -> dict[str, float]:
        out = predict(model, split.x)
        y = split.targets
        wrong = out["phase"].argmax(1) != y["phase"]
        return {
            "pointer": (out["pointer"] * T - y["event"].float()).abs().mean().item(),
            "countdown": (out["countdown"] - y["countdown"]).abs().mean().item(),
            "phase": 100.0 * wrong.float().mean().item(),
        }

    def constant_outputs(self, train: Split) -> dict[str, Tensor]:
        """Per task, the one output row (no batch axis) that a model ignoring its input predicts.

        The training targets' mean for a regression output, log class frequencies as logits for
        a class, the logit of the positive rate for a binary target.
        """
        y = train.targets
        counts = torch.bincount(y["phase"], minlength=_PHASES).float()
        # An absent class gets a frequency of 1e-6 (a finite logit) instead of log(0).
        return {
            "pointer": y["pointer"].mean(0),
            "countdown": y["countdown"].mean(0),
            "phase": (counts / counts.sum()).clamp(min=1e-6).log(),
        }


PROBLEM = BloodPressure()
