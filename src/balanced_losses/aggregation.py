r"""Aggregation rules: pure functions from the Gramian of the task gradients to task weights.

Each rule takes the :math:`K \times K` Gramian :math:`G = J J^\top` of the tasks' gradients
(the rows of :math:`J`) and returns the weights :math:`w \in \mathbb R^K` of the update
:math:`d = J^\top w`. They have no state and no side effect, run on any device without a
host-device synchronization, and are what the named feature-level classes apply in backward:
:class:`~balanced_losses.UPGrad` is ``GramianWeighting(tasks, upgrad_weights)``.

Plug one of them, or your own function of the Gramian, into the one backward pass with
:class:`~balanced_losses.GramianWeighting`; the page "Extending" of the docs shows how.

Example:
    >>> import torch
    >>> from balanced_losses import GramianWeighting
    >>> from balanced_losses.aggregation import upgrad_weights
    >>> jac = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)
    >>> w = upgrad_weights(jac @ jac.T)
    >>> bool((jac @ (w @ jac) >= 0).all())  # conflicts with no task
    True
    >>> method = GramianWeighting(["a", "b"], upgrad_weights)  # what UPGrad(["a", "b"]) is
"""

from balanced_losses.features._aligned_mtl import aligned_mtl_weights
from balanced_losses.features._cagrad import cagrad_weights
from balanced_losses.features._config import config_weights
from balanced_losses.features._fairgrad import fairgrad_weights
from balanced_losses.features._imtlg import imtlg_weights
from balanced_losses.features._mgda import mgda_weights
from balanced_losses.features._nash_mtl import nash_mtl_weights
from balanced_losses.features._pcgrad import pcgrad_orders, pcgrad_weights
from balanced_losses.features._upgrad import upgrad_weights

__all__ = [
    "aligned_mtl_weights",
    "cagrad_weights",
    "config_weights",
    "fairgrad_weights",
    "imtlg_weights",
    "mgda_weights",
    "nash_mtl_weights",
    "pcgrad_orders",
    "pcgrad_weights",
    "upgrad_weights",
]
