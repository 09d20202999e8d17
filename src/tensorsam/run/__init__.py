"""tensorsam.run: what every task's run shares, one job per module: ``config`` (dataclasses from
files and ``--set``), ``io`` (atomic files, checkpoints), ``provenance`` (versions, seeds, RNG
state), ``loop`` (the resumable clock) and ``results`` (results files)."""

from tensorsam.run.config import (
    add_config_arguments,
    config_from_args,
    config_to_dict,
    load_config,
    read_config_file,
)
from tensorsam.run.io import (
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    load_checkpoint,
    to_jsonable,
)
from tensorsam.run.loop import CHECKPOINT_FORMAT, Loop
from tensorsam.run.provenance import provenance, seed_everything
from tensorsam.run.results import write_results

__all__ = ["CHECKPOINT_FORMAT", "Loop", "add_config_arguments", "atomic_torch_save", "atomic_write_json",
           "atomic_write_text", "config_from_args", "config_to_dict", "load_checkpoint", "load_config",
           "provenance", "read_config_file", "seed_everything", "to_jsonable", "write_results"]
