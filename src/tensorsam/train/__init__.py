"""tensorsam.train: ``steps`` (one training step per kind of method), ``fit`` (the resumable epoch
loop), ``distributed`` (DDP and FSDP2 under torchrun) and ``checkpoint`` (DCP checkpoints of sharded
runs)."""

from tensorsam.train.distributed import (
    STRATEGIES,
    DistInfo,
    cleanup,
    full_state_dict,
    is_sharded,
    load_full_state_dict,
    rank_and_world,
    setup,
    shard,
    unwrap,
    wrap,
)
from tensorsam.train.fit import FitResult, accuracies, evaluate, fit
from tensorsam.train.steps import train_step

__all__ = ["STRATEGIES", "DistInfo", "FitResult", "accuracies", "cleanup", "evaluate", "fit", "full_state_dict",
           "is_sharded", "load_full_state_dict", "rank_and_world", "setup", "shard", "train_step", "unwrap", "wrap"]
