"""``attach``: a feature-level method on an unmodified model, equal to the ``branch`` path.

Two models whose ``forward`` is never edited: a digit/parity classifier on 8x8 images (a shared
MLP, two heads that take the trunk's output as it is) and the demo's pointer/countdown GRU (the
pointer head reads a mean over time of the trunk's output, so its input is not the trunk's
output itself). Each feature-level method of the registry trains on both through ``attach`` and
must produce the gradients, parameters and statistics of the same model driven through
``branch`` by hand.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

import balanced_losses as bl
from tests.registry import CASES, FEATURES, Case, params

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
if (EXAMPLES / "_pointer_countdown_lib.py").is_file():
    sys.path.insert(0, str(EXAMPLES))
    import _pointer_countdown_lib as demo
else:  # The release check runs a copy of tests/ against the wheel, without examples/.
    demo = None
needs_demo = pytest.mark.skipif(demo is None, reason="examples/ is not here (tests copied out)")

FEATURE_CASES = [case for case in CASES if case.level == FEATURES]
TASKS = ("digit", "parity")


class DigitParityNet(nn.Module):
    """A multi-task classifier as found in training scripts: the heads are called in forward."""

    def __init__(self, *, checkpointed: bool = False) -> None:
        super().__init__()
        self.shared = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32))
        self.digit_head = nn.Linear(32, 10)
        self.parity_head = nn.Sequential(nn.ReLU(), nn.Linear(32, 2))
        self.checkpointed = checkpointed

    def forward(self, images: Tensor) -> dict[str, Tensor]:
        if self.checkpointed:
            features = checkpoint(self.shared, images, use_reentrant=False)
        else:
            features = self.shared(images)
        return {"digit": self.digit_head(features), "parity": self.parity_head(features)}


def digit_batch(step: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return torch.randn(16, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen)


def digit_losses(outputs: dict[str, Tensor], labels: Tensor) -> dict[str, Tensor]:
    ce = nn.functional.cross_entropy
    # The parity loss is a sum over the batch, the digit loss a mean: different scales.
    return {
        "digit": ce(outputs["digit"], labels),
        "parity": ce(outputs["parity"], labels % 2, reduction="sum"),
    }


def by_hand(model: DigitParityNet, weighting: Any, images: Tensor) -> dict[str, Tensor]:
    """The same model's computation written out with ``branch``."""
    features = model.shared(images)
    views = weighting.branch(features)
    return {"digit": model.digit_head(views["digit"]), "parity": model.parity_head(views["parity"])}


def train_pair(
    case: Case,
    run_attached: Callable[[nn.Module, Any, int], dict[str, Tensor]],
    run_by_hand: Callable[[nn.Module, Any, int], dict[str, Tensor]],
    make_model: Callable[[], nn.Module],
    tasks: tuple[str, ...],
    steps: int = 3,
    **weighting_kw: Any,
) -> tuple[tuple[nn.Module, Any], tuple[nn.Module, Any]]:
    """Train a model through ``attach`` and a copy through ``branch``; check every step."""
    torch.manual_seed(0)
    model = make_model()
    twin = copy.deepcopy(model)
    weighting = case.make(tasks, **weighting_kw)
    reference = copy.deepcopy(weighting)
    pairs = [(model, weighting), (twin, reference)]
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m, _ in pairs]
    for step in range(steps):
        for (m, w), opt, run in zip(pairs, optimizers, (run_attached, run_by_hand), strict=True):
            opt.zero_grad()
            w(run(m, w, step)).backward()
        for p, q in zip(model.parameters(), twin.parameters(), strict=True):
            assert p.grad is not None
            assert q.grad is not None
            torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0)
        for opt in optimizers:
            opt.step()
    for key, value in reference.state_dict().items():
        if isinstance(value, Tensor):
            torch.testing.assert_close(weighting.state_dict()[key], value, rtol=0, atol=0)
    return pairs[0], pairs[1]


