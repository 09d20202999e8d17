"""What ``tensorsam compress`` prints and what ``tensorsam report`` shows for its results (E6).

Per compressed model (format and target), a table laid out like the paper's E6 table: the dense
network and the compressed one before fine-tuning, then each method's test accuracy after
fine-tuning (final, and at the best validation epoch), a column pair per ``balance`` value, and
seconds per step against SGD; then Q summed over the compressed layers after decomposition,
after balancing and after fine-tuning.  Cells are ``mean ± std (n=k)`` over seeds.  The figure
plots test accuracy and mean Q against epochs per method (:mod:`tensorsam.tasks.vision.report`'s
curves), a column per ``balance`` value.
"""

from __future__ import annotations

import math
from pathlib import Path

from tensorsam.report import diverged_note, markdown_table, skipped_note
from tensorsam.tasks.vision.report import (
    _colors,
    _mean_curve,
    acc_cell,
    acc_points,
    methods_of,
    q_points,
    select,
    stats,
    step_ratio_cell,
)

RUN_KEYS = ("method", "format", "target_ratio", "rank", "balance")   # how a diverged or skipped run is named


# ----------------------------------------------------------------------------- naming

def target_of(run: dict) -> tuple[str, object]:
    """``("target_ratio", 2.5)`` or ``("rank", 8)``: the compression target of a run or record."""
    return ("target_ratio", run["target_ratio"]) if run.get("target_ratio") is not None else ("rank", run.get("rank"))


def model_label(fmt, target: tuple[str, object]) -> str:
    """``TT ×2.5`` or ``TT rank 8``."""
    key, value = target
    return f"{str(fmt).upper()} ×{value:g}" if key == "target_ratio" else f"{str(fmt).upper()} rank {value}"


def models_of(runs) -> list[tuple[str, tuple]]:
    """The distinct (format, target) of the runs, in their order."""
    return list(dict.fromkeys((r.get("format"), target_of(r)) for r in runs))


def runs_of(runs, fmt, target) -> list[dict]:
    return [r for r in runs if r.get("format") == fmt and target_of(r) == target]


def _pct(v) -> str:
    return "–" if not isinstance(v, int | float) or not math.isfinite(v) else f"{100 * v:.2f} %"


def _q(v) -> str:
    return "–" if not isinstance(v, int | float) or not math.isfinite(v) else f"{v:.3g}"


def compression_line(rec: dict) -> str:
    """One compressed model (a ``compressions`` entry of the results file) in one line."""
    label = model_label(rec["format"], target_of(rec)) + (", balanced cores" if rec.get("balance") else "")
    q = f"Q {_q(rec.get('q_after_decompose'))}" + (f" -> {_q(rec.get('q_after_balance'))} balanced"
                                                    if rec.get("balance") else "")
    return (f"compressed {label}: achieved {rec['achieved_ratio']:.2f}x ({rec['params_before']:,} -> "
            f"{rec['params']:,} parameters, {len(rec.get('layers', []))} layers); test acc {_pct(rec.get('acc_dense'))} "
            f"dense -> {_pct(rec.get('acc_before_finetune'))} compressed; {q}; saved {rec.get('path')}")


# ----------------------------------------------------------------------------- printed summary

def summary_lines(runs: list[dict]) -> list[str]:
    """What ``tensorsam compress`` prints: per compressed model a heading, then one line per (balance,
    method) with the accuracies after fine-tuning, Q at the start and at the end, seconds per step."""
    lines = []
    for fmt, target in models_of(runs):
        rs = runs_of(runs, fmt, target)
        ratio = stats(rs, "achieved_ratio")[0]
        dense, before = _pct(stats(rs, "acc_dense")[0]), _pct(stats(rs, "acc_before_finetune")[0])
        lines.append(f"{model_label(fmt, target)}: achieved {ratio:.2f}x; test acc dense {dense}, "
                     f"before fine-tuning {before} (means over runs)")
        lines.append(f"  {'balance':<8} {'method':<14} {'final test acc %':>22} {'test acc @ best val %':>22} "
                     f"{'Q start':>9} {'Q final':>9} {'s/step':>7}")
        for balance in dict.fromkeys(r.get("balance") for r in rs):
            for m in methods_of({"runs": rs}):
                sel = select(rs, balance=balance, method=m)
                if sel:
                    start = stats(sel, "q_after_balance" if balance else "q_after_decompose")[0]
                    step = stats(sel, "seconds_per_step")[0]
                    lines.append(f"  {'yes' if balance else 'no':<8} {m:<14} {acc_cell(sel, 'final_test_acc'):>22} "
                                 f"{acc_cell(sel, 'test_acc_at_best_val'):>22} {_q(start):>9} "
                                 f"{_q(stats(sel, 'q_final')[0]):>9} {'–' if math.isnan(step) else f'{step:.3f}':>7}")
    return lines


