"""`tensorsam tune vision`: search ρ, α and the learning rate with optuna on the validation split."""

from __future__ import annotations

import argparse
import time

from tensorsam.commands import task_config
from tensorsam.commands import vision as vision_command


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", choices=["vision"], help="the task whose settings are searched")
    vision_command.add_arguments(p)
    p.set_defaults(out="runs/tune-vision")
    p.add_argument("--trials", type=int, default=20, help="trials in the study in total (default 20); "
                   "rerunning with more continues the study in --out")
    p.add_argument("--params", help="comma-separated values to search: rho, alpha, lr "
                                    "(default: rho,lr for SAM methods, alpha,lr for das, else lr)")
    p.add_argument("--sampler-seed", type=int, default=0, help="seed of optuna's TPE sampler")


def run(args) -> int:
    from tensorsam.tasks.vision.tune import tune_vision

    started = time.time()
    cfg = task_config("vision", args, vision_command.FLAGS)
    params = [p.strip() for p in args.params.split(",") if p.strip()] if args.params else None
    study = tune_vision(cfg, args.out, trials=args.trials, params=params, seed=args.sampler_seed,
                        progress=not args.no_progress)
    states = [t.state.name.lower() for t in study.get_trials(deepcopy=False)]
    print(f"study {study.study_name}: " + ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states))))
    try:
        print(f"best validation accuracy {study.best_value:.4f} at " +
              ", ".join(f"{k}={v:.4g}" for k, v in study.best_params.items()))
    except ValueError:
        print("no trial finished (all pruned or failed)")
    print(f"wrote {args.out}/tune.json, {args.out}/tune.png, {args.out}/study.db ({time.time() - started:.1f} s)")
    return 0
