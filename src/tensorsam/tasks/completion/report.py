"""What ``tensorsam completion`` prints and ``tensorsam report`` draws: one summary line per
method, and the norm-dynamics and R² figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from tensorsam.tasks import figure_grid, save_figure


def diverged(run: dict) -> bool:
    """Whether a run record says its training diverged (``status: "diverged"``)."""
    return run.get("status") == "diverged"


def summary_lines(runs: list[dict]) -> list[str]:
    """One line per method: mean ± std over seeds of training and held-out R², diverged runs left
    out of the means (and counted on the line)."""
    lines = [f"{'method':<10} {'train R²':>18} {'held-out R²':>22} {'wall s':>8}"]
    for method in dict.fromkeys(r["method"] for r in runs):
        sel = [r for r in runs if r["method"] == method]
        ok = [r for r in sel if not diverged(r)]

        def ms(key, ok=ok):
            if not ok:
                return "–"
            v = np.array([math.nan if r.get(key) is None else r[key] for r in ok], dtype=float)
            return f"{v.mean():.4f}" + (f" ± {v.std(ddof=1):.4f}" if len(v) > 1 else " (n=1)")

        wall = sum(r["wall_seconds"] for r in sel) / len(sel)
        note = f"  ({len(sel) - len(ok)} of {len(sel)} diverged)" if len(ok) < len(sel) else ""
        lines.append(f"{method:<10} {ms('train_r2'):>18} {ms('heldout_r2'):>22} {wall:>8.1f}{note}")
    return lines


def figures(results: dict, out_dir: Path) -> list[Path]:
    """Norm dynamics (Q, Cov) and training R² against iterations, one line per (method, seed), and
    training / held-out R² per method (mean ± std over seeds, diverged runs left out)."""
    colors = {m: f"C{i}" for i, m in enumerate(dict.fromkeys(r["method"] for r in results["runs"]))}
    runs = [r for r in results["runs"] if not diverged(r)]   # the bars: a diverged run has no final fit
    methods = list(dict.fromkeys(r["method"] for r in runs))
    paths = []
    traced = [r for r in results["runs"] if r.get("trace")]  # a diverged run's trace stops before it
    if traced:
        fig, (axes,) = figure_grid(1, 3, (15, 4))
        for r in traced:
            tr = r["trace"]
            label = r["method"] if r["seed"] == min(x["seed"] for x in traced) else None
            for ax, key in zip(axes, ("Q", "cov", "train_r2")):
                ax.plot(tr["iteration"], np.asarray(tr[key], dtype=float), color=colors[r["method"]], lw=1,
                        label=label)
        axes[0].set(yscale="log", ylabel="norm deviation Q", xlabel="iteration")
        axes[1].set(yscale="symlog", ylabel="Cov(s, γ)", xlabel="iteration")
        axes[2].set(ylim=(0, 1), ylabel="training R²", xlabel="iteration")
        axes[0].legend()
        paths.append(save_figure(fig, out_dir, "completion_dynamics.png"))
    if not runs:
        return paths
    fig, (axes,) = figure_grid(1, 2, (10, 4))
    for ax, key in zip(axes, ("train_r2", "heldout_r2")):
        vals = [np.array([r[key] for r in runs if r["method"] == m], dtype=float) for m in methods]
        ax.bar(methods, [v.mean() for v in vals], yerr=[v.std(ddof=1) if len(v) > 1 else 0 for v in vals],
               color=[colors[m] for m in methods])
        ax.set_ylabel(("training" if key == "train_r2" else "held-out") + " R² (mean ± std over seeds)")
        if key == "train_r2":
            low = min(v.min() for v in vals)
            ax.set_ylim(max(low - 0.01, 0.0) if low > 0 else None, 1.0)
        else:
            ax.set_yscale("symlog")
    paths.append(save_figure(fig, out_dir, "completion_r2.png"))
    return paths
