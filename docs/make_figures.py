"""Generate the figures of docs/why.md from the package's own code.

Every curve is computed with ``balanced_losses`` and ``torch.autograd``, not drawn from a
formula; the closed forms are overlaid as thin dashed lines, so a figure that disagrees with its
text shows it.

Run from the repository root (needs the ``demo`` extra for matplotlib)::

    python docs/make_figures.py            # writes docs/figures/*.png
    python docs/make_figures.py --out /tmp/figures
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from balanced_losses import LossNormalizer
from balanced_losses.functional import huber_loss, reduction_factor

REFERENCE_SIZE = 2  # the demo's pointer head: 2 outputs
COUNTDOWN_SIZE = 105  # the countdown head: 105 per-timestep outputs
SIZES = [1, 2, 3, 5, 8, 13, 21, 34, 55, 105, 144, 233, 377, 610, 987, 1597, 2584, 4096]
# PNG metadata without the matplotlib version, so that regenerating does not churn the files.
PNG_METADATA = {"Software": None}
# The demo's heads at initialization, measured by benchmarks/init_gradients.py.
INIT_GRADIENTS = Path(__file__).resolve().parents[1] / "benchmarks/results/init_gradients.json"


def initial_losses() -> dict[str, float]:
    """Each demo head's loss at initialization, the mean over the measured seeds."""
    seeds = json.loads(INIT_GRADIENTS.read_text())["seeds"]
    return {
        task: statistics.fmean(s["loss"][task] for s in seeds) for task in ("pointer", "countdown")
    }


def output_gradient_norm(size: int, residual: float, correction: str, delta: float = 1.0) -> float:
    """Norm of d(c(N) * L)/d(predictions) for a mean Huber loss over ``size`` equal residuals."""
    pred = torch.zeros(size, dtype=torch.float64, requires_grad=True)
    target = torch.full((size,), residual, dtype=torch.float64)
    loss = reduction_factor(size, correction) * huber_loss(pred, target, delta=delta)
    (grad,) = torch.autograd.grad(loss, pred)
    return grad.norm().item()


