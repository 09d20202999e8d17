"""tensorsam.run: what every task's run shares, one job per module: ``config`` (dataclasses from
files and ``--set``), ``io`` (atomic files, checkpoints), ``meta`` (provenance: versions, seeds, RNG
state), ``loop`` (the resumable clock) and ``results`` (results files).

Names are imported on first use (PEP 562), so that building the command line, which needs only
``config``, does not import torch."""

import importlib

_HOME = {
    "add_config_arguments": "config", "config_from_args": "config", "config_to_dict": "config",
    "load_config": "config", "overrides_from": "config", "read_config_file": "config",
    "AFFECTS": "config", "NEUTRAL": "config", "axis": "config", "check_choices": "config",
    "grid_fields": "config", "result_fields": "config",
    "atomic_save_figure": "io", "atomic_torch_save": "io", "atomic_write": "io", "atomic_write_json": "io",
    "atomic_write_text": "io", "load_checkpoint": "io", "to_jsonable": "io",
    "CHECKPOINT_FORMAT": "loop", "Loop": "loop",
    "provenance": "meta", "seed_everything": "meta",
    "write_results": "results",
    "Cell": "sweep", "Sweep": "sweep", "SweepResult": "sweep",
}
__all__ = [
    "AFFECTS", "CHECKPOINT_FORMAT", "NEUTRAL", "Cell", "Loop", "Sweep", "SweepResult", "add_config_arguments",
    "atomic_save_figure", "atomic_torch_save", "atomic_write", "atomic_write_json", "atomic_write_text", "axis",
    "check_choices", "config_from_args", "config_to_dict", "grid_fields", "load_checkpoint", "load_config",
    "overrides_from", "provenance", "read_config_file", "result_fields", "seed_everything", "to_jsonable",
    "write_results"
]


def __getattr__(name: str):
    if name not in _HOME:
        raise AttributeError(f"module 'tensorsam.run' has no attribute {name!r}")
    return getattr(importlib.import_module(f"tensorsam.run.{_HOME[name]}"), name)