@pytest.mark.parametrize("case", params(FEATURE_CASES))
@pytest.mark.parametrize("heads", ["named", "measured"])
def test_digit_parity_model_trains_through_attach_as_through_branch(case: Case, heads: str) -> None:
    """Both ways of attaching give the ``branch`` path's gradients, bit for bit."""
    named = {"digit": "digit_head", "parity": "parity_head"} if heads == "named" else None

    def attached(model: nn.Module, weighting: Any, step: int) -> dict[str, Tensor]:
        if (
            not weighting._attachments
            and not getattr(weighting, "balancer", weighting)._attachments
        ):
            weighting.attach(model, "shared", named)
        images, labels = digit_batch(step)
        return digit_losses(model(images), labels)

    def manual(model: nn.Module, weighting: Any, step: int) -> dict[str, Tensor]:
        images, labels = digit_batch(step)
        return digit_losses(by_hand(model, weighting, images), labels)  # type: ignore[arg-type]

    train_pair(case, attached, manual, DigitParityNet, TASKS, weights={"parity": 0.25})


# A GRU over 105 steps is slow on a CPU: the default suite trains the demo's recommended method,
# the slow suite every feature-level one.
DEMO_CASES = [
    pytest.param(case, id=case.name, marks=() if case.name == "DBMTL" else pytest.mark.slow)
    for case in FEATURE_CASES
]


