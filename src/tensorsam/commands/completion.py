"""`tensorsam completion`: tensor completion (E1) with HOOI, Adam, SAM, DAS and rebalancing."""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

from tensorsam.commands import add_task_arguments, divergence_status, run_task, task_config
from tensorsam.run.config import overrides_from

# The paper's full protocol (50 000 iterations x 3 seeds x 5 methods) takes ~10-25 minutes here
# (see docs/results/e1.md). With neither --seeds nor --iterations (nor either key in --config/--set)
# the command runs it for the first mask seed only: converged, about 3 minutes on 2 CPU cores.
DEFAULT_SEEDS = (42,)
QUICK_HOOI_ITERATIONS = 2000
FULL_COMMAND = "tensorsam completion --seeds 42,87,100 --out runs/e1"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Fit a tensor to a random 30% of its entries and score the fit on the training entries "
        "(the paper's Table 1 metric) and on the held-out entries. Defaults are the paper's protocol "
        f"(COVID-19 tensor, Tucker rank (8,6,8), 50 000 iterations, seeds 42,87,100, Adam lr 1e-3, SAM "
        "rho 0.01, DAS alpha 0.001 decaying linearly). With neither --seeds nor --iterations given, it "
        "runs the full protocol for seed 42 only (about 3 minutes on 2 CPU cores); all three seeds: "
        f"`{FULL_COMMAND}`. With fewer than 50 000 iterations HOOI runs at most "
        f"{QUICK_HOOI_ITERATIONS} sweeps unless hooi_iterations is set."
    )
    p.add_argument("--methods", help="comma-separated: hooi,adam,sam,das,rebalance (default: all)")
    p.add_argument("--seeds", help="comma-separated mask seeds (paper: 42,87,100; default 42 when "
                                   "--iterations is not given either)")
    p.add_argument("--iterations", type=int, help="training steps (default and paper: 50000)")
    p.add_argument("--protocol", choices=["paper", "validated"],
                   help="'validated': early stopping and rank selection on a validation split")
    add_task_arguments(p, "completion", "results.json, solutions.pt")
    p.add_argument("--merge", nargs="+", metavar="DIR",
                   help="instead of running: merge these output dirs (same config, other seeds) into --out")


def config_from_args(args):
    """The :class:`CompletionConfig` of the command line (file, then --set, then flags)."""
    flags = ("methods", "seeds", "iterations", "protocol")
    set_keys = {o.partition("=")[0].strip() for o in overrides_from(args, flags)}
    cfg = task_config("completion", args, flags)
    if not any(k in set_keys or _file_sets(args.config, k) for k in ("iterations", "seeds")):
        cfg = dataclasses.replace(cfg, seeds=list(DEFAULT_SEEDS))
    hooi_set = "hooi_iterations" in set_keys or _file_sets(args.config, "hooi_iterations")
    if not hooi_set and cfg.iterations < 50000:
        cfg = dataclasses.replace(cfg, hooi_iterations=min(cfg.hooi_iterations, QUICK_HOOI_ITERATIONS))
    return cfg


def _file_sets(path, key: str) -> bool:
    if path is None:
        return False
    from tensorsam.run import read_config_file

    return key in read_config_file(Path(path))


def run(args) -> int:
    from tensorsam.tasks.completion import summary_lines

    started = time.time()
    if args.merge:
        from tensorsam.tasks.completion import merge_results

        result = merge_results(args.merge, args.out)
        for line in summary_lines(result["runs"]):
            print(line)
        print(f"wrote {Path(args.out) / 'results.json'}")
        return divergence_status(result["runs"], args.allow_divergence)
    return run_task("completion", config_from_args(args), args, started, figures=False)
