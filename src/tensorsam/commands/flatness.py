"""`tensorsam flatness`: 1-D loss curves of completion solutions (E3, Fig. 2)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from tensorsam.commands import print_outputs
from tensorsam.run.config import add_config_arguments, overrides_from


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source",
                   help="a `tensorsam completion --out` directory (default: run a short completion first)")
    p.add_argument("--methods", help="comma-separated (default hooi,adam,sam,das)")
    p.add_argument("--seed", type=int, help="mask seed whose solutions are probed (default 42)")
    p.add_argument("--out", default="runs/flatness", help="output directory (results.json, fig2_flatness.png)")
    add_config_arguments(p, "FlatnessConfig")


def run(args) -> int:
    from tensorsam.run import load_config, write_results
    from tensorsam.tasks.flatness import FlatnessConfig, figures, run_flatness

    started = time.time()
    overrides = overrides_from(args, ("source", "methods", "seed"))
    cfg = load_config(FlatnessConfig, args.config, overrides)
    out = Path(args.out)
    result = run_flatness(cfg, work_dir=out / "completion")
    results = write_results(out / "results.json", task="flatness", config=cfg, runs=result["runs"],
                            extra={"source": result["source"]}, started=started)
    for r in result["runs"]:
        print(f"{r['label']:<18} loss at 0 {r['loss_at_0']:.4g}, mean rise at d=±span/3 "
              f"{r['loss_rise_at_third']:.4g}, held-out R² at 0 {r['heldout_r2_at_0']:.4g}")
    return print_outputs(figures(results, out), out, started)