@needs_demo
@pytest.mark.parametrize("case", DEMO_CASES)
def test_demo_model_trains_through_attach_without_naming_heads(case: Case) -> None:
    """The demo's pointer head reads a mean over time: measured attachment, same gradients."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 105, demo.CHANNELS, generator=gen)
    targets = {
        "pointer": torch.rand(2, 2, generator=gen),
        "countdown": 10 * torch.randn(2, 105, generator=gen),
    }

    def losses(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
        return {t: bl.functional.huber_loss(outputs[t], targets[t]) for t in demo.TASKS}

    def attached(model: nn.Module, weighting: Any, step: int) -> dict[str, Tensor]:
        if not getattr(weighting, "balancer", weighting)._attachments:
            weighting.attach(model, "encoder")
        return losses(model(x))

    def manual(model: nn.Module, weighting: Any, step: int) -> dict[str, Tensor]:
        return losses(model.heads(weighting.branch(model.encode(x))))  # type: ignore[operator]

    train_pair(case, attached, manual, demo.PointerCountdownNet, tuple(demo.TASKS), steps=2)


@needs_demo
def test_named_head_that_reads_a_transformed_output_is_an_error() -> None:
    net = demo.PointerCountdownNet()
    balancer = bl.GradientBalancer(demo.TASKS)
    balancer.attach(net, "encoder", {"pointer": "pointer_head", "countdown": "countdown_head"})
    with pytest.raises(
        RuntimeError,
        match=r"head `pointer_head` of task `pointer` received a Tensor of shape \(2, 64\)"
        r".*trunk `encoder`",
    ):
        net(torch.randn(2, 105, demo.CHANNELS))


def test_checkpointed_trunk_gives_the_branch_gradients() -> None:
    """Non-reentrant checkpointing reruns the trunk in backward; nothing is routed twice."""
    case = next(c for c in FEATURE_CASES if c.name == "GradientBalancer")
    for named in ({"digit": "digit_head", "parity": "parity_head"}, None):

        def attached(
            model: nn.Module, weighting: Any, step: int, named: Any = named
        ) -> dict[str, Tensor]:
            if not weighting._attachments:
                weighting.attach(model, "shared", named)
            images, labels = digit_batch(step)
            return digit_losses(model(images), labels)

        def manual(model: nn.Module, weighting: Any, step: int) -> dict[str, Tensor]:
            images, labels = digit_batch(step)
            features = checkpoint(model.shared, images, use_reentrant=False)
            views = weighting.branch(features)
            return digit_losses(
                {
                    "digit": model.digit_head(views["digit"]),
                    "parity": model.parity_head(views["parity"]),
                },
                labels,
            )

        train_pair(case, attached, manual, lambda: DigitParityNet(checkpointed=True), TASKS)


def test_remove_restores_the_model_and_the_context_manager_removes() -> None:
    torch.manual_seed(0)
    net = DigitParityNet()
    images, labels = digit_batch(0)
    balancer = bl.GradientBalancer(TASKS)
    with balancer.attach(net, "shared", {"digit": "digit_head", "parity": "parity_head"}) as hooks:
        assert "attached" in repr(hooks)
    assert "removed" in repr(hooks)
    assert not balancer._attachments
    for module in net.modules():
        assert not module._forward_hooks
        assert not module._forward_pre_hooks
    # Without hooks the method sees no branch call and says so.
    with pytest.warns(UserWarning, match="nothing reached the shared features"):
        balancer(digit_losses(net(images), labels))


def test_eval_and_no_grad_route_nothing() -> None:
    torch.manual_seed(0)
    net = DigitParityNet()
    images, _ = digit_batch(0)
    plain = net(images)
    for named in ({"digit": "digit_head", "parity": "parity_head"}, None):
        balancer = bl.GradientBalancer(TASKS)
        hooks = balancer.attach(net, "shared", named)
        with torch.no_grad():
            out = net(images)
        balancer.eval()
        out_eval = net(images)
        for task in TASKS:
            torch.testing.assert_close(out[task], plain[task], rtol=0, atol=0)
            torch.testing.assert_close(out_eval[task], plain[task], rtol=0, atol=0)
        hooks.remove()


def test_copies_are_not_attached() -> None:
    net = DigitParityNet()
    balancer = bl.GradientBalancer(TASKS)
    balancer.attach(net, "shared")
    assert copy.deepcopy(balancer)._attachments == []


@pytest.mark.parametrize(
    ("trunk", "heads", "error", "match"),
    [
        ("backbone", None, ValueError, r"no submodule `backbone`.*`shared`"),
        ("shared", {"digit": "digit_head"}, ValueError, r"no head for task\(s\) \['parity'\]"),
        (
            "shared",
            {"digit": "digit_head", "parity": "parity_head", "sign": "x"},
            KeyError,
            r"unknown task\(s\) \['sign'\]",
        ),
        (
            "shared",
            {"digit": "shared", "parity": "parity_head"},
            ValueError,
            r"head of task `digit` is the trunk `shared`",
        ),
        (
            "shared",
            {"digit": nn.Linear(2, 2), "parity": "parity_head"},
            ValueError,
            r"head of task `digit` Linear is not a submodule",
        ),
        ("shared", ["digit_head", "parity_head"], TypeError, r"`heads` must map each task name"),
        (3, None, TypeError, r"trunk must be a submodule name or an nn.Module"),
    ],
)
def test_attach_arguments_are_checked(trunk: Any, heads: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        bl.GradientBalancer(TASKS).attach(DigitParityNet(), trunk, heads)


def test_dbmtl_without_its_gradient_half_cannot_attach() -> None:
    with pytest.raises(ValueError, match="no gradient half"):
        bl.DBMTL(TASKS, balance_features=False).attach(DigitParityNet(), "shared")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*should not be instantiated:DeprecationWarning")
# Dynamo's own warning when a graph resumes after a break with a non-leaf tensor input.
@pytest.mark.filterwarnings("ignore:The .grad attribute of a Tensor that is not a leaf:UserWarning")
@pytest.mark.parametrize(("heads", "fullgraph"), [("named", True), ("measured", False)])
def test_compiled_model_with_attach_equals_branch(heads: str, fullgraph: bool) -> None:
    """Attached before ``torch.compile``: named heads compile whole; measuring breaks once."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    net = DigitParityNet()
    twin = copy.deepcopy(net)
    weighting = bl.DBMTL(TASKS)
    reference = copy.deepcopy(weighting)
    named = {"digit": "digit_head", "parity": "parity_head"} if heads == "named" else None
    weighting.attach(net, "shared", named)
    compiled = torch.compile(net, fullgraph=fullgraph, backend="aot_eager")
    for step in range(2):
        for p in [*net.parameters(), *twin.parameters()]:
            p.grad = None
        images, labels = digit_batch(step)
        weighting(digit_losses(compiled(images), labels)).backward()
        reference(digit_losses(by_hand(twin, reference, images), labels)).backward()
        for p, q in zip(net.parameters(), twin.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("heads", ["named", "measured"])
def test_a_factor_applied_to_the_total_reaches_the_trunk(heads: str) -> None:
    """A GradScaler's scale or an accumulation divisor multiplies every gradient, trunk too."""
    torch.manual_seed(0)
    net = DigitParityNet()
    twin = copy.deepcopy(net)
    named = {"digit": "digit_head", "parity": "parity_head"} if heads == "named" else None
    weighting, reference = bl.DBMTL(TASKS), bl.DBMTL(TASKS)
    weighting.attach(net, "shared", named)
    reference.attach(twin, "shared", named)
    images, labels = digit_batch(0)
    (weighting(digit_losses(net(images), labels)) * 1024.0).backward()
    reference(digit_losses(twin(images), labels)).backward()
    for p, q in zip(net.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p.grad, 1024.0 * q.grad, rtol=1e-6, atol=0)
