"""`tensorsam compress`: compress a trained dense ResNet (TT-SVD to a ratio or a rank), then fine-tune
it over methods x seeds (E6)."""

from __future__ import annotations

import argparse
import time

from tensorsam.commands import add_task_arguments, run_task, task_config

FLAGS = ("model", "weights", "arch", "dataset", "formats", "ratios", "ranks", "balances", "exclude", "methods",
         "seeds", "epochs", "train_subset", "label_noise", "device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="DIR/models/<run>.pt of `tensorsam vision --format none`, or a state_dict "
                                   "file (then --arch and --data)")
    p.add_argument("--weights", help="final (default) or best: which weights of a vision model")
    p.add_argument("--arch", help="resnet20 or resnet32 (a state_dict file; a vision model says its own)")
    p.add_argument("--data", dest="dataset", help="digits, fashion-mnist or cifar10 (default: the vision model's)")
    p.add_argument("--format", dest="formats", help="comma-separated: tt (default), tr, tucker, cp")
    p.add_argument("--ratio", dest="ratios",
                   help="comma-separated target compression ratios, the whole model's parameters before / "
                        "after, > 1 (default 2.5)")
    p.add_argument("--rank", dest="ranks", help="comma-separated ranks, one for every layer (instead of --ratio)")
    p.add_argument("--balance", dest="balances",
                   help="comma-separated: false,true (default both): cores rescaled to equal norms after "
                        "decomposition (exact; Q = 0)")
    p.add_argument("--exclude", help="comma-separated layer-name patterns kept dense (default fc: the 3x3 "
                                     "convs are compressed, as in the paper)")
    p.add_argument("--methods", help="comma-separated: sgd,sam,asam,das,rebalance,sam-every-K,sam-random-Q "
                                     "(default sgd,sam,das)")
    p.add_argument("--seeds", help="comma-separated seeds (default 1)")
    p.add_argument("--epochs", type=int, help="fine-tuning epochs (default 2)")
    p.add_argument("--train-subset", dest="train_subset", type=int,
                   help="fine-tune on this many images (seeded, stratified; default all)")
    p.add_argument("--label-noise", dest="label_noise", type=float, help="label noise rate in [0, 1) (default 0)")
    p.add_argument("--device", help="auto (default), cpu or cuda[:i]")
    add_task_arguments(p, "compress", "results.json, compressed/, models/, compress_curves.png")


def run(args) -> int:
    started = time.time()
    if args.ranks is not None and args.ratios is None and not any(o.partition("=")[0].strip() == "ratios"
                                                                  for o in args.overrides):
        args.overrides = [*args.overrides, "ratios=[]"]      # --rank replaces the default ratio
    return run_task("compress", task_config("compress", args, FLAGS), args, started)