# ----------------------------------------------------------------------------- Markdown report

def _balance_label(balance) -> str:
    return "cores balanced" if balance else "cores as decomposed"


def one_per_seed(runs) -> list[dict]:
    """The first run of each seed: for what every run of a seed shares (the accuracy of the dense and
    of the compressed network before fine-tuning)."""
    return list({r.get("seed"): r for r in reversed(runs)}.values())[::-1]


def accuracy_table(runs, methods, balances) -> str:
    """The paper's layout: dense, before fine-tuning, then each method; final and best-val test
    accuracy per balance value; seconds per step against SGD."""
    header = ["", *(f"{what} (%), {_balance_label(b)}" for b in balances
                    for what in ("final test acc", "test acc at best val")), "seconds per step (vs SGD)"]
    before = lambda b: acc_cell(one_per_seed(select(runs, balance=b)), "acc_before_finetune")
    rows = [["dense, before compression", acc_cell(one_per_seed(runs), "acc_dense"), *["–"] * (2 * len(balances))],
            ["compressed, before fine-tuning", *[c for b in balances for c in (before(b), "–")], "–"]]
    for m in methods:
        cells = [acc_cell(select(runs, balance=b, method=m), key) for b in balances
                 for key in ("final_test_acc", "test_acc_at_best_val")]
        rows.append([m, *cells, step_ratio_cell(select(runs, method=m), select(runs, method="sgd"))])
    return markdown_table(header, rows)


def _q_cell(runs, key: str) -> str:
    mean, std, k, n = stats(runs, key)
    if k == 0:
        return "–"
    spread = f" ± {std:.2g}" if k > 1 and std > 0 else ""
    return f"{mean:.3g}{spread} (n={k})" if k == n else f"{mean:.3g}{spread} (n={k} of {n})"


def q_table(runs, methods, balances) -> str:
    """Q summed over the compressed layers: after decomposition, after balancing (one compression per
    model: no spread), after fine-tuning (mean ± std over seeds)."""
    start = lambda b, key: _q(stats(select(runs, balance=b), key)[0])
    rows = [["after decomposition", *(start(b, "q_after_decompose") for b in balances)],
            ["after balancing", *(start(b, "q_after_balance") for b in balances)]]
    rows += [[f"after fine-tuning with {m}", *(_q_cell(select(runs, balance=b, method=m), "q_final") for b in balances)]
             for m in methods]
    return markdown_table(["Q (Eq. 5), summed over the compressed layers", *map(_balance_label, balances)], rows)


def model_heading(runs, fmt, target) -> str:
    ratio, dense, params = (stats(runs, k)[0] for k in ("achieved_ratio", "dense_params", "params"))
    text = f"### {model_label(fmt, target)}"
    if math.isfinite(ratio):
        text += f": achieved ×{ratio:.2f}"
    if math.isfinite(dense) and math.isfinite(params):
        text += f" ({dense:,.0f} → {params:,.0f} parameters)".replace(",", " ")
    return text


