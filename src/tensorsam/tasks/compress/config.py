"""The settings of a compress-then-fine-tune experiment (:class:`CompressConfig`, the paper's E6).
Imports no torch."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import field
from typing import Literal

from tensorsam.run.config import AFFECTS, NEUTRAL, axis, check_choices

Arch = Literal["", "resnet20", "resnet32"]
Dataset = Literal["", "digits", "fashion-mnist", "cifar10"]
Format = Literal["tt", "tr", "tucker", "cp"]


@dataclasses.dataclass
class CompressConfig:
    """Settings of ``tensorsam compress``: a dense network (``model``) is compressed in each of
    ``formats`` to each target (``ratios``, the whole network's parameters before / after, or
    ``ranks``, one rank for every layer: exactly one of the two lists is non-empty), with and
    without balanced cores (``balances``), then fine-tuned with each method and seed.

    ``model`` is ``DIR/models/<run>.pt`` of ``tensorsam vision --format none`` (its architecture
    and data set are read from it; ``weights`` picks its final or best-on-validation weights), or a
    plain ``state_dict`` file, which needs ``arch`` and ``dataset``.  ``exclude`` names the layers
    kept dense (fnmatch patterns): by default the classifier ``fc``, so every 3x3 conv is
    compressed, as the paper compresses ResNet-18's 3x3 convs.  The training fields mean what they
    mean for ``tensorsam vision`` (fine-tuning defaults: a smaller lr, 2 epochs)."""

    model: str = field(default="", metadata=AFFECTS)
    weights: Literal["final", "best"] = field(default="final", metadata=AFFECTS)
    arch: Arch = field(default="", metadata=AFFECTS)          # '' = the checkpoint's
    dataset: Dataset = field(default="", metadata=AFFECTS)    # '' = the checkpoint's
    data_dir: str = field(default="", metadata=AFFECTS)       # '' = the checkpoint's, else the default location
    val_size: int = field(default=0, metadata=AFFECTS)        # 0 = the dataset's default
    train_subset: int = field(default=0, metadata=AFFECTS)    # 0 = the whole training split
    test_subset: int = field(default=2000, metadata=AFFECTS)  # scored at every evaluation; full test at the end
    augment: bool = field(default=True, metadata=AFFECTS)
    label_noise: float = field(default=0.0, metadata=AFFECTS)
    formats: list[Format] = field(default_factory=lambda: ["tt"], metadata=axis("format"))
    ratios: list[float] = field(default_factory=lambda: [2.5], metadata=axis("target_ratio"))
    ranks: list[int] = field(default_factory=list, metadata=axis("rank"))
    balances: list[bool] = field(default_factory=lambda: [False, True], metadata=axis("balance"))
    exclude: list[str] = field(default_factory=lambda: ["fc"], metadata=AFFECTS)
    methods: list[str] = field(default_factory=lambda: ["sgd", "sam", "das"], metadata=axis("method"))
    seeds: list[int] = field(default_factory=lambda: [1], metadata=axis("seed"))
    epochs: int = field(default=2, metadata=AFFECTS)
    batch_size: int = field(default=128, metadata=AFFECTS)
    lr: float = field(default=0.01, metadata=AFFECTS)
    momentum: float = field(default=0.9, metadata=AFFECTS)
    weight_decay: float = field(default=5e-4, metadata=AFFECTS)
    rho: float = field(default=0.05, metadata=AFFECTS)
    alpha: float = field(default=0.1, metadata=AFFECTS)
    das_variant: Literal["paper", "authors"] = field(default="paper", metadata=AFFECTS)
    eval_every: int = field(default=0, metadata=AFFECTS)      # steps; 0 = every epoch
    threads: int = field(default=0, metadata=AFFECTS)
    device: str = field(default="auto", metadata=AFFECTS)
    checkpoint_every: int = field(default=200, metadata=NEUTRAL)

    def __post_init__(self):
        check_choices(self)
        if not self.model:
            raise ValueError("no model to compress: give --model (DIR/models/<run>.pt of `tensorsam vision`, "
                             "or a state_dict file with --arch and --data)")
        self._check_targets()
        self._check_training()

    @property
    def target_axis(self) -> str:
        """The run-record key of the compression target: ``target_ratio`` or ``rank``."""
        return "target_ratio" if self.ratios else "rank"

    def _check_targets(self) -> None:
        if bool(self.ratios) == bool(self.ranks):
            raise ValueError("give exactly one compression target: ratios (--ratio, the model's parameters "
                             "before / after) or ranks (--rank, one rank for every layer)"
                             + ("; got both (set ratios=[] to give ranks)" if self.ratios else "; got neither"))
        for r in self.ratios:
            if not (math.isfinite(r) and r > 1):
                raise ValueError(f"ratio must be > 1 (the model's parameters before / after compression), got {r!r}")
        for r in self.ranks:
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"rank must be a positive int, got {r!r}")
        for name in ("formats", "balances", "methods", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty")

    def _check_training(self) -> None:
        from tensorsam.tasks.vision.config import VisionConfig, check_training

        VisionConfig(methods=list(self.methods))    # the vision task's methods, refused with its message
        if not 0.0 <= self.label_noise < 1.0:
            raise ValueError(f"label noise must lie in [0, 1), got {self.label_noise!r}")
        check_training(self)
