"""Tensor completion (E1): fit a factorized tensor to a random subset of entries.

The paper's protocol (its tensor-completion experiment, Table 1) is the default of
:class:`CompletionConfig`: the COVID-19 serology tensor, Tucker rank (8, 6, 8), mask seeds
42/87/100 (30 % of entries train, the rest held out), 50 000 Adam steps at lr 1e-3 on the *sum*
of squared residuals over the training entries, SAM rho = 0.01, DAS alpha = 0.001 decaying
linearly to 0, and tensorly's masked HOOI as the baseline.  Every run reports R² (mean-centred,
as the appendix defines it), the uncentred 1 - ||X^-X||²/||X||² of the authors' code and RMSE,
each on the training entries and on the held-out entries, labelled.  The paper's Table 1 is the
*training* R².

``protocol='validated'`` carves a validation split out of the training entries and uses it
for early stopping and for choosing the rank among ``rank_grid``, so that held-out R² means
something (under the paper's protocol rank (8, 6, 8) overfits 30 % of the entries).

The package, one job per module:

- :mod:`.config`: :class:`CompletionConfig` (typed, checked on construction);
- :mod:`.objective`: the loss on gathered entries, its (compiled, fused) gradient and steps;
- :mod:`.fit`: the model, the optimizer of a method, one training run, HOOI, the scores;
- :mod:`.experiment`: the grid of (seed, method) runs as a resumable, growing sweep; merging;
- :mod:`.report`: the summary lines and the figures.
"""

from tensorsam.tasks.completion.config import (
    METHODS,
    MODELS,
    PROTOCOLS,
    CompletionConfig,
    candidate_ranks,
    optimizer_class,
)
from tensorsam.tasks.completion.experiment import (
    PAPER_TABLE1,
    PROTOCOL_NOTE,
    completion_sweep,
    merge_results,
    prepare,
    read_results,
    run_completion,
)
from tensorsam.tasks.completion.fit import build_model, evaluate, hooi_run, make_optimizer, select, train_run
from tensorsam.tasks.completion.objective import (
    Objective,
    contraction_plan,
    gradient_fns,
    reconstruct,
    train_loss_fn,
)
from tensorsam.tasks.completion.report import figures, summary_lines

__all__ = [
    "METHODS", "MODELS", "PAPER_TABLE1", "PROTOCOLS", "PROTOCOL_NOTE", "CompletionConfig", "Objective",
    "build_model", "candidate_ranks", "completion_sweep", "contraction_plan", "evaluate", "figures",
    "gradient_fns", "hooi_run", "make_optimizer", "merge_results", "optimizer_class", "prepare",
    "read_results", "reconstruct", "run_completion", "select", "summary_lines", "train_loss_fn", "train_run",
]
