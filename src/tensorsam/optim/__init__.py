"""tensorsam.optim: SAM/ASAM, DAS, nBAR/oBAR and exact rebalancing, each wrapping a base
``torch.optim`` optimizer (see :mod:`tensorsam.optim.base`)."""

from tensorsam.optim.das import DAS, das_lambda
from tensorsam.optim.sam import SAM, disable_running_stats

__all__ = ["DAS", "SAM", "das_lambda", "disable_running_stats"]
