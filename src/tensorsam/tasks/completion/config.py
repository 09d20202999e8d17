"""The settings of a completion experiment (:class:`CompletionConfig`); imports no torch until a
base optimizer name is checked."""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import field
from typing import Literal

from tensorsam.run.config import AFFECTS, NEUTRAL, axis, check_choices

Method = Literal["hooi", "adam", "sam", "das", "rebalance"]
Model = Literal["tucker", "cp", "tt", "tr"]
Protocol = Literal["paper", "validated"]
METHODS: tuple[str, ...] = typing.get_args(Method)
MODELS: tuple[str, ...] = typing.get_args(Model)
PROTOCOLS: tuple[str, ...] = typing.get_args(Protocol)


@dataclasses.dataclass
class CompletionConfig:
    """Settings of a completion experiment; the defaults are the paper's protocol (Table 1).

    ``loss='sum'`` is the sum of squared residuals over the training entries (the authors'
    code); ``'mean'`` divides it by their number.  Caveat: DAS's lambda scales with the
    gradients' size relative to the cores, so alpha = 0.001 is calibrated for the sum; with
    the mean the same alpha acts differently (and SAM's rho is unaffected only because SAM
    normalises the gradient).

    Every field but ``checkpoint_every`` changes results (:func:`tensorsam.run.result_fields`):
    ``log_every`` sets the trace's rows and, under the validated protocol, when early stopping
    looks; ``compile``, ``threads`` and ``dtype`` change the last bits.  ``methods`` and ``seeds``
    span the grid of runs (:class:`tensorsam.run.Sweep`).  Bad values are refused on construction;
    a combination no run can use (HOOI with a non-Tucker model; a config also serves to build one
    model, :func:`~tensorsam.tasks.completion.build_model`) when a run starts (:meth:`validate`).
    """

    dataset: str = field(default="covid19", metadata=AFFECTS)  # a tensorly data set name or a .npy path
    standardize: bool = field(default=False, metadata=AFFECTS)  # z-score the observed entries
    allow_missing: bool = field(default=False, metadata=AFFECTS)  # for .npy files: NaNs are missing entries
    model: Model = field(default="tucker", metadata=AFFECTS)
    rank: list[int] = field(default_factory=lambda: [8, 6, 8], metadata=AFFECTS)
    methods: list[Method] = field(default_factory=lambda: list(METHODS), metadata=axis("method"))
    seeds: list[int] = field(default_factory=lambda: [42, 87, 100], metadata=axis("seed"))
    iterations: int = field(default=50000, metadata=AFFECTS)
    train_fraction: float = field(default=0.3, metadata=AFFECTS)
    protocol: Protocol = field(default="paper", metadata=AFFECTS)
    val_fraction: float = field(default=0.2, metadata=AFFECTS)  # validated: share of training entries held
    rank_grid: list[list[int]] = field(default_factory=list, metadata=AFFECTS)  # validated: candidate ranks
    patience: int = field(default=10, metadata=AFFECTS)  # validated: evaluations without a better val R²
    optimizer: str = field(default="Adam", metadata=AFFECTS)  # any torch.optim class name
    lr: float = field(default=1e-3, metadata=AFFECTS)
    weight_decay: float = field(default=0.0, metadata=AFFECTS)
    rho: float = field(default=0.01, metadata=AFFECTS)  # SAM
    alpha: float = field(default=0.001, metadata=AFFECTS)  # DAS
    alpha_schedule: Literal["constant", "linear", "cosine"] = field(default="linear", metadata=AFFECTS)
    rebalance_every: int = field(default=1, metadata=AFFECTS)
    loss: Literal["sum", "mean"] = field(default="sum", metadata=AFFECTS)
    # tensorly: the authors' init (U[0,1) cores, Tucker core + 0.01); unified: variance-matched
    init: Literal["tensorly", "unified"] = field(default="tensorly", metadata=AFFECTS)
    hooi_iterations: int = field(default=50000, metadata=AFFECTS)
    hooi_tol: float = field(default=1e-5, metadata=AFFECTS)
    log_every: int = field(default=500, metadata=AFFECTS)  # metrics, dynamics, (validated) evaluation
    checkpoint_every: int = field(default=2000, metadata=NEUTRAL)  # resuming is bit-identical
    compile: bool = field(default=True, metadata=AFFECTS)  # torch.compile the gradient (eager if it fails)
    threads: int = field(default=1, metadata=AFFECTS)  # torch threads (the problem is tiny); 0: leave as is
    dtype: Literal["float32", "float64"] = field(default="float32", metadata=AFFECTS)

    def __post_init__(self) -> None:
        self.check_values()

    def validate(self) -> None:
        """Refuse a configuration no run can use, before anything runs or is written
        (:func:`tensorsam.tasks.completion.prepare` calls it; values are checked again, in case a
        field was assigned since construction)."""
        self.check_values()
        if "hooi" in self.methods and self.model != "tucker":
            raise ValueError(f"method 'hooi' fits a Tucker model; it cannot run with model={self.model!r}")

    def check_values(self) -> None:
        """Refuse a bad value of any field (on construction)."""
        check_choices(self)
        if not self.methods:
            raise ValueError("methods is empty; expected some of " + ", ".join(METHODS))
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"methods lists a method twice: {self.methods}")
        optimizer_class(self.optimizer)
        if not self.seeds:
            raise ValueError("seeds is empty")
        if not 0.0 < self.train_fraction < 1.0:
            raise ValueError(f"train_fraction must lie in (0, 1), got {self.train_fraction}")
        if self.protocol == "validated" and not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must lie in (0, 1) under the validated protocol, "
                             f"got {self.val_fraction}")
        for key in ("iterations", "log_every", "checkpoint_every", "rebalance_every", "hooi_iterations",
                    "patience", "threads"):
            value = getattr(self, key)
            if value < (0 if key == "threads" else 1):
                raise ValueError(f"{key} must be positive, got {value}")
        for key in ("lr", "rho", "alpha", "weight_decay", "hooi_tol"):
            if not (math.isfinite(getattr(self, key)) and getattr(self, key) >= 0):
                raise ValueError(f"{key} must be a non-negative number, got {getattr(self, key)}")


def optimizer_class(name: str):
    """The ``torch.optim`` class called ``name`` (e.g. 'Adam', 'AdamW', 'SGD')."""
    import torch

    cls = getattr(torch.optim, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
        valid = sorted(n for n, c in vars(torch.optim).items()
                       if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and n != "Optimizer")
        raise ValueError(f"unknown base optimizer {name!r}; expected a torch.optim class: {valid}")
    return cls


def candidate_ranks(cfg: CompletionConfig) -> list[list[int]]:
    """The ranks to try: ``rank_grid`` under the validated protocol (if given), else ``rank``."""
    if cfg.protocol == "validated" and cfg.rank_grid:
        return [list(r) for r in cfg.rank_grid]
    return [list(cfg.rank)]
