"""Drop-in multi-task loss balancing for PyTorch.

Every weighting is an ``nn.Module`` whose ``forward`` takes a mapping from task name to scalar
loss and returns the total to call ``.backward()`` on.
"""

from balanced_losses import diagnostics, functional
from balanced_losses.gradient import GradientBalancer
from balanced_losses.gradnorm import GradNorm
from balanced_losses.losses import HuberLoss
from balanced_losses.normalizer import LossNormalizer
from balanced_losses.uncertainty import UncertaintyWeighting
from balanced_losses.weighting import DBMTL, DWA, FAMO, IMTLL, RLW, GeometricMean, Weighting

__version__ = "0.1.0"

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "IMTLL",
    "RLW",
    "GeometricMean",
    "GradNorm",
    "GradientBalancer",
    "HuberLoss",
    "LossNormalizer",
    "UncertaintyWeighting",
    "Weighting",
    "__version__",
    "diagnostics",
    "functional",
]