def report_sections(results: dict) -> str:
    """The Markdown body of a compress results file's report."""
    runs, methods = results["runs"], methods_of(results)
    if not runs:
        return "_No runs._"
    out = [("Accuracies in percent on the full test set; cells are mean ± sample std over seeds (n = runs "
            "with a result).  Before fine-tuning and dense: the compressed and the source network, scored with "
            "each run's data normalisation.  Seconds per step: mean over runs of each run's median step time, "
            "against SGD on the same compressed model."), ""]
    for fmt, target in models_of(runs):
        rs = runs_of(runs, fmt, target)
        balances = list(dict.fromkeys(r.get("balance") for r in rs))
        ms = [m for m in methods if select(rs, method=m)]
        out += [model_heading(rs, fmt, target), "", accuracy_table(rs, ms, balances), "", q_table(rs, ms, balances), ""]
    for note in (diverged_note(runs, RUN_KEYS), skipped_note(runs, RUN_KEYS)):
        out += [note, ""] if note else []
    return "\n".join(out).rstrip()


# ----------------------------------------------------------------------------- figures

def _curve(ax, curves, color, label) -> None:
    """The mean over runs of (epoch, value) curves, with markers (a 1-epoch run is one point)."""
    xs, mean, std = _mean_curve([c for c in curves if c])
    if xs:
        ax.plot(xs, mean, color=color, marker="o", ms=3, label=f"{label} (n={len(curves)})")
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], color=color,
                        alpha=0.15, lw=0)


def _start_q(runs, balance) -> float:
    """Mean Q per compressed layer at the start of fine-tuning (the tracker's rows count the layers)."""
    total = stats(runs, "q_after_balance" if balance else "q_after_decompose")[0]
    first = [row for row in runs[0].get("dynamics") or [] if row.get("step") == runs[0]["dynamics"][0]["step"]]
    return total / len(first) if first else math.nan


def curves_figure(results: dict, fmt, target, out_dir, name: str) -> Path | None:
    """Test accuracy (the test subset; lines: the full-test accuracy of the dense network and of the
    compressed one before fine-tuning) and mean Q per layer against epochs per method (cross: the
    start), a column per balance value."""
    from tensorsam.tasks import figure_grid, save_figure

    runs = [r for r in runs_of(results["runs"], fmt, target) if r.get("status") == "ok" and r.get("history")]
    if not runs:
        return None
    balances, colors = list(dict.fromkeys(r.get("balance") for r in runs)), _colors(results)
    fig, axes = figure_grid(2, len(balances), (5.0 * len(balances), 7.2))
    for j, b in enumerate(balances):
        sel = select(runs, balance=b)
        for m in methods_of({"runs": sel, "config": results.get("config")}):
            by_m = select(sel, method=m)
            _curve(axes[0][j], [acc_points(results, r) for r in by_m], colors[m], m)
            _curve(axes[1][j], [q_points(results, r) for r in by_m], colors[m], m)
        for key, style in (("acc_dense", ":"), ("acc_before_finetune", "--")):
            if math.isfinite(level := stats(sel, key, 100.0)[0]):
                axes[0][j].axhline(level, color="grey", ls=style, lw=0.8,
                                   label=key.replace("_", " ").replace("finetune", "fine-tuning"))
        if (q0 := _start_q(sel, b)) > 0:
            axes[1][j].plot([0.0], [q0], "x", color="grey", label="start")
        axes[0][j].set(title=f"{model_label(fmt, target)}, {_balance_label(b)}", xlabel="epoch",
                       ylabel="test accuracy (%)")
        axes[1][j].set(xlabel="epoch", ylabel="mean Q per compressed layer (Eq. 5)", yscale="log")
    axes[0][0].legend(fontsize="small")
    axes[1][0].legend(fontsize="small")
    return save_figure(fig, out_dir, name)


def figures(results: dict, out_dir) -> list[Path]:
    """One curves figure per compressed model (``compress_curves[_<model>].png``)."""
    models = models_of(results["runs"])
    paths = []
    for fmt, target in models:
        tag = f"{fmt}{'x' if target[0] == 'target_ratio' else 'r'}{target[1]:g}"
        name = "compress_curves.png" if len(models) == 1 else f"compress_curves_{tag}.png"
        if (p := curves_figure(results, fmt, target, out_dir, name)) is not None:
            paths.append(p)
    return paths
