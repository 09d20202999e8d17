"""Configs of the FLoRA and LoRETTA tuners (peft ``PeftConfig`` dataclasses)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Literal

from peft.config import PeftConfig

from tensorsam.adapters.peft_types import peft_type


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


@dataclass
class TensorAdapterConfig(PeftConfig):
    """Fields shared by FLoRA and LoRETTA; they follow peft's ``LoraConfig`` where they mean the same.

    ``target_modules``: a list matched by exact name or name suffix, a regex string (full match),
    or ``"all-linear"``; ``None`` takes peft's LoRA defaults for known architectures.  Unlike
    peft's LoRA, a list entry that matches no module is an error, not silently skipped.
    """

    r: int = field(default=8, metadata={"help": "adapter rank r (s = alpha / r)"})
    alpha: float = field(default=16.0, metadata={"help": "scale numerator: ΔW is multiplied by s = alpha / r"})
    dropout: float = field(default=0.0, metadata={"help": "dropout on the adapter's input"})
    target_modules: list[str] | str | None = field(
        default=None, metadata={"help": "modules to adapt: names/suffixes, a regex, or 'all-linear'"})
    exclude_modules: list[str] | str | None = field(
        default=None, metadata={"help": "modules not to adapt: names/suffixes or a regex"})
    layers_to_transform: list[int] | int | None = field(
        default=None, metadata={"help": "only these layer indices (see peft's LoraConfig)"})
    layers_pattern: list[str] | str | None = field(
        default=None, metadata={"help": "name of the layer list, with layers_to_transform"})
    bias: Literal["none", "all"] = field(default="none", metadata={"help": "'all' also trains every bias"})
    modules_to_save: list[str] | None = field(
        default=None, metadata={"help": "extra modules trained and saved in full (e.g. a classifier head)"})

    def __post_init__(self):
        super().__post_init__()
        self.r = _positive_int(self.r, "r (the adapter rank)")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.bias not in ("none", "all"):
            raise ValueError(f"bias must be 'none' or 'all', got {self.bias!r}")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("layers_to_transform cannot be used when target_modules is a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("layers_pattern needs layers_to_transform")


@dataclass
class FloraConfig(TensorAdapterConfig):
    """FLoRA (Si et al., ICLR 2025; DAS paper appendix B): ΔW = s·B·G·A with A r×in, G r×r,
    B out×r and s = alpha/r.

    ``init_weights=True`` (default): A and B Kaiming-uniform as LoRA's A, G = 0, so ΔW = 0 at the
    start (as the authors ran E7).  ``False``: G random too (ΔW ≠ 0; for tests).

    Example::

        import tensorsam.adapters                     # registers the tuners with peft
        model = peft.get_peft_model(model, FloraConfig(target_modules=["query", "value"], r=8))
    """

    init_weights: bool = field(default=True, metadata={"help": "G = 0 so that ΔW = 0 at the start"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type("FLORA")


@dataclass
class LorettaConfig(TensorAdapterConfig):
    """LoRETTA as the authors ran it (``loretta_rep``; Yang et al., NAACL 2024; DAS paper appendix B):
    ΔW = s·B·A with A (in→r) and B (r→out) each a tensor-train, TT ranks [1, R, …, R, 1], s = alpha/r.

    ``tt_rank``: R; ``None`` takes the largest at which the adapter has no more trainable
    parameters than LoRA of rank r (per layer).  ``tt_factors``: shape-rule overrides, size →
    factors, e.g. ``{11008: [43, 16, 16]}`` (see ``tensorsam.adapters.tt`` for the rule).

    Initialisation: every core Gaussian, scaled so that the reconstructed A has the root-mean-square
    of LoRA's A (1/sqrt(3·in)) and B that of ``init_std``, small, so ΔW starts as small noise and
    every core receives a gradient.  ``zero_init=True`` then zeroes B's last core,
    so ΔW = 0 at the start (as LoRA's B = 0).
    """

    tt_rank: int | None = field(default=None, metadata={"help": "TT rank R (default: LoRA's budget)"})
    tt_factors: dict | None = field(default=None, metadata={"help": "size -> factors overrides"})
    init_std: float = field(default=1e-3, metadata={"help": "std of the initial B matrix's entries"})
    zero_init: bool = field(default=False, metadata={"help": "zero B's last core: ΔW = 0 at the start"})

    def __post_init__(self):
        super().__post_init__()
        self.peft_type = peft_type("LORETTA")
        if self.tt_rank is not None:
            self.tt_rank = _positive_int(self.tt_rank, "tt_rank")
        if self.tt_factors:   # JSON turns int keys into strings
            self.tt_factors = {int(k): [int(x) for x in v] for k, v in self.tt_factors.items()}
        if not float(self.init_std) >= 0.0:
            raise ValueError(f"init_std must be >= 0, got {self.init_std!r}")
