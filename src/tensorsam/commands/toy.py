"""`tensorsam toy`: the norm-dynamics toy (E2, Fig. 1), GD vs SAM on a Tucker-2 model."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tensorsam.commands import print_outputs
from tensorsam.run.config import add_config_arguments, overrides_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--noises", help="comma-separated noise levels (default 0,0.5,1,2)")
    p.add_argument("--iterations", type=int, help="steps per run (default 10000)")
    p.add_argument("--out", default="runs/toy", help="output directory (results.json, fig1_toy.png)")
    add_config_arguments(p, "ToyConfig")


def run(args) -> int:
    from tensorsam.run import load_config, write_results
    from tensorsam.tasks.toy import ToyConfig, figures, run_toy

    started = time.time()
    overrides = overrides_from(args, ("noises", "iterations"))
    cfg = load_config(ToyConfig, args.config, overrides)
    result = run_toy(cfg)
    out = Path(args.out)
    results = write_results(out / "results.json", task="toy", config=cfg, runs=result["runs"], started=started)
    for r in result["runs"]:
        print(f"{r['label']:<18} Q {r['Q_initial']:.4g} -> {r['Q_final']:.4g} (x{r['Q_ratio']:.3f})  "
              f"final loss {r['final_loss']:.4g}")
    return print_outputs(figures(results, out), out, started)
