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
- ``report(results) -> str`` (optional): the Markdown ``tensorsam report`` prints for a results file
  of the task, instead of the generic table;
- ``command``: a module with ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any

PARTS = ("config", "run", "figures", "summary", "report")


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
    report: Any = None

    def get(self, part: str) -> Any:
        """The part ``part`` (``"config"``, ``"run"``, ``"figures"``, ``"summary"``, ``"report"``), imported
        if named by a ``"module:attribute"`` string; None when the task has no such part."""
        if part not in PARTS:
            raise ValueError(f"unknown task part {part!r}; expected one of {', '.join(PARTS)}")
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


# name, help, config "module:Class", run "module:function", and the module of figures() and summary_lines()
_BUILT_IN = [
    ("completion", "tensor completion (E1): HOOI, Adam, SAM, DAS, rebalancing",
     "completion.config:CompletionConfig", "completion.experiment:run_completion", "completion.report"),
    ("toy", "norm-dynamics toy (E2, Fig. 1): Q and Cov under GD vs SAM", "toy:ToyConfig", "toy:run_toy", "toy"),
    ("flatness", "1-D loss landscapes of completion solutions (E3, Fig. 2)", "flatness:FlatnessConfig",
     "flatness:run", "flatness"),
    ("vision", "tensorized ResNets under label noise: SGD, SAM, DAS, cost-matched SAM (E4, E5)",
     "vision.config:VisionConfig", "vision.experiment:run_vision", "vision.experiment"),
]
for _name, _help, _config, _run, _report in _BUILT_IN:
    register(Task(_name, _help, command=f"tensorsam.commands.{_name}", config=f"tensorsam.tasks.{_config}",
                  run=f"tensorsam.tasks.{_run}", figures=f"tensorsam.tasks.{_report}:figures",
                  summary=f"tensorsam.tasks.{_report}:summary_lines"))
register(dataclasses.replace(TASKS["vision"], report="tensorsam.tasks.vision.report:report_sections"))
register(Task("compress", "compress a trained dense ResNet to a budget (TT-SVD), then fine-tune it: SGD, SAM, "
              "DAS, cost-matched SAM (E6)", command="tensorsam.commands.compress",
              config="tensorsam.tasks.compress.config:CompressConfig",
              run="tensorsam.tasks.compress.experiment:run_compress",
              figures="tensorsam.tasks.compress.report:figures",
              summary="tensorsam.tasks.compress.report:summary_lines",
              report="tensorsam.tasks.compress.report:report_sections"))
register(Task("finetune", "tensor adapters (LoRA, FLoRA, LoRETTA) on a pretrained language model: Adam, SAM, "
              "DAS on the HF Trainer (E7)", command="tensorsam.commands.finetune",
              config="tensorsam.tasks.finetune.config:FinetuneConfig",
              run="tensorsam.tasks.finetune.experiment:run_finetune",
              figures="tensorsam.tasks.finetune.experiment:figures",
              summary="tensorsam.tasks.finetune.experiment:summary_lines"))
