"""tensorsam.optim: SAM/ASAM, DAS, nBAR/oBAR and exact rebalancing, each a ``torch.optim``
optimizer wrapping a base optimizer (see :mod:`tensorsam.optim.base`)."""

from tensorsam.optim.balance import STATE_POWERS, Rebalance, rebalance_, rebalance_factors, state_powers
from tensorsam.optim.bar import BAR, nbar_sign, obar_sign
from tensorsam.optim.base import WrappedOptimizer
from tensorsam.optim.das import DAS, das_lambda
from tensorsam.optim.sam import SAM, disable_running_stats
from tensorsam.optim.schedules import SCHEDULES, get_schedule

__all__ = ["BAR", "DAS", "SAM", "SCHEDULES", "STATE_POWERS", "Rebalance", "WrappedOptimizer", "das_lambda",
           "disable_running_stats", "get_schedule", "nbar_sign", "obar_sign", "rebalance_",
           "rebalance_factors", "state_powers"]
