"""The settings of a vision experiment (:class:`VisionConfig`): tensorized ResNets under label noise
(the paper's E4 and E5).  Imports no torch."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field
from typing import Literal

from tensorsam.run.config import AFFECTS, NEUTRAL, axis, check_choices

Dataset = Literal["digits", "fashion-mnist", "cifar10"]
Format = Literal["none", "cp", "tr", "tt", "tucker"]
# methods that scale the cores of scale-invariant groups: skipped on a dense network
NEEDS_GROUPS = ("das", "rebalance", "nbar", "obar")
_METHOD = re.compile(r"sgd|sam|asam|das|rebalance|sam-every-[1-9]\d*|sam-random-(?:0(?:\.\d+)?|1(?:\.0*)?|\.\d+)")


@dataclasses.dataclass
class VisionConfig:
    """Settings of a vision experiment.  ``label_noises``, ``formats``, ``ranks``, ``methods`` and
    ``seeds`` span the grid of runs; every other field except the progress settings and the
    checkpoint interval changes results.  The defaults are a quick run on scikit-learn's digits.

    DAS is the paper's Eq. 9 with the global u_D (``das_variant='paper'``); ``'authors'`` divides by
    ||G_k|| with u per group, as the authors' code does (its alpha scale is theirs, 0.1)."""

    dataset: Dataset = field(default="digits", metadata=AFFECTS)
    data_dir: str = field(default="", metadata=AFFECTS)  # '' = the dataset's default location
    val_size: int = field(default=0, metadata=AFFECTS)  # 0 = the dataset's default (Fashion-MNIST 6000)
    train_subset: int = field(default=0, metadata=AFFECTS)  # 0 = the whole training split
    test_subset: int = field(default=2000, metadata=AFFECTS)  # scored at every evaluation; full test at the end
    augment: bool = field(default=True, metadata=AFFECTS)  # random crop (padding 2) and horizontal flip
    label_noises: list[float] = field(default_factory=lambda: [0.0], metadata=axis("label_noise"))
    depth: Literal[20, 32] = field(default=20, metadata=AFFECTS)
    formats: list[Format] = field(default_factory=lambda: ["tr"], metadata=axis("format"))
    ranks: list[int] = field(default_factory=lambda: [5], metadata=axis("rank"))
    methods: list[str] = field(default_factory=lambda: ["sgd", "sam", "das"], metadata=axis("method"))
    seeds: list[int] = field(default_factory=lambda: [1], metadata=axis("seed"))
    epochs: int = field(default=3, metadata=AFFECTS)
    batch_size: int = field(default=128, metadata=AFFECTS)
    lr: float = field(default=0.05, metadata=AFFECTS)
    momentum: float = field(default=0.9, metadata=AFFECTS)
    weight_decay: float = field(default=5e-4, metadata=AFFECTS)
    rho: float = field(default=0.05, metadata=AFFECTS)
    alpha: float = field(default=0.1, metadata=AFFECTS)
    das_variant: Literal["paper", "authors"] = field(default="paper", metadata=AFFECTS)
    eval_every: int = field(default=0, metadata=AFFECTS)  # steps; 0 = every epoch
    threads: int = field(default=0, metadata=AFFECTS)  # torch CPU threads; 0 = torch's default
    device: str = field(default="auto", metadata=AFFECTS)
    # under torchrun: DDP (SAM perturbs per replica) or FSDP2 (sharded, SAM from the global gradient)
    distributed: Literal["ddp", "fsdp"] = field(default="ddp", metadata=AFFECTS)
    checkpoint_every: int = field(default=200, metadata=NEUTRAL)

    def __post_init__(self):
        check_choices(self)
        for m in self.methods:
            if not _METHOD.fullmatch(str(m)):
                raise ValueError(f"unknown method {m!r}; expected sgd, sam, asam, das, rebalance, sam-every-K "
                                 "or sam-random-Q (K a positive int, Q in [0, 1])")
        for name in ("methods", "seeds", "label_noises", "formats", "ranks"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty")
        for p in self.label_noises:
            if not (isinstance(p, int | float) and 0.0 <= p < 1.0):
                raise ValueError(f"label noise must lie in [0, 1), got {p!r}")
        for r in self.ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"rank must be a positive int, got {r!r}")
        check_training(self)


def check_training(cfg) -> None:
    """Refuse bad training settings of a config with the vision task's training fields (epochs,
    batch size, sizes, optimizer numbers, device); shared with the compress task."""
    for name in ("epochs", "batch_size", "checkpoint_every"):
        v = getattr(cfg, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    for name in ("val_size", "train_subset", "test_subset", "eval_every", "threads"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"{name} must be >= 0, got {getattr(cfg, name)!r}")
    for name in ("lr", "momentum", "weight_decay", "rho", "alpha"):
        v = getattr(cfg, name)
        if not (math.isfinite(v) and v >= 0):
            raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
    if cfg.device not in ("auto", "cpu") and not str(cfg.device).startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda[:i], got {cfg.device!r}")
