"""tensorsam.train: ``steps`` (one training step per kind of method), ``fit`` (the resumable epoch
loop) and ``distributed`` (DDP under torchrun)."""

from tensorsam.train.distributed import DistInfo, cleanup, rank_and_world, setup, unwrap, wrap
from tensorsam.train.fit import FitResult, accuracies, evaluate, fit
from tensorsam.train.steps import train_step

__all__ = ["DistInfo", "FitResult", "accuracies", "cleanup", "evaluate", "fit", "rank_and_world", "setup", "train_step",
           "unwrap", "wrap"]
