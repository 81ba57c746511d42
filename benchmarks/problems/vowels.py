"""Spoken vowels: six tasks of mixed kinds on JapaneseVowels, shipped inside aeon; a GRU trunk.

Held-out problem (round 3 of the default study): its code, data and budget were committed
before any method ran on it; the git history shows the order.

JapaneseVowels (Kudo, Toyama and Shimbo, "Multidimensional curve classification using
passing-through regions", Pattern Recognition Letters 20, 1999; in the UCI and UEA archives)
holds 640 utterances of the vowel /ae/ by 9 male speakers: 12 LPC cepstrum coefficients per
frame, 7 to 29 frames per utterance. aeon ships the files in its wheel
(``aeon/datasets/data/JapaneseVowels/JapaneseVowels_{TRAIN,TEST}.ts``: 270 + 370 utterances,
each with all 12 channels of one length); they are read from the installed package, so nothing
is downloaded.

The official split is pooled and shuffled once by a fixed permutation (data seed 1999): 480
training and 160 validation utterances. Each channel is standardized with the mean and standard
deviation of the training utterances' frames. Utterances are padded with zeros to 29 frames;
the input is the 12 standardized channels plus Gaussian noise of standard deviation 0.3 (drawn
once, from the data seed), with a 13th channel that is 1 on an utterance's frames and 0 on its
padding. The trunk is a linear layer (12 -> 64) and a one-layer GRU (64 units) over the 12
noisy channels; it outputs the GRU's state at every frame. The GRU is causal, so the padding
after an utterance never reaches its frames. Six tasks, each with one linear head:

- ``speaker``: which of the 9 speakers (cross-entropy), from the state at the utterance's last
  frame; metric: error rate (%);
- ``next_frame``: at every frame but the last, the next frame's 12 clean channels (mean squared
  error over the utterance's frames and channels); metric: RMSE;
- ``remaining``: at every frame, the frames left to the utterance's end (0 to 28; Huber loss,
  delta 1, over the utterance's frames: mostly its linear regime); metric: MAE in frames;
- ``denoise``: at every frame, its 12 clean channels (mean squared error over the utterance's
  frames and channels); metric: RMSE;
- ``profile``: the utterance's mean of each clean channel (12 outputs, mean squared error), from
  the state at the last frame; metric: RMSE;
- ``long``: whether the utterance has more frames than the training utterances' median, 15
  (1 logit, binary cross-entropy with logits), from the state at the last frame; metric: error
  rate (%).

So the tasks read the features differently: three from one frame per utterance, three from
every frame, with losses that are means over 1 to about 190 elements per utterance. Metrics are
in standardized units except ``remaining``'s. Nothing is dropped (every utterance has 12
channels of one length, 7 to 29 frames). ``smoke=True`` keeps the first 32 training and the
first 24 validation utterances of the same split.

The budget (Adam at 2e-3, batch 32, 40 epochs: 600 steps) was fixed before any run.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from . import Budget, Split, TaskModel, aeon_data, constant_row, predict

__all__ = ["PROBLEM", "Vowels"]

#: The fixed seed of the permutation and the input noise: it does not depend on the run's seed.
_DATA_SEED = 1999
_UTTERANCES = 640  # 270 + 370
_TRAIN = 480  # the other 160 are the validation utterances
_SMOKE = (32, 24)
_CHANNELS = 12
_FRAMES = 29  # the longest utterance; shorter ones are padded
_SPEAKERS = 9
_NOISE = 0.3  # in standardized units
_WIDTH = 64
_PER_FRAME = ("next_frame", "remaining", "denoise")


def _data_dir() -> Path:
    return aeon_data("vowels", "JapaneseVowels files", "JapaneseVowels")


def _read_ts(path: Path) -> tuple[list[list[list[float]]], list[int]]:
    """Utterances (channels x frames) and labels of a multivariate .ts file.

    Each data row is ``c1_1,...,c1_n:c2_1,...:...:c12_n:label``: the 12 channels of one
    utterance, each of the utterance's length, then the speaker (1 to 9).
    """
    if not path.is_file():
        raise FileNotFoundError(f"vowels: the data file {path} is missing")
    utterances, labels = [], []
    in_data = False
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            in_data = line.lower() == "@data"
            continue
        *channels, label = line.split(":")
        values = [[float(v) for v in channel.split(",")] for channel in channels]
        lengths = {len(v) for v in values}
        if len(values) != _CHANNELS or len(lengths) != 1:
            raise ValueError(
                f"vowels: {path.name} line {number}: expected {_CHANNELS} channels of one "
                f"length, got {len(values)} channels of lengths {sorted(lengths)}"
            )
        utterances.append(values)
        labels.append(int(label))
    return utterances, labels


def _load() -> tuple[Tensor, Tensor, Tensor]:
    """All 640 utterances, TRAIN then TEST: frames (640, 29, 12) zero-padded, lengths, speakers."""
    folder = _data_dir()
    utterances, labels = [], []
    for part in ("TRAIN", "TEST"):
        u, y = _read_ts(folder / f"JapaneseVowels_{part}.ts")
        utterances += u
        labels += y
    if len(utterances) != _UTTERANCES:
        raise ValueError(
            f"vowels: expected {_UTTERANCES} utterances in {folder}, got {len(utterances)}"
        )
    frames = torch.zeros(_UTTERANCES, _FRAMES, _CHANNELS, dtype=torch.float64)
    lengths = torch.tensor([len(u[0]) for u in utterances], dtype=torch.long)
    if int(lengths.min()) < 2 or int(lengths.max()) > _FRAMES:
        raise ValueError(
            f"vowels: expected 2 to {_FRAMES} frames, got {lengths.min()}-{lengths.max()}"
        )
    for i, u in enumerate(utterances):
        frames[i, : len(u[0])] = torch.tensor(u, dtype=torch.float64).T
    if not torch.isfinite(frames).all():
        raise ValueError(f"vowels: non-finite values in {folder}")
    speakers = torch.tensor(labels, dtype=torch.long) - 1
    if set(speakers.tolist()) != set(range(_SPEAKERS)):
        raise ValueError(f"vowels: expected speakers 1 to {_SPEAKERS} in {folder}")
    return frames, lengths, speakers


def _mask(x: Tensor) -> Tensor:
    """(n, frames): 1 on an utterance's frames, 0 on its padding (the input's 13th channel)."""
    return x[..., _CHANNELS]


def _last(features: Tensor, mask: Tensor) -> Tensor:
    """(n, width): each utterance's features at its last frame."""
    last = mask.sum(1).long() - 1
    return features[torch.arange(len(features)), last]


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``values`` (n, frames[, channels]) over the frames where ``mask`` is 1."""
    if values.dim() == 3:
        mask = mask.unsqueeze(-1).expand_as(values)
    return (values * mask).sum() / mask.sum()


class _Encoder(nn.Module):
    """A linear layer and a one-layer GRU over the noisy channels: the state at every frame."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(_CHANNELS, _WIDTH)
        self.gru = nn.GRU(_WIDTH, _WIDTH, batch_first=True)

    def forward(self, x: Tensor) -> Tensor:
        states, _ = self.gru(torch.tanh(self.embed(x[..., :_CHANNELS])))
        return states


