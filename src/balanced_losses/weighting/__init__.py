"""Loss weightings: the shared base and one module per published method."""

from balanced_losses.weighting.base import Weighting
from balanced_losses.weighting.dbmtl import DBMTL
from balanced_losses.weighting.dwa import DWA
from balanced_losses.weighting.famo import FAMO
from balanced_losses.weighting.geometric import GeometricMean
from balanced_losses.weighting.imtl import IMTLL
from balanced_losses.weighting.rlw import RLW

__all__ = ["DBMTL", "DWA", "FAMO", "IMTLL", "RLW", "GeometricMean", "Weighting"]
