"""Loss weightings: the shared base and one module per published method."""

from balanced_losses.weighting.base import Weighting

__all__ = ["Weighting"]
