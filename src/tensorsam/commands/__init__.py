"""CLI subcommands, one module each (see tensorsam.cli); a task's command runs it through the task
registry (:mod:`tensorsam.tasks.registry`) with the helpers here."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tensorsam.run.config import add_config_arguments


def print_outputs(figures, out: Path, started: float) -> int:
    """Name the figures and results file a command wrote; returns the exit status 0."""
    for path in figures:
        print(f"wrote {path}")
    print(f"wrote {out / 'results.json'} ({time.time() - started:.1f} s)")
    return 0


def add_task_arguments(p: argparse.ArgumentParser, task: str, out_help: str) -> None:
    """The flags every task takes: ``--out``, ``--config``, ``--set``, ``--resume``, ``--no-progress``."""
    p.add_argument("--out", default=f"runs/{task}", help=f"output directory ({out_help})")
    add_config_arguments(p, f"{task} config")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out; finished runs there are kept, so added "
                        "grid values (e.g. another seed) run only the new runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def task_config(task: str, args, flags=()):
    """The task's config from ``--config``, then ``--set``, then the dedicated ``flags`` given."""
    from tensorsam.run import load_config, overrides_from
    from tensorsam.tasks.registry import get_task

    return load_config(get_task(task).get("config"), args.config, overrides_from(args, flags))


def run_task(task: str, cfg, args, started: float, *, figures: bool = True) -> int:
    """Run ``cfg`` into ``args.out`` through the registry, print the summary lines (and, resuming,
    how many runs were kept), make the figures; returns the exit status 0."""
    from tensorsam.tasks.registry import get_task

    entry = get_task(task)
    out = Path(args.out)
    results = entry.get("run")(cfg, out, resume=args.resume, progress=not args.no_progress, started=started)
    for line in entry.get("summary")(results["runs"]):
        print(line)
    if args.resume and results.get("sweep") is not None:
        print(results["sweep"].summary())
    return print_outputs(entry.get("figures")(results, out) if figures else [], out, started)
