"""What ``tensorsam finetune`` prints, and its figure (E7).

Summary: per adapter, one line per method with the test accuracy (final, and at the best
validation step) as ``mean ± std (n=k)`` over seeds, the seconds per step as a ratio to Adam's,
and the trainable parameters; skipped cells say so.  Figure: validation accuracy and the mean Q of
the adapters' groups against steps, a column per adapter, a line per method (means over seeds).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from tensorsam.tasks.vision.report import _ordered, acc_cell, select, stats, step_ratio_cell


def _adapters(runs) -> list:
    return _ordered((r.get("adapter") for r in runs), ("lora", "flora", "loretta"))


def summary_lines(runs: list[dict]) -> list[str]:
    lines = []
    methods = _ordered(r.get("method") for r in runs)
    for adapter in _adapters(runs):
        rs = select(runs, adapter=adapter)
        params = stats(rs, "trainable_params")[0]
        model = next((r.get("model") for r in rs if r.get("model")), "?")
        lines.append(f"{model} + {adapter}: {'–' if math.isnan(params) else f'{params:,.0f}'} trainable parameters")
        lines.append(f"  {'method':<14} {'final test acc %':>22} {'test acc @ best val %':>22} {'s/step (vs adam)':>20}")
        adam = select(rs, method="adam")
        for m in methods:
            sel = select(rs, method=m)
            if not sel:
                continue
            lines.append(f"  {m:<14} {acc_cell(sel, 'final_test_acc'):>22} {acc_cell(sel, 'test_acc_at_best_val'):>22} "
                         f"{step_ratio_cell(sel, adam):>20}")
        for r in sel_skipped(rs):
            lines.append(f"  skipped: {r.get('method')} seed {r.get('seed')}: {r.get('reason')}")
    return lines


def sel_skipped(runs) -> list[dict]:
    return [r for r in runs if r.get("status") == "skipped"]


def _mean_by_step(runs, rows_of) -> list[tuple[float, float]]:
    by_step: dict = {}
    for r in runs:
        for step, v in rows_of(r):
            if isinstance(v, int | float) and math.isfinite(v):
                by_step.setdefault(step, []).append(v)
    return [(s, statistics.fmean(v)) for s, v in sorted(by_step.items())]


def _q_rows(run):
    by_step: dict = {}
    for row in run.get("dynamics") or []:
        if isinstance(row.get("Q"), int | float):
            by_step.setdefault(row["step"], []).append(row["Q"])
    return [(s, statistics.fmean(v)) for s, v in by_step.items()]


def figures(results: dict, out_dir) -> list[Path]:
    """``finetune_curves.png``: validation accuracy (top) and mean Q (bottom) against steps."""
    runs = [r for r in results["runs"] if r.get("status") == "ok"]
    if not runs:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tensorsam.run import atomic_save_figure

    adapters = _adapters(runs)
    fig, axes = plt.subplots(2, len(adapters), figsize=(4 * len(adapters), 6), squeeze=False)
    for j, adapter in enumerate(adapters):
        for m in _ordered(r.get("method") for r in runs):
            sel = select(runs, adapter=adapter, method=m)
            if not sel:
                continue
            acc = _mean_by_step(sel, lambda r: [(h["step"], 100 * h["val_acc"]) for h in r.get("history") or []
                                                if isinstance(h.get("val_acc"), int | float)])
            q = _mean_by_step(sel, _q_rows)
            if acc:
                axes[0, j].plot(*zip(*acc), marker="o", ms=3, label=m)
            if q:
                axes[1, j].plot(*zip(*q), label=m)
        axes[0, j].set_title(adapter)
        axes[0, j].set_ylabel("validation accuracy (%)")
        axes[1, j].set_ylabel("mean Q (adapter groups)")
        axes[1, j].set_xlabel("step")
        axes[0, j].legend(fontsize=8)
    fig.tight_layout()
    path = atomic_save_figure(fig, Path(out_dir) / "finetune_curves.png", dpi=100)
    plt.close(fig)
    return [path]
