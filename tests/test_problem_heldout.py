"""The held-out benchmark problems: data, shapes, an untrained model, constant baselines.

These problems are held out: nothing here trains a model on them. The tests load the data, run
an untrained model forward, check the losses at initialization, and evaluate the constant
prediction of ``constant_outputs`` (which fits nothing: it reads the training targets' means and
frequencies).
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
if not (BENCHMARKS / "problems").is_dir():  # the release check copies tests/ out of the tree
    pytest.skip("benchmarks/ is not here (tests copied out of the tree)", allow_module_level=True)
sys.path.insert(0, str(BENCHMARKS))
from problems import Problem, Split  # noqa: E402

#: Per problem: what it reads (skipped without it), the split sizes (full, smoke), and per task
#: the target's trailing shape, its dtype, and the number of classes (None: not a class index).
SPECS: dict[str, dict[str, Any]] = {
    "newcomer_digits": {
        "needs": ("sklearn",),
        "sizes": ((1200, 597), (48, 24)),
        "x": (64,),
        "targets": {
            "digit": ((), torch.long, 10),
            "parity": ((1,), torch.float32, None),
            "reconstruction": ((64,), torch.float32, None),
        },
        "binary": ("parity",),
    },
    "blood_pressure": {
        "needs": ("aeon", "scipy"),
        "sizes": ((1234, 250), (48, 24)),
        "x": (128, 2),
        "targets": {
            "pointer": ((2,), torch.float32, None),
            "countdown": ((128,), torch.float32, None),
            "phase": ((), torch.long, 3),
        },
        "binary": (),
    },
    "gait": {
        "needs": ("aeon", "scipy"),
        "sizes": ((1500, 443), (48, 24)),
        "x": (128, 9),
        "targets": {
            "pointer": ((2,), torch.float32, None),
            "countdown": ((128,), torch.float32, None),
            "phase": ((), torch.long, 3),
        },
        "binary": (),
    },
    "power_demand": {
        "needs": ("aeon",),
        "sizes": ((800, 296), (32, 24)),
        "x": (18,),
        "targets": {
            "season": ((), torch.long, 2),
            "forecast": ((6,), torch.float32, None),
            "peak_hour": ((), torch.long, 24),
            "daily_mean": ((1,), torch.float32, None),
            "denoise": ((18,), torch.float32, None),
            "high_demand": ((1,), torch.float32, None),
        },
        "binary": ("high_demand",),
    },
    "vowels": {
        "needs": ("aeon",),
        "sizes": ((480, 160), (32, 24)),
        "x": (29, 13),
        "targets": {
            "speaker": ((), torch.long, 9),
            "next_frame": ((28, 12), torch.float32, None),
            "remaining": ((29,), torch.float32, None),
            "denoise": ((29, 12), torch.float32, None),
            "profile": ((12,), torch.float32, None),
            "long": ((1,), torch.float32, None),
        },
        "binary": ("long",),
    },
    "leaves": {
        "needs": ("aeon",),
        "sizes": ((332, 110), (32, 24)),
        "x": (427, 1),
        "targets": {
            "species": ((), torch.long, 6),
            "denoise": ((427,), torch.float32, None),
            "peak": ((1,), torch.float32, None),
            "roughness": ((1,), torch.float32, None),
            "first_half": ((1,), torch.float32, None),
            "tail": ((1,), torch.float32, None),
        },
        "binary": ("first_half",),
    },
}
NAMES = tuple(SPECS)
_DATA: dict[str, tuple[Split, Split]] = {}


def _problem(name: str) -> Problem:
    for module in SPECS[name]["needs"]:
        pytest.importorskip(module, reason=f"the {name} problem reads data shipped with {module}")
    problem: Problem = importlib.import_module(f"problems.{name}").PROBLEM
    return problem


def _data(name: str) -> tuple[Split, Split]:
    """The full split, loaded once per session."""
    if name not in _DATA:
        _DATA[name] = _problem(name).data()
    return _DATA[name]


def _assert_same(a: Split, b: Split) -> None:
    torch.testing.assert_close(a.x, b.x, rtol=0, atol=0)
    assert a.targets.keys() == b.targets.keys()
    for task in a.targets:
        torch.testing.assert_close(a.targets[task], b.targets[task], rtol=0, atol=0)


class _Constant(nn.Module):
    """A model that ignores its input: each task's row, repeated over the batch."""

    def __init__(self, rows: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.trunk = nn.Identity()
        self.rows = dict(rows)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return {task: row.expand(len(x), *row.shape) for task, row in self.rows.items()}


@pytest.mark.parametrize("name", NAMES)
def test_satisfies_the_protocol(name):
    problem = _problem(name)
    assert problem.name == name
    assert problem.tasks == tuple(SPECS[name]["targets"])
    assert set(problem.output_sizes) == set(problem.tasks) == set(problem.metrics)
    assert callable(problem.constant_outputs)  # type: ignore[attr-defined]
    assert "Held-out problem" in (sys.modules[f"problems.{name}"].__doc__ or "")


@pytest.mark.parametrize("name", NAMES)
def test_sizes_shapes_and_dtypes(name):
    spec = SPECS[name]
    full, smoke = _data(name), _problem(name).data(smoke=True)
    for splits, sizes in zip((full, smoke), spec["sizes"], strict=True):
        assert tuple(len(split) for split in splits) == sizes
        for split in splits:
            assert split.x.shape == (len(split), *spec["x"])
            assert split.x.dtype == torch.float32
            assert torch.isfinite(split.x).all()
            for task, (shape, dtype, classes) in spec["targets"].items():
                target = split.targets[task]
                assert target.shape == (len(split), *shape), task
                assert target.dtype == dtype, task
                if classes is not None:
                    assert 0 <= int(target.min()) <= int(target.max()) < classes, task
                else:
                    assert torch.isfinite(target).all(), task
            for task in spec["binary"]:
                assert set(split.targets[task].unique().tolist()) <= {0.0, 1.0}, task
    # The smoke split is the start of the full one.
    for big, small in zip(full, smoke, strict=True):
        _assert_same(big.take(torch.arange(len(small))), small)


@pytest.mark.parametrize("name", NAMES)
def test_data_is_fixed_whatever_the_global_rng(name):
    torch.manual_seed(1)
    first = _data(name)
    torch.manual_seed(2)
    second = _problem(name).data()
    _assert_same(first[0], second[0])
    _assert_same(first[1], second[1])


def _rows(tensor: Tensor) -> set[tuple[float, ...]]:
    return {tuple(row.tolist()) for row in tensor.flatten(1)}


@pytest.mark.parametrize("name", NAMES)
def test_training_and_validation_do_not_overlap(name):
    train, val = _data(name)
    if name == "newcomer_digits":  # load_digits holds no two identical images
        assert _rows(train.x).isdisjoint(_rows(val.x))
        assert len(_rows(train.x)) == len(train)
    elif name in ("vowels", "leaves"):  # the clean series; no two identical in the archive
        assert _rows(train.targets["denoise"]).isdisjoint(_rows(val.targets["denoise"]))
        assert len(_rows(train.targets["denoise"])) == len(train)
    elif name == "power_demand":  # the clean days; the archive holds no two identical days
        train_days = torch.cat([train.targets["denoise"], train.targets["forecast"]], 1)
        val_days = torch.cat([val.targets["denoise"], val.targets["forecast"]], 1)
        assert _rows(train_days).isdisjoint(_rows(val_days))
        assert len(_rows(train_days)) == len(train)
    else:  # windows of one series: every training window ends before any validation one starts
        from problems.blood_pressure import T

        assert int(train.targets["start"].max()) + T <= int(val.targets["start"].min())
        assert int(val.targets["start"].min()) == _problem(name).counts["training steps"]  # type: ignore[attr-defined]


def _head_input(name: str, task: str, features: Tensor, x: Tensor) -> Tensor:
    """What task's head reads of the trunk's output: all of it, but on ``vowels``."""
    if name != "vowels":
        return features
    if task == "next_frame":
        return features[:, :-1]  # frame t predicts frame t + 1
    if task in ("speaker", "profile", "long"):  # each utterance's last frame
        last = x[..., 12].sum(1).long() - 1
        return features[torch.arange(len(x)), last]
    return features


@pytest.mark.parametrize("name", NAMES)
def test_untrained_model_shapes_heads_and_finite_losses(name):
    problem = _problem(name)
    train, _ = problem.data(smoke=True)
    torch.manual_seed(0)
    model = problem.model()
    with torch.no_grad():
        outputs = model(train.x)
        losses = problem.losses(outputs, train)
        features = model.trunk(train.x)
    modules = dict(model.named_modules())
    for task, (shape, _, classes) in SPECS[name]["targets"].items():
        expected = (len(train), classes) if classes is not None else (len(train), *shape)
        assert outputs[task].shape == expected, task
        # Each task's head is the submodule of its name (``<task>_head`` on vowels, whose heads
        # read one frame), and it takes the trunk's output as is.
        head = f"{task}_head" if name == "vowels" else task
        assert head in modules, task
        head_input = _head_input(name, task, features, train.x)
        expected_out = modules[head](head_input)
        if name == "vowels" and task == "remaining":
            expected_out = expected_out.squeeze(-1)
        torch.testing.assert_close(expected_out, outputs[task], rtol=0, atol=0)
        assert losses[task].ndim == 0
        assert torch.isfinite(losses[task]), task
    assert set(losses) == set(problem.tasks)


@pytest.mark.parametrize("name", NAMES)
def test_constant_outputs_give_the_hand_computed_baselines(name):
    problem = _problem(name)
    train, val = _data(name)
    rows = problem.constant_outputs(train)  # type: ignore[attr-defined]
    assert set(rows) == set(problem.tasks)
    targets = SPECS[name]["targets"]
    for task, row in rows.items():
        shape, _, classes = targets[task]
        assert row.shape == ((classes,) if classes is not None else shape), task
        assert torch.isfinite(row).all(), task
    metrics = problem.evaluate(_Constant(rows), val)  # type: ignore[arg-type]
    assert set(metrics) == set(problem.tasks)
    assert all(isinstance(value, float) and math.isfinite(value) for value in metrics.values())
    for task, (_, _, classes) in targets.items():
        if classes is not None:
            counts = torch.bincount(train.targets[task], minlength=classes)
            predicted = int(rows[task].argmax())
            assert counts[predicted] == counts.max(), task  # a training majority class
            share = float((val.targets[task] == predicted).float().mean())
        elif task in SPECS[name]["binary"]:
            rate = float(train.targets[task].mean())
            predicted = int(float(rows[task]) > 0)
            assert predicted == int(rate > 0.5), task  # a tie (0.5) predicts 0
            share = float((val.targets[task] == predicted).float().mean())
        else:
            continue
        assert metrics[task] == pytest.approx(100.0 * (1.0 - share), abs=1e-4), task


@pytest.mark.parametrize("name", ["blood_pressure", "gait"])
def test_the_windows_dropped_are_the_ones_declared(name):
    """No silent loss: the windows without an event are counted and match ``dropped``."""
    problem: Any = _problem(name)
    train, val = problem.data()
    counts, dropped = problem.counts, problem.dropped
    assert counts["training windows"] == len(train)
    assert counts["validation windows"] == len(val)
    assert counts["training windows dropped"] == dropped["training windows without an event"]
    assert counts["validation windows dropped"] == dropped["validation windows without an event"]
    assert counts["beats"] == counts["peaks"] - dropped["peaks without an onset (the first)"]
    # One validation window of the phase's error rate: the floor Δm uses when alone scores 0.
    assert problem.metric_floor["phase"] == pytest.approx(100 / len(val))


def test_vowels_targets_and_constants_by_hand():
    """The mask channel, the per-frame targets and their constant rows, from the clean frames."""
    problem: Any = _problem("vowels")
    train, val = _data("vowels")
    for split in (train, val):
        mask = split.x[..., 12]
        lengths = mask.sum(1).long()
        assert set(mask.unique().tolist()) == {0.0, 1.0}
        assert int(lengths.min()) >= 7
        assert int(lengths.max()) <= 29
        # The mask is a prefix of ones: frames, then padding.
        assert torch.equal(mask, (torch.arange(29) < lengths.unsqueeze(1)).float())
        clean = split.targets["denoise"]
        assert (clean[mask == 0] == 0).all()
        assert (split.x[..., :12][mask == 0] == 0).all()
        # The next frame is the clean frames shifted by one; remaining counts down to 0.
        torch.testing.assert_close(split.targets["next_frame"], clean[:, 1:], rtol=0, atol=0)
        i = int(lengths.argmin())
        n = int(lengths[i])
        expected = torch.cat([torch.arange(n - 1, -1, -1).float(), torch.zeros(29 - n)])
        torch.testing.assert_close(split.targets["remaining"][i], expected, rtol=0, atol=0)
        torch.testing.assert_close(
            split.targets["profile"],
            clean.sum(1) / lengths.unsqueeze(1).float(),
            rtol=1e-6,
            atol=1e-6,
        )
        assert torch.equal(split.targets["long"].squeeze(1), (lengths > 15).float())
    # The training frames are standardized per channel; the noise is about 0.3 there.
    frames = train.targets["denoise"][train.x[..., 12] == 1]
    torch.testing.assert_close(frames.mean(0), torch.zeros(12), rtol=0, atol=1e-5)
    torch.testing.assert_close(frames.std(0), torch.ones(12), rtol=0, atol=1e-4)
    noise = train.x[..., :12][train.x[..., 12] == 1] - frames
    assert 0.28 < float(noise.std()) < 0.32
    # The constant for ``remaining`` at frame 0 is the mean length minus 1.
    rows = problem.constant_outputs(train)
    lengths = train.x[..., 12].sum(1)
    assert float(rows["remaining"][0]) == pytest.approx(float(lengths.mean()) - 1, rel=1e-6)
    assert int(lengths.max()) == 29
    last = rows["remaining"][28]
    assert float(last) == pytest.approx(0.0, abs=1e-6)  # only 29-frame utterances reach it


def test_leaves_targets_by_hand():
    """Each target from the clean outline: its peak, the half it lies in, its tail and
    roughness; the input is that outline plus noise of about 0.3."""
    train, val = _data("leaves")
    for split in (train, val):
        clean = split.targets["denoise"]
        peak = clean.argmax(1)
        torch.testing.assert_close(split.targets["peak"].squeeze(1), peak.float() / 427)
        assert torch.equal(split.targets["first_half"].squeeze(1), (peak < 213).float())
        torch.testing.assert_close(
            split.targets["tail"].squeeze(1), clean[:, -32:].mean(1), rtol=1e-5, atol=1e-6
        )
        noise = split.x.squeeze(-1) - clean
        assert 0.28 < float(noise.std()) < 0.32
    # Roughness is standardized on the training outlines; it ranks them as the raw std does.
    rough = train.targets["roughness"].squeeze(1)
    assert abs(float(rough.mean())) < 1e-5
    assert abs(float(rough.std()) - 1.0) < 1e-4
    raw = train.targets["denoise"].double().diff(dim=1).std(1)
    assert torch.equal(rough.argsort(), raw.float().argsort())
