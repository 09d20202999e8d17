"""tensorsam.optim: SAM/ASAM, DAS, nBAR/oBAR and exact rebalancing, each a ``torch.optim`` optimizer
wrapping a base optimizer (:mod:`~tensorsam.optim.wrapper`), one functional per algorithm
(:mod:`~tensorsam.optim.functional`), and :func:`build_optimizer` to make any of them by name."""

from tensorsam.optim.balance import STATE_POWERS, Rebalance, rebalance_, state_powers
from tensorsam.optim.bar import BAR
from tensorsam.optim.das import DAS
from tensorsam.optim.factory import METHODS, build_optimizer
from tensorsam.optim.sam import SAM, disable_running_stats
from tensorsam.optim.schedules import SCHEDULES, get_schedule
from tensorsam.optim.wrapper import WrappedOptimizer

__all__ = ["BAR", "DAS", "METHODS", "SAM", "SCHEDULES", "STATE_POWERS", "Rebalance", "WrappedOptimizer",
           "build_optimizer", "disable_running_stats", "get_schedule", "rebalance_", "state_powers"]
