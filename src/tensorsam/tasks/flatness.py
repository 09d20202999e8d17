"""Flatness of completion solutions (E3, the paper's Fig. 2): 1-D loss curves.

For each solution (HOOI, Adam, SAM, DAS from one completion run and one mask seed) the cores
are moved along one fixed random direction D, G_k + d D_k for d in [-span, span], and the
training loss (the objective: sum of squared residuals on the training entries) and the
held-out R² are recorded.

- ``direction='raw'``: D ~ N(0, 1) over every core, scaled to unit global norm; the same D for
  every method (the paper's protocol).  Not scale-invariant: rescaling the cores of a solution
  (which leaves its tensor unchanged) changes its curve.
- ``direction='filter'``: each D_k is rescaled to the norm of its core, ||D_k|| = ||G_k||
  (filter normalisation, Li et al. 2018, per core).  Then G_k + d D_k = ||G_k|| (G_k/||G_k|| +
  d D_k/||D_k||), so a rescaling c_k with prod c_k = 1 leaves the curve unchanged.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
from dataclasses import field
from pathlib import Path
from typing import Literal

import torch

from tensorsam.run import load_checkpoint, write_results
from tensorsam.run.config import AFFECTS, check_choices
from tensorsam.run.io import check_writable_dir
from tensorsam.tasks import figure_grid, save_figure
from tensorsam.tasks.completion import CompletionConfig, contraction_plan, prepare, read_results, reconstruct
from tensorsam.tasks.completion.config import Method
from tensorsam.tensors import get_format

Direction = Literal["raw", "filter"]
DIRECTIONS: tuple[str, ...] = typing.get_args(Direction)


@dataclasses.dataclass
class FlatnessConfig:
    """Settings of the flatness probe; every field changes results (the curves' source, grid and
    direction).  Bad values are refused on construction."""

    source: str = field(default="", metadata=AFFECTS)  # a `tensorsam completion --out` dir; "": run one
    methods: list[Method] = field(default_factory=lambda: ["hooi", "adam", "sam", "das"], metadata=AFFECTS)
    seed: int = field(default=42, metadata=AFFECTS)  # mask seed whose solutions are probed
    directions: list[Direction] = field(default_factory=lambda: ["raw", "filter"], metadata=AFFECTS)
    span: float = field(default=3.0, metadata=AFFECTS)  # d in [-span, span], raw direction (unit global norm)
    filter_span: float = field(default=1.0, metadata=AFFECTS)  # the same for the filter-normalised one
    points: int = field(default=101, metadata=AFFECTS)
    direction_seed: int = field(default=0, metadata=AFFECTS)
    iterations: int = field(default=5000, metadata=AFFECTS)  # of the completion run made without a source

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a bad configuration (on construction, and again when a run starts)."""
        check_choices(self)
        if self.points < 2:
            raise ValueError(f"points must be at least 2, got {self.points}")
        if not (self.span > 0 and self.filter_span > 0):
            raise ValueError("span and filter_span must be positive")


def load_source(path) -> tuple[CompletionConfig, dict]:
    """The completion config and the solutions (tag -> cores) stored in a completion output dir."""
    cfg, _ = read_results(path)
    return cfg, load_checkpoint(Path(path) / "solutions.pt")


def random_direction(shapes, seed: int, dtype) -> list[torch.Tensor]:
    """Gaussian direction over cores of ``shapes`` with unit global Frobenius norm."""
    gen = torch.Generator().manual_seed(seed)
    d = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]
    total = torch.sqrt(sum(x.square().sum() for x in d))
    return [(x / total).to(dtype) for x in d]


def filter_normalised(direction, cores) -> list[torch.Tensor]:
    """Per-core rescaling ||D_k|| = ||G_k|| (scale-invariant, see the module docstring)."""
    return [d * (c.norm() / d.norm()) for d, c in zip(direction, cores)]


def curve(cores, direction, ts, plan, values, masks) -> dict[str, list[float]]:
    """Training loss (sum of squares) and held-out R² at ``cores + t * direction`` for each t."""
    tr = masks.train.reshape(-1)
    ho = masks.heldout.reshape(-1)
    x = values.reshape(-1).to(cores[0].dtype)
    y_ho = x[ho]
    ss_tot = (y_ho - y_ho.mean()).square().sum()
    loss, r2 = [], []
    for t in ts.tolist():
        pred = reconstruct([c + t * d for c, d in zip(cores, direction)], plan).reshape(-1)
        loss.append((pred[tr] - x[tr]).square().sum())
        r2.append(1 - (pred[ho] - y_ho).square().sum() / ss_tot)
    return {"loss": torch.stack(loss).double().tolist(), "heldout_r2": torch.stack(r2).double().tolist()}


