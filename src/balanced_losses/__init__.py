"""Drop-in multi-task loss balancing for PyTorch.

Every weighting is an ``nn.Module`` whose ``forward`` takes a mapping from task name to scalar
loss and returns the total to call ``.backward()`` on.
"""

from balanced_losses import functional
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
    "HuberLoss",
    "LossNormalizer",
    "UncertaintyWeighting",
    "Weighting",
    "__version__",
    "functional",
]