class _Model(TaskModel):
    # The heads are named ``<task>_head``, not ``<task>``: three of them read one frame of the
    # trunk's output, not all of it, so ``attach`` must not be given them as heads (the suite
    # names a submodule ``<task>`` as a head); it measures each task's gradient through them.
    def __init__(self) -> None:
        super().__init__()
        self.trunk = _Encoder()
        self.speaker_head = nn.Linear(_WIDTH, _SPEAKERS)
        self.next_frame_head = nn.Linear(_WIDTH, _CHANNELS)
        self.remaining_head = nn.Linear(_WIDTH, 1)
        self.denoise_head = nn.Linear(_WIDTH, _CHANNELS)
        self.profile_head = nn.Linear(_WIDTH, _CHANNELS)
        self.long_head = nn.Linear(_WIDTH, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        features = self.trunk(x)  # (n, frames, width)
        last = _last(features, _mask(x))
        return {
            "speaker": self.speaker_head(last),
            "next_frame": self.next_frame_head(features[:, :-1]),  # frame t predicts frame t + 1
            "remaining": self.remaining_head(features).squeeze(-1),
            "denoise": self.denoise_head(features),
            "profile": self.profile_head(last),
            "long": self.long_head(last),
        }


class Vowels:
    """Noisy LPC frames of spoken vowels: a speaker, per-frame regressions and summaries."""

    name = "vowels"
    title = "JapaneseVowels utterances (aeon), GRU on noisy frames: six mixed tasks (held out)"
    tasks = ("speaker", "next_frame", "remaining", "denoise", "profile", "long")
    # Elements per sample each loss is a mean over, at the mean length (15.6 frames): a class
    # or a logit is 1.
    output_sizes: Mapping[str, int] = {
        "speaker": 1,
        "next_frame": round(14.6 * _CHANNELS),
        "remaining": 16,
        "denoise": round(15.6 * _CHANNELS),
        "profile": _CHANNELS,
        "long": 1,
    }
    metrics: Mapping[str, str] = {
        "speaker": "error rate (%)",
        "next_frame": "RMSE (standardized)",
        "remaining": "MAE (frames)",
        "denoise": "RMSE (standardized)",
        "profile": "RMSE (standardized)",
        "long": "error rate (%)",
    }
    #: The smallest non-zero value of each error-rate metric (one validation utterance, in %),
    #: for Δm when a task trained alone scores 0.
    metric_floor: Mapping[str, float] = {"speaker": 100 / 160, "long": 100 / 160}
    #: Fixed before any method ran on this problem (held out): not tuned.
    budget = Budget(epochs=40, batch_size=32, lr=2e-3)
    #: What ``data()`` dropped: nothing.
    dropped: Mapping[str, int] = {"utterances": 0}

    def data(self, *, smoke: bool = False) -> tuple[Split, Split]:
        frames, lengths, speakers = _load()
        generator = torch.Generator().manual_seed(_DATA_SEED)
        order = torch.randperm(_UTTERANCES, generator=generator)
        noise = _NOISE * torch.randn(frames.shape, generator=generator, dtype=torch.float64)
        train_ids, val_ids = order[:_TRAIN], order[_TRAIN:]
        mask = (torch.arange(_FRAMES) < lengths.unsqueeze(1)).to(torch.float64)  # (640, 29)
        train_frames = frames[train_ids][mask[train_ids].bool()]  # (frames, 12): no padding
        frames = (frames - train_frames.mean(0)) / train_frames.std(0) * mask.unsqueeze(-1)
        threshold = lengths[train_ids].median()
        if smoke:
            train_ids, val_ids = train_ids[: _SMOKE[0]], val_ids[: _SMOKE[1]]
        return tuple(  # type: ignore[return-value]
            self._split(frames[ids], mask[ids], lengths[ids], speakers[ids], noise[ids], threshold)
            for ids in (train_ids, val_ids)
        )

    @staticmethod
    def _split(
        frames: Tensor,
        mask: Tensor,
        lengths: Tensor,
        speakers: Tensor,
        noise: Tensor,
        threshold: Tensor,
    ) -> Split:
        """Inputs and targets of some utterances (float64 standardized values; float32 out)."""
        steps = torch.arange(_FRAMES, dtype=torch.float64)
        targets = {
            "speaker": speakers,
            "next_frame": frames[:, 1:].float(),  # zero past the end; masked in the losses
            "remaining": ((lengths.unsqueeze(1) - 1 - steps) * mask).float(),
            "denoise": frames.float(),
            "profile": (frames.sum(1) / lengths.unsqueeze(1)).float(),
            "long": (lengths > threshold).float().unsqueeze(1),  # (n, 1)
        }
        noisy = (frames + noise) * mask.unsqueeze(-1)
        return Split(torch.cat([noisy, mask.unsqueeze(-1)], -1).float(), targets)

    def model(self) -> TaskModel:
        return _Model()

    def losses(self, outputs: Mapping[str, Tensor], batch: Split) -> dict[str, Tensor]:
        y = batch.targets
        mask = _mask(batch.x)
        return {
            "speaker": F.cross_entropy(outputs["speaker"], y["speaker"]),
            "next_frame": _masked_mean(
                F.mse_loss(outputs["next_frame"], y["next_frame"], reduction="none"), mask[:, 1:]
            ),
            "remaining": _masked_mean(
                F.huber_loss(outputs["remaining"], y["remaining"], reduction="none"), mask
            ),
            "denoise": _masked_mean(
                F.mse_loss(outputs["denoise"], y["denoise"], reduction="none"), mask
            ),
            "profile": F.mse_loss(outputs["profile"], y["profile"]),
            "long": F.binary_cross_entropy_with_logits(outputs["long"], y["long"]),
        }

    def evaluate(self, model: TaskModel, split: Split) -> dict[str, float]:
        out = predict(model, split.x)
        y = split.targets
        mask = _mask(split.x)

        def error(wrong: Tensor) -> float:
            return 100.0 * wrong.float().mean().item()

        def rmse(task: str, where: Tensor) -> float:
            return _masked_mean((out[task] - y[task]).pow(2), where).sqrt().item()

        return {
            "speaker": error(out["speaker"].argmax(1) != y["speaker"]),
            "next_frame": rmse("next_frame", mask[:, 1:]),
            "remaining": _masked_mean((out["remaining"] - y["remaining"]).abs(), mask).item(),
            "denoise": rmse("denoise", mask),
            "profile": (out["profile"] - y["profile"]).pow(2).mean().sqrt().item(),
            "long": error((out["long"] > 0).float() != y["long"]),
        }

    def constant_outputs(self, train: Split) -> dict[str, Tensor]:
        """Per task, the one output row (no batch axis) that a model ignoring its input predicts.

        For the per-frame tasks, each frame's mean target over the training utterances that
        reach that frame (a model that knows the frame's index but not the utterance); the
        targets' mean for ``profile``, log class frequencies as logits for ``speaker``, the
        logit of the positive rate for ``long``.
        """
        y = train.targets
        mask = _mask(train.x)
        counts = {
            "next_frame": mask[:, 1:].sum(0).clamp_min(1.0),
            "remaining": mask.sum(0).clamp_min(1.0),
            "denoise": mask.sum(0).clamp_min(1.0),
        }
        rows = {
            # Padding holds zeros in the targets, so the sum over utterances is the valid sum.
            task: y[task].sum(0)
            / (counts[task].unsqueeze(-1) if y[task].dim() == 3 else counts[task])
            for task in _PER_FRAME
        }
        rows["speaker"] = constant_row(y["speaker"], "class", _SPEAKERS)
        rows["profile"] = constant_row(y["profile"], "regression")
        rows["long"] = constant_row(y["long"], "binary")
        return {task: rows[task] for task in self.tasks}


PROBLEM = Vowels()