def run_flatness(cfg: FlatnessConfig, work_dir=None, *, resume: bool = False, progress: bool = False) -> dict:
    """Curves for every (method, direction); returns ``{"runs": [...], "source": ...}``.  Without
    ``cfg.source`` a short completion runs first, into ``work_dir`` (``resume``: keep its cells).
    A curve of a solution whose completion run diverged says so (``status: "diverged"`` and the
    run's ``diverged_at``); the others say ``status: "ok"``."""
    cfg.validate()
    if cfg.source:
        ccfg, solutions = load_source(cfg.source)
        source_runs = read_results(cfg.source)[1]["runs"]
    else:
        from tensorsam.tasks.completion import run_completion

        ccfg = CompletionConfig(methods=list(cfg.methods), seeds=[cfg.seed], iterations=cfg.iterations)
        res = run_completion(ccfg, work_dir, resume=resume, progress=progress)
        solutions, source_runs = res["solutions"], res["runs"]
    diverged = {f"{r.get('method')}_seed{r.get('seed')}": r.get("diverged_at") for r in source_runs
                if r.get("status") == "diverged"}
    ccfg = dataclasses.replace(ccfg, seeds=[cfg.seed])
    data, masks = prepare(ccfg)
    dtype = getattr(torch, ccfg.dtype)
    plan = None
    runs = []
    raw = None
    for method in cfg.methods:
        tag = f"{method}_seed{cfg.seed}"
        if tag not in solutions:
            raise ValueError(f"the source has no solution {tag!r}; it has {sorted(solutions)}")
        cores = [c.to(dtype) for c in solutions[tag]]
        if plan is None:
            model = get_format(ccfg.model)(data.shape, [int(r) for r in ccfg.rank], dtype=dtype)
            plan = contraction_plan(model)
            raw = random_direction([c.shape for c in cores], cfg.direction_seed, dtype)
        for kind in cfg.directions:
            span = cfg.span if kind == "raw" else cfg.filter_span
            ts = torch.linspace(-span, span, cfg.points, dtype=torch.float64)
            if cfg.points % 2:
                ts[cfg.points // 2] = 0.0  # the solution itself, exactly
            d = raw if kind == "raw" else filter_normalised(raw, cores)
            t0 = time.perf_counter()
            with torch.no_grad():
                c = curve(cores, d, ts, plan, data.values, masks[cfg.seed])
            mid = cfg.points // 2
            one = int(torch.argmin((ts - span / 3).abs()))  # d = span/3 (1 for the raw default)
            status = ({"status": "diverged", "diverged_at": diverged[tag]} if tag in diverged
                      else {"status": "ok"})
            runs.append({"method": method, "label": f"{method} ({kind})", "direction": kind, **status,
                         "loss_at_0": c["loss"][mid], "heldout_r2_at_0": c["heldout_r2"][mid],
                         "loss_rise_at_third": 0.5 * (c["loss"][one] + c["loss"][cfg.points - 1 - one])
                         - c["loss"][mid],
                         "wall_seconds": time.perf_counter() - t0,
                         "trace": {"d": ts.tolist(), **c}})
    return {"runs": runs, "source": cfg.source or str(work_dir)}


def run(cfg: FlatnessConfig, out_dir=None, *, resume: bool = False, progress: bool = False,
        started: float | None = None) -> dict:
    """:func:`run_flatness` as a task: its completion (without a source) runs in ``out_dir/completion``
    and ``out_dir/results.json`` is written; returns the results written (or the curves).  An
    ``out_dir`` that cannot be written is refused before anything runs."""
    started = time.time() if started is None else started
    if out_dir is not None:
        check_writable_dir(out_dir)
    work = None if out_dir is None else Path(out_dir) / "completion"
    result = run_flatness(cfg, work, resume=resume, progress=progress)
    if out_dir is None:
        return result
    return write_results(Path(out_dir) / "results.json", task="flatness", config=cfg, runs=result["runs"],
                         extra={"source": result["source"], "group_by": ["method", "direction"]},
                         started=started)


def summary_lines(runs: list[dict]) -> list[str]:
    """One line per curve: the loss at the solution, its mean rise at d = ±span/3, the held-out R²
    (``null`` where not finite, e.g. for the solution of a diverged run)."""
    def g(v) -> str:
        return "null" if v is None or not math.isfinite(v) else f"{v:.4g}"

    return [f"{r['label']:<18} loss at 0 {g(r['loss_at_0'])}, mean rise at d=±span/3 "
            f"{g(r['loss_rise_at_third'])}, held-out R² at 0 {g(r['heldout_r2_at_0'])}" for r in runs]


def figures(results: dict, out_dir: Path) -> list[Path]:
    """Fig. 2 analogue: training loss and held-out R² along the direction(s), one line per method."""

    runs = [r for r in results["runs"] if "trace" in r]
    kinds = list(dict.fromkeys(r["direction"] for r in runs))
    if not runs:
        return []
    fig, axes = figure_grid(2, len(kinds), (5.0 * len(kinds), 7.0))
    for j, kind in enumerate(kinds):
        for r in (r for r in runs if r["direction"] == kind):
            tr = r["trace"]
            axes[0, j].plot(tr["d"], tr["loss"], label=r["method"])
            axes[1, j].plot(tr["d"], tr["heldout_r2"], label=r["method"])
        title = "random direction, unit global norm" if kind == "raw" else "filter-normalised direction"
        axes[0, j].set_title(title)
        axes[0, j].set_yscale("log")
        axes[1, j].set_yscale("symlog")
        axes[1, j].set_xlabel("d")
    axes[0, 0].set_ylabel("training loss (sum of squares)")
    axes[1, 0].set_ylabel("held-out R²")
    axes[0, 0].legend()
    return [save_figure(fig, out_dir, "fig2_flatness.png")]
