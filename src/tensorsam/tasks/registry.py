"""The task registry: for each task its config class, run, figures and summary functions, and the
command module that builds its command line.  ``tensorsam <task>`` and ``tensorsam report`` are
made from it.

Parts are named ``"module:attribute"`` and imported on first use (:meth:`Task.get`), so that
listing the tasks (``tensorsam --help``) imports no torch; a part may also be the object itself.

The parts' contracts:

- ``config``: a dataclass that checks itself on construction (``--config`` / ``--set`` build it);
- ``run(cfg, out_dir=None, *, resume=False, progress=False, started=None) -> dict``: every run of
  ``cfg``; with ``out_dir`` it writes ``out_dir/results.json`` (``task`` = the task's name); the dict
  has the run records under ``"runs"`` (and a :class:`~tensorsam.run.SweepResult` under ``"sweep"``
  when the task is a grid of resumable cells);
- ``figures(results, out_dir) -> list[Path]``: figures of a results file's dict;
- ``summary(runs) -> list[str]``: the lines the command prints;
- ``command``: a module with ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any


@dataclasses.dataclass(frozen=True)
class Task:
    """One task of the registry (see the module docstring for the parts' contracts)."""

    name: str
    help: str
    command: str
    config: Any = None
    run: Any = None
    figures: Any = None
    summary: Any = None

    def get(self, part: str) -> Any:
        """The part ``part`` (``"config"``, ``"run"``, ``"figures"``, ``"summary"``), imported if named
        by a ``"module:attribute"`` string; None when the task has no such part."""
        if part not in ("config", "run", "figures", "summary"):
            raise ValueError(f"unknown task part {part!r}; expected config, run, figures or summary")
        ref = getattr(self, part)
        if not isinstance(ref, str):
            return ref
        module, _, attr = ref.partition(":")
        return getattr(importlib.import_module(module), attr)


TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
    """Add ``task`` to :data:`TASKS` (replacing a task of the same name) and return it."""
    TASKS[task.name] = task
    return task


def get_task(name: str) -> Task:
    """The registered task ``name``; an unknown name raises a ``ValueError`` listing the known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS)}")
    return TASKS[name]


def _here(module: str, name: str) -> str:
    return f"tensorsam.tasks.{module}:{name}"


register(Task(
    "completion", "tensor completion (E1): HOOI, Adam, SAM, DAS, rebalancing",
    command="tensorsam.commands.completion", config=_here("completion.config", "CompletionConfig"),
    run=_here("completion.experiment", "run_completion"), figures=_here("completion.report", "figures"),
    summary=_here("completion.report", "summary_lines")))
register(Task(
    "toy", "norm-dynamics toy (E2, Fig. 1): Q and Cov under GD vs SAM",
    command="tensorsam.commands.toy", config=_here("toy", "ToyConfig"), run=_here("toy", "run_toy"),
    figures=_here("toy", "figures"), summary=_here("toy", "summary_lines")))
register(Task(
    "flatness", "1-D loss landscapes of completion solutions (E3, Fig. 2)",
    command="tensorsam.commands.flatness", config=_here("flatness", "FlatnessConfig"),
    run=_here("flatness", "run"), figures=_here("flatness", "figures"),
    summary=_here("flatness", "summary_lines")))
register(Task(
    "vision", "tensorized ResNets under label noise: SGD, SAM, DAS, cost-matched SAM (E4, E5)",
    command="tensorsam.commands.vision", config=_here("vision.config", "VisionConfig"),
    run=_here("vision.experiment", "run_vision"), figures=_here("vision.experiment", "figures"),
    summary=_here("vision.experiment", "summary_lines")))
