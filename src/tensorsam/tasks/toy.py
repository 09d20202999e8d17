"""The norm-dynamics toy (E2, the paper's Fig. 1): GD vs SAM on a Tucker-2 model.

A Tucker-2 model X^ = A G B (A: n x r, G: r x r, B: r x n; here a :class:`Tucker` of shape
(n, n) and rank (r, r), cores [G, A, B^T]) is fitted to Y = T + noise * N, where T has rank r
and N is standard Gaussian noise, by minimising 1/2 ||X^ - Y||_F^2 with plain gradient
descent (GD) or with SAM over GD.  The start is imbalanced (A scaled up, B down, the
product unchanged).  The norm deviation Q (Eq. 5) and Cov(s, gamma) (Theorem 3) are recorded.

Theory (the DAS paper, Theorems 1-3): under gradient flow Q is conserved (Theorem 1; a finite
step changes it by O(eta^2)); under SAM dQ/dt = 4 rho u K Cov(s, gamma) + O(rho^2), so Q keeps
falling as long as the gradients do not vanish, which noise (a residual no rank-r model can fit) ensures.

The paper gives no shapes, ranks, step size, rho, noise levels or iteration counts; the
defaults below are our choice (documented in the README) and every one is configurable.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from dataclasses import field
from pathlib import Path
from typing import Literal

import torch

from tensorsam.dynamics import NormTracker
from tensorsam.run import Sweep, result_fields, write_results
from tensorsam.run.config import AFFECTS, axis, check_choices
from tensorsam.run.io import check_writable_dir
from tensorsam.run.loop import Divergence, Loop
from tensorsam.tasks import figure_grid, save_figure
from tensorsam.tensors import get_format

Method = Literal["gd", "sam"]
METHODS: tuple[str, ...] = typing.get_args(Method)


@dataclasses.dataclass
class ToyConfig:
    """Settings of the toy; every field changes results (``log_every`` sets the trace's rows,
    ``threads`` the last bits); ``noises`` and ``methods`` span the grid of runs."""

    size: int = field(default=30, metadata=AFFECTS)  # n: T and Y are n x n
    rank: int = field(default=5, metadata=AFFECTS)  # r: rank of T; A is n x r, G r x r, B r x n
    noises: list[float] = field(default_factory=lambda: [0.0, 0.5, 1.0, 2.0], metadata=axis("noise"))
    methods: list[Method] = field(default_factory=lambda: list(METHODS), metadata=axis("method"))
    iterations: int = field(default=10000, metadata=AFFECTS)
    lr: float = field(default=0.005, metadata=AFFECTS)  # GD step (small: GD stays close to gradient flow)
    rho: float = field(default=0.05, metadata=AFFECTS)  # SAM radius
    init_scale: float = field(default=0.3, metadata=AFFECTS)  # std of A, G, B^T entries before the imbalance
    imbalance: float = field(default=3.0, metadata=AFFECTS)  # A <- c A, B <- B / c at the start
    log_every: int = field(default=50, metadata=AFFECTS)
    seed: int = field(default=0, metadata=AFFECTS)
    threads: int = field(default=1, metadata=AFFECTS)  # torch threads (the model is tiny); 0: leave as is

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse a bad configuration (on construction, and again when a run starts)."""
        check_choices(self)
        if not self.noises or any(not n >= 0 for n in self.noises):
            raise ValueError(f"noises must be a non-empty list of non-negative numbers, got {self.noises}")
        if self.rank < 1 or self.size < self.rank:
            raise ValueError(f"need 1 <= rank <= size, got rank {self.rank} and size {self.size}")
        for key in ("iterations", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")
        for key in ("lr", "rho", "init_scale", "imbalance"):
            if not getattr(self, key) > 0:
                raise ValueError(f"{key} must be positive, got {getattr(self, key)}")


def make_problem(cfg: ToyConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(T, N): a rank-``rank`` target with unit-variance entries and standard Gaussian noise."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n, r = cfg.size, cfg.rank
    t = torch.randn(n, r, generator=gen, dtype=torch.float64) @ torch.randn(r, n, generator=gen,
                                                                          dtype=torch.float64) / r**0.5
    return t, torch.randn(n, n, generator=gen, dtype=torch.float64)


def make_model(cfg: ToyConfig):
    """The Tucker-2 model with an imbalanced random start (same start for every run)."""
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    model = get_format("tucker")((cfg.size, cfg.size), (cfg.rank, cfg.rank), dtype=torch.float64)
    with torch.no_grad():
        for c in model.cores:
            c.copy_(torch.randn(c.shape, generator=gen, dtype=torch.float64) * cfg.init_scale)
        model.cores[1].mul_(cfg.imbalance)  # A
        model.cores[2].div_(cfg.imbalance)  # B^T
    return model


def run_one(cfg: ToyConfig, method: str, noise: float, target: torch.Tensor, *, checkpoint=None,
            resume: bool = False, progress: bool = False, desc: str = "", fingerprint: dict | None = None) -> dict:
    """Fit one (method, noise) run; returns its record with the Q / Cov trace.

    The steps run on a :class:`~tensorsam.run.Loop` (``checkpoint``/``resume``/``progress``/
    ``fingerprint`` as there), so a killed run continues bit-identically.  Each step's loss goes
    into a :class:`~tensorsam.run.loop.Divergence` (no host read in the step), read at every trace
    row; a non-finite loss at a row is a non-finite loss of the next step.  A run that diverges
    stops there: ``status: "diverged"`` and ``diverged_at`` (the step, 1-based), its trace up to the
    last finite row; other runs say ``status: "ok"``."""
    from tensorsam.optim import SAM

    model = make_model(cfg)
    cores = list(model.cores)
    opt = (torch.optim.SGD(cores, lr=cfg.lr) if method == "gd"
           else SAM(cores, torch.optim.SGD, rho=cfg.rho, lr=cfg.lr))
    tracker = NormTracker([cores])

    def closure():
        for c in cores:
            c.grad = None
        loss = 0.5 * (model.reconstruct() - target).square().sum()
        loss.backward()
        return loss

    def row(it: int) -> int | None:
        """Append the trace row at iteration ``it``; the step at which the run diverged, if it did."""
        diverged = divergence.read(it)
        loss = closure()  # gradient at the current point, for Cov
        if diverged is None and not torch.isfinite(loss):
            diverged = it + 1
        if diverged is None:
            dyn = tracker.compute()
            ex["rows"].append(torch.stack([loss.detach(), dyn["Q"][0], dyn["cov"][0]]))
            ex["its"].append(it)
        return diverged

    loop = Loop(cfg.iterations, state={"model": model, "optimizer": opt}, checkpoint=checkpoint,
                every=max(cfg.log_every, 1000 // cfg.log_every * cfg.log_every), resume=resume,
                desc=desc, progress=progress, fingerprint=fingerprint)
    if not loop.resumed:
        loop.extra = {"rows": [], "its": [], "wall": 0.0}
    ex = loop.extra
    divergence, diverged = Divergence(ex, target.device), None
    t0 = time.perf_counter()
    for it in loop:
        if it % cfg.log_every == 0 and (diverged := row(it)) is not None:
            break
        if method == "gd":
            loss = closure()
            opt.step()
        else:
            loss = opt.step(closure)
        divergence.update(loss, it + 1)
        ex["wall"] = ex.get("wall", 0.0) + time.perf_counter() - t0   # saved with the loop's checkpoints
        t0 = time.perf_counter()
    if diverged is None:
        diverged = row(cfg.iterations)
    wall = ex["wall"] + time.perf_counter() - t0
    table = torch.stack(ex["rows"]).tolist() if ex["rows"] else []
    cols = {"iteration": list(ex["its"]), **{k: [r[j] for r in table] for j, k in enumerate(("loss", "Q", "cov"))}}
    status = {"status": "ok"} if diverged is None else {"status": "diverged", "diverged_at": diverged}
    q0, q1, last = (cols["Q"][0], cols["Q"][-1], cols["loss"][-1]) if table else (None, None, None)
    return {"method": method, "label": f"{method} noise={noise:g}", "noise": noise, **status,
            "Q_initial": q0, "Q_final": q1, "Q_ratio": None if q0 is None else q1 / q0,
            "final_loss": last, "wall_seconds": wall, "trace": cols}


def run_toy(cfg: ToyConfig, out_dir=None, *, resume: bool = False, progress: bool = False,
            started: float | None = None) -> dict:
    """Every (noise, method) run of ``cfg``; returns ``{"runs": [...], "sweep": ...}``.

    With ``out_dir`` the runs form a :class:`~tensorsam.run.Sweep` there (``resume=True`` keeps
    the finished ones, so adding a noise level runs only its cells, and an interrupted run continues
    from its checkpoint) and ``results.json`` is written.  ``progress`` shows a bar per run."""
    started = time.time() if started is None else started
    cfg.validate()
    if out_dir is not None:
        check_writable_dir(out_dir)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    t, n = make_problem(cfg)
    sweep = Sweep({"noise": cfg.noises, "method": cfg.methods}, out_dir, resume=resume,
                  tag=lambda c: f"{c['method']}_noise{c['noise']:g}", same=result_fields(cfg, grid=False))

    def write(result):
        write_results(Path(out_dir) / "results.json", task="toy", config=cfg, runs=result.all_runs(),
                      extra={"group_by": ["method", "noise"], "sweep": result.record()}, started=started)

    def cell(c):
        return run_one(cfg, c["method"], c["noise"], t + c["noise"] * n, checkpoint=sweep.checkpoint(c, "run"),
                       resume=resume, progress=progress, desc=c.tag, fingerprint=sweep.fingerprint(c)), None

    result = sweep.run(cell, write, progress=progress)
    return {"runs": result.runs, "sweep": result}


def summary_lines(runs: list[dict]) -> list[str]:
    """One line per run: Q at the start and the end, and the final loss (or where it diverged)."""
    def g(v, spec: str = ".4g") -> str:
        return "null" if v is None else format(v, spec)

    return [f"{r['label']:<18} Q {g(r['Q_initial'])} -> {g(r['Q_final'])} (x{g(r['Q_ratio'], '.3f')})  "
            + (f"diverged at step {r['diverged_at']}" if r.get("status") == "diverged"
               else f"final loss {g(r['final_loss'])}") for r in runs]


def figures(results: dict, out_dir: Path) -> list[Path]:
    """Fig. 1 analogue: Q and Cov(s, gamma) against iterations, GD vs SAM, one column per noise."""
    runs = [r for r in results["runs"] if "trace" in r]
    noises = sorted({r["noise"] for r in runs})
    if not runs:
        return []
    fig, axes = figure_grid(2, len(noises), (3.2 * len(noises), 5.6), sharey="row")
    styles = {"gd": {"color": "tab:blue", "label": "GD"}, "sam": {"color": "tab:red", "label": "SAM"}}
    for j, noise in enumerate(noises):
        for r in (r for r in runs if r["noise"] == noise):
            tr = r["trace"]
            axes[0, j].plot(tr["iteration"], tr["Q"], **styles.get(r["method"], {}))
            axes[1, j].plot(tr["iteration"], tr["cov"], **styles.get(r["method"], {}))
        axes[0, j].set_title(f"noise = {noise:g}")
        axes[0, j].set_yscale("log")
        axes[1, j].set_xlabel("iteration")
        axes[1, j].set_yscale("symlog")
        axes[1, j].axhline(0.0, color="grey", lw=0.5)
    axes[0, 0].set_ylabel("norm deviation Q")
    axes[1, 0].set_ylabel("Cov(s, γ)")
    axes[0, 0].legend()
    return [save_figure(fig, out_dir, "fig1_toy.png")]
