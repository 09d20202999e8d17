"""`tensorsam vision`: tensorized ResNets under label noise with SGD, SAM, DAS, ... (E4, E5)."""

from __future__ import annotations

import argparse
import time

from tensorsam.commands import add_distributed_argument, add_task_arguments, run_task, task_config

FLAGS = ("dataset", "depth", "formats", "ranks", "methods", "seeds", "label_noises", "epochs", "train_subset",
         "device", "distributed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", dest="dataset", help="digits (default, built in), fashion-mnist or cifar10")
    p.add_argument("--depth", type=int, help="ResNet depth: 20 (default) or 32")
    p.add_argument("--format", dest="formats", help="comma-separated: none,cp,tr,tt,tucker (default tr)")
    p.add_argument("--rank", dest="ranks", help="comma-separated ranks (default 5)")
    p.add_argument("--methods", help="comma-separated: sgd,sam,asam,das,rebalance,sam-every-K,sam-random-Q "
                                     "(default sgd,sam,das)")
    p.add_argument("--seeds", help="comma-separated seeds (default 1)")
    p.add_argument("--label-noise", dest="label_noises", help="comma-separated noise rates in [0, 1) (default 0)")
    p.add_argument("--epochs", type=int, help="training epochs (default 3)")
    p.add_argument("--train-subset", dest="train_subset", type=int,
                   help="train on this many images (seeded, stratified; default all)")
    p.add_argument("--device", help="auto (default), cpu or cuda[:i]")
    add_distributed_argument(p)
    add_task_arguments(p, "vision", "results.json, models/, vision_curves.png")


def run(args) -> int:
    started = time.time()
    return run_task("vision", task_config("vision", args, FLAGS), args, started)
