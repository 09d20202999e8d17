"""`tensorsam flatness`: 1-D loss curves of completion solutions (E3, Fig. 2)."""

from __future__ import annotations

import argparse
import time

from tensorsam.commands import add_task_arguments, run_task, task_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source",
                   help="a `tensorsam completion --out` directory (default: run a short completion first)")
    p.add_argument("--methods", help="comma-separated (default hooi,adam,sam,das)")
    p.add_argument("--seed", type=int, help="mask seed whose solutions are probed (default 42)")
    add_task_arguments(p, "flatness", "results.json, fig2_flatness.png; completion/ without --from")


def run(args) -> int:
    started = time.time()
    cfg = task_config("flatness", args, ("source", "methods", "seed"))
    return run_task("flatness", cfg, args, started)