def figure_reduction_gap(out: Path) -> Path:
    """Gradient-norm ratio of a head with N outputs to a 2-output head, per correction."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"none": "C3", "sqrt": "C2", "linear": "C0"}
    labels = {
        "none": 'mean reduction, correction="none"',
        "sqrt": 'correction="sqrt" (multiply by $\\sqrt{N}$)',
        "linear": 'correction="linear" (a sum)',
    }
    residual = 0.5  # equal per-element residuals for both heads, quadratic regime
    for correction, color in styles.items():
        ref = output_gradient_norm(REFERENCE_SIZE, residual, correction)
        ratios = [output_gradient_norm(n, residual, correction) / ref for n in SIZES]
        ax.plot(SIZES, ratios, "o-", color=color, ms=4, lw=2.5, alpha=0.8, label=labels[correction])
    closed = [math.sqrt(REFERENCE_SIZE / n) for n in SIZES]
    ax.plot(SIZES, closed, "--", color="k", lw=0.8, label="$\\sqrt{2/N}$ (closed form)")
    # The sqrt correction is exact only for equal per-element gradients: the demo's countdown
    # head sits in Huber's linear regime (|r| = 10, per-element gradient capped at 1),
    # the pointer head in the quadratic one (|r| = 0.2, per-element gradient 0.2).
    ref = output_gradient_norm(REFERENCE_SIZE, 0.2, "sqrt")
    unequal = [output_gradient_norm(n, 10.0, "sqrt") / ref for n in SIZES]
    ax.plot(
        SIZES,
        unequal,
        ":",
        color="C2",
        lw=2,
        label='"sqrt", but |r| = 10 (linear regime) vs 0.2 (quadratic)',
    )
    gap = output_gradient_norm(COUNTDOWN_SIZE, residual, "none") / output_gradient_norm(
        REFERENCE_SIZE, residual, "none"
    )
    ax.annotate(
        f"N = 105: {gap:.2f}",
        xy=(COUNTDOWN_SIZE, gap),
        xytext=(4, 0.03),
        arrowprops={"arrowstyle": "->", "lw": 0.8},
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("N, number of elements the task's loss is a mean over")
    ax.set_ylim(1e-2, 3e3)  # room for the legend above the curves
    ax.set_ylabel("gradient norm w.r.t. outputs\nrelative to a 2-output head")
    ax.set_title("Mean reduction shrinks a task's gradient by $\\sqrt{2/N}$")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = out / "reduction_gap.png"
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def huber_gradients(residual: float, delta: float = 1.0) -> tuple[float, float, float]:
    """Return ``(L, |dL/dy|, |d(L/m)/dy|)`` for one element with the given residual, m = L."""
    pred = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    loss = huber_loss(pred, torch.tensor([residual], dtype=torch.float64), delta=delta)
    # m is what a running-mean normalizer converges to: the loss value itself, detached (as
    # LossNormalizer detaches its statistics), so it rescales the gradient of L.
    m = loss.detach()
    (g_plain,) = torch.autograd.grad(loss, pred, retain_graph=True)
    (g_norm,) = torch.autograd.grad(loss / m, pred)
    return loss.item(), g_plain.abs().item(), g_norm.abs().item()


def figure_huber_normalized(out: Path, delta: float = 1.0) -> Path:
    """Per-element gradient of L and of L / m (m = L, detached) against the loss value L."""
    residuals = torch.logspace(-2, 3, 200, dtype=torch.float64).tolist()
    values, plain, normalized = zip(*(huber_gradients(r, delta) for r in residuals), strict=True)
    kink = 0.5 * delta**2  # the loss value where Huber turns from quadratic to linear

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.axvspan(min(values), kink, color="C0", alpha=0.07)
    ax.axvspan(kink, max(values), color="C3", alpha=0.07)
    ax.plot(
        values,
        plain,
        color="C0",
        lw=3,
        alpha=0.7,
        label="plain loss $L$: $|\\partial L/\\partial\\hat y|$",
    )
    ax.plot(
        values,
        normalized,
        color="C3",
        lw=3,
        alpha=0.7,
        label="normalized $L/m$, $m = L$ (detached)",
    )
    lo = [v for v in values if v <= kink]
    hi = [v for v in values if v >= kink]
    ax.plot(
        lo,
        [math.sqrt(2 / v) for v in lo],
        "--",
        color="k",
        lw=0.8,
        label="$\\sqrt{2/L}$ and $\\delta/L$ (closed forms)",
    )
    ax.plot(hi, [delta / v for v in hi], "--", color="k", lw=0.8)
    ax.text(kink * 0.5, 3e-3, "quadratic regime\n$|r| \\leq \\delta$", ha="right", fontsize=9)
    ax.text(
        kink * 2,
        3e-3,
        "linear regime\n$|r| > \\delta$: gradient capped at $\\delta$",
        ha="left",
        fontsize=9,
    )
    # The demo's two heads at initialization (benchmarks/results/init_gradients.json).
    for name, value in initial_losses().items():
        # The residual whose Huber loss is `value` (inverse of either branch).
        r = math.sqrt(2 * value) if value <= kink else value / delta + delta / 2
        _, _, g = huber_gradients(r, delta)
        ax.plot([value], [g], "o", color="C3", ms=6)
        ax.annotate(
            f"{name}\nL = {value:.3g}",
            xy=(value, g),
            xytext=(6, 6),
            textcoords="offset points",
            fontsize=8,
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("loss value $L$ (Huber, $\\delta = 1$)")
    ax.set_ylabel("per-element gradient magnitude")
    ax.set_title("Dividing by the loss value shrinks the gradient of a large loss")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    path = out / "huber_normalized.png"
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def figure_running_mean(out: Path, momentum: float = 0.95, steps: int = 80) -> Path:
    """Weight x loss over the first steps: bias-corrected EMA vs an EMA started at 0 or at L_1."""
    gen = torch.Generator().manual_seed(0)
    level = initial_losses()["countdown"]  # the demo's countdown loss at initialization
    losses = level * (1 + 0.1 * torch.randn(steps, generator=gen, dtype=torch.float64))
    normalizer = LossNormalizer({"countdown": 1}, momentum=momentum, correction="none")
    corrected, from_zero, from_one = [], [], []
    ema0 = 0.0
    ema1 = float(losses[0])
    for loss in losses.tolist():
        normalizer({"countdown": torch.tensor(loss, dtype=torch.float64)})
        corrected.append(normalizer.last_weights[0].item() * level)
        ema0 = momentum * ema0 + (1 - momentum) * loss
        ema1 = momentum * ema1 + (1 - momentum) * loss
        from_zero.append(level / ema0)
        from_one.append(level / ema1)
    t = range(1, steps + 1)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    ax.plot(t, from_zero, color="C3", label="EMA started at 0 (no bias correction)")
    ax.plot(t, from_one, color="C1", label="EMA started at the first loss")
    ax.plot(t, corrected, color="C2", lw=2, label="LossNormalizer (bias-corrected EMA)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("applied weight $\\times$ mean loss")
    ax.set_title(f"Start-up of a running-mean normalizer, momentum {momentum}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out / "running_mean_startup.png"
    fig.savefig(path, dpi=110, metadata=PNG_METADATA)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    """Write every figure to `--out`."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for make in (figure_reduction_gap, figure_huber_normalized, figure_running_mean):
        print(make(args.out))


if __name__ == "__main__":
    main()
