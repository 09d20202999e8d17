"""CLI subcommands, one module each (see tensorsam.cli); a task's command runs it through the task
registry (:mod:`tensorsam.tasks.registry`) with the helpers here.

Exit status of a task command: 0; 2 for bad input (including an ``--out`` that cannot be written,
refused before any work); :data:`DIVERGED` when a run diverged (its record says
``status: "diverged"``), unless ``--allow-divergence`` is given; 130 when interrupted."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tensorsam.run.config import add_config_arguments

DIVERGED = 3  # exit status when a run diverged (without --allow-divergence)
# the run fields that name a run of a grid (DESIGN.md, "Interfaces": results)
COORDINATES = ("method", "seed", "noise", "direction", "label_noise", "format", "rank", "adapter")


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
    p.add_argument("--allow-divergence", action="store_true",
                   help=f"exit 0 even when a run diverged (default: exit status {DIVERGED}); diverged runs "
                        "are recorded with status 'diverged' and the step either way")


def add_distributed_argument(p: argparse.ArgumentParser) -> None:
    """``--distributed ddp|fsdp``: how a task built on :func:`tensorsam.train.fit` uses the processes
    of a torchrun job (see :mod:`tensorsam.train.distributed`)."""
    p.add_argument("--distributed", choices=("ddp", "fsdp"),
                   help="under torchrun: ddp (default; a whole replica per process) or fsdp (FSDP2: parameters, "
                        "gradients and optimizer state sharded over the processes, DCP checkpoints; needs "
                        "torchrun, --nproc-per-node 1 for one process)")


def run_name(run: dict) -> str:
    """A run's name for messages: its label, else its grid coordinates (``method=sam seed=42``)."""
    if run.get("label"):
        return str(run["label"])
    return " ".join(f"{k}={run[k]}" for k in COORDINATES if k in run) or "run"


def divergence_status(runs: list[dict], allow: bool) -> int:
    """Name each diverged run (stdout) and return the exit status: :data:`DIVERGED` when any diverged
    and ``allow`` is false, else 0."""
    bad = [r for r in runs if r.get("status") == "diverged"]
    for r in bad:
        print(f"diverged: {run_name(r)} at step {r.get('diverged_at')} (non-finite loss; metrics null)")
    if bad and not allow:
        print(f"{len(bad)} of {len(runs)} run(s) diverged: exit status {DIVERGED} "
              "(--allow-divergence: 0)", file=sys.stderr)
        return DIVERGED
    return 0


def main_rank() -> bool:
    """Whether this process speaks for the command: always, except ranks other than 0 under torchrun."""
    import os

    from tensorsam.train.distributed import rank_and_world

    return rank_and_world()[0] == 0 and os.environ.get("RANK", "0") == "0"   # before or after joining


def resumable(out: Path) -> bool:
    """Whether ``out`` holds anything ``--resume`` continues: a results file or a sweep's checkpoints."""
    from tensorsam.run.sweep import WORK

    return (out / "results.json").is_file() or any((out / WORK).glob("*"))


def task_config(task: str, args, flags=()):
    """The task's config from ``--config``, then ``--set``, then the dedicated ``flags`` given."""
    from tensorsam.run import load_config, overrides_from
    from tensorsam.tasks.registry import get_task

    return load_config(get_task(task).get("config"), args.config, overrides_from(args, flags))


def run_task(task: str, cfg, args, started: float, *, figures: bool = True) -> int:
    """Run ``cfg`` into ``args.out`` through the registry (an ``--out`` that cannot be written is
    refused first), print the summary lines (and, resuming, how many runs were
    kept), name the diverged runs, make the figures; returns the exit status (see the module
    docstring)."""
    from tensorsam.run.io import check_writable_dir
    from tensorsam.tasks.registry import get_task

    entry = get_task(task)
    out = check_writable_dir(args.out)      # before any work (the task's run checks it again)
    if args.resume and not resumable(out) and main_rank():
        print(f"--resume: nothing to resume in {out} (no results.json, no checkpoints); starting fresh")
    results = entry.get("run")(cfg, out, resume=args.resume, progress=not args.no_progress, started=started)
    if not main_rank():                         # under torchrun rank 0 speaks for every rank
        bad = any(r.get("status") == "diverged" for r in results["runs"])
        return DIVERGED if bad and not args.allow_divergence else 0
    for line in entry.get("summary")(results["runs"]):
        print(line)
    if args.resume and results.get("sweep") is not None:
        print(results["sweep"].summary())
    print_outputs(entry.get("figures")(results, out) if figures else [], out, started)
    return divergence_status(results["runs"], args.allow_divergence)
