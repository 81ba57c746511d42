"""Drop-in multi-task loss balancing for PyTorch.

Every weighting is an ``nn.Module`` whose ``forward`` takes a mapping from task name to scalar
loss and returns the total to call ``.backward()`` on. Two families:

- loss-level weightings (:mod:`balanced_losses.weighting`) combine the loss values;
- feature-level methods (:mod:`balanced_losses.features`) act on each task's gradient at the
  shared features, inside the one backward pass; :class:`GramianWeighting` runs any rule of
  the tasks' Gramian there (the rules: :mod:`balanced_losses.aggregation`).

Every public class is imported from here, and only from here.
"""

from balanced_losses import aggregation, catalog, diagnostics, functional
from balanced_losses._base import Weighting
from balanced_losses.features._aligned_mtl import AlignedMTL
from balanced_losses.features._attach import Attachment
from balanced_losses.features._cagrad import CAGrad
from balanced_losses.features._calibrated import CalibratedBalancer
from balanced_losses.features._config import ConFIG
from balanced_losses.features._dbmtl import DBMTL
from balanced_losses.features._fairgrad import FairGrad
from balanced_losses.features._gradient_balancer import GradientBalancer
from balanced_losses.features._gramian import GramianWeighting
from balanced_losses.features._imtlg import IMTLG
from balanced_losses.features._mgda import MGDA
from balanced_losses.features._nash_mtl import NashMTL
from balanced_losses.features._pcgrad import PCGrad
from balanced_losses.features._upgrad import UPGrad
from balanced_losses.losses import HuberLoss
from balanced_losses.weighting._calibrated_weighting import CalibratedWeighting
from balanced_losses.weighting._dwa import DWA
from balanced_losses.weighting._famo import FAMO
from balanced_losses.weighting._geometric_mean import GeometricMean
from balanced_losses.weighting._go4align import GO4Align
from balanced_losses.weighting._gradnorm import GradNorm
from balanced_losses.weighting._imtll import IMTLL
from balanced_losses.weighting._ldc_mtl import LDCMTL
from balanced_losses.weighting._loss_normalizer import LossNormalizer
from balanced_losses.weighting._rlw import RLW
from balanced_losses.weighting._stch import STCH
from balanced_losses.weighting._uncertainty import UncertaintyWeighting

__version__ = "0.1.0"

__all__ = [
    "DBMTL",
    "DWA",
    "FAMO",
    "IMTLG",
    "IMTLL",
    "LDCMTL",
    "MGDA",
    "RLW",
    "STCH",
    "AlignedMTL",
    "Attachment",
    "CAGrad",
    "CalibratedBalancer",
    "CalibratedWeighting",
    "ConFIG",
    "FairGrad",
    "GO4Align",
    "GeometricMean",
    "GradNorm",
    "GradientBalancer",
    "GramianWeighting",
    "HuberLoss",
    "LossNormalizer",
    "NashMTL",
    "PCGrad",
    "UPGrad",
    "UncertaintyWeighting",
    "Weighting",
    "__version__",
    "aggregation",
    "catalog",
    "diagnostics",
    "functional",
]
