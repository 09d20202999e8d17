"""`tensorsam toy`: the norm-dynamics toy (E2, Fig. 1), GD vs SAM on a Tucker-2 model."""

from __future__ import annotations

import argparse
import time

from tensorsam.commands import add_task_arguments, run_task, task_config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--noises", help="comma-separated noise levels (default 0,0.5,1,2)")
    p.add_argument("--methods", help="comma-separated: gd,sam (default both)")
    p.add_argument("--iterations", type=int, help="steps per run (default 10000)")
    add_task_arguments(p, "toy", "results.json, fig1_toy.png")


def run(args) -> int:
    started = time.time()
    cfg = task_config("toy", args, ("noises", "methods", "iterations"))
    return run_task("toy", cfg, args, started)
