"""What ``tensorsam report`` shows for a vision results file (E4, E5), and what ``tensorsam vision``
prints.

Tables (Markdown): per model (format, rank), the label-noise table (noise levels as rows, methods
as columns) of final test accuracy, of test accuracy at the best validation epoch, and of the
training accuracy on noisy / clean labels; then the seconds per step relative to SGD.  Cells are
``mean ± std (n=k)`` over seeds (:func:`tensorsam.report.format_cell`); diverged runs are left
out of the means and listed, skipped cells say so.

Figures: test accuracy and the mean norm deviation Q over epochs per method (one column per
noise level, one figure per model), and the accuracy gain over SGD against the compression ratio
(the paper's Fig. 3).
"""

from __future__ import annotations

import functools
import math
import statistics
from pathlib import Path

from tensorsam.report import (
    diverged,
    diverged_note,
    format_cell,
    markdown_table,
    skipped,
    skipped_note,
)

ACCURACIES = (("final_test_acc", "Final test accuracy (%, full clean test set)"),
              ("test_acc_at_best_val", ("Test accuracy (%) at the epoch of best validation accuracy "
                                        "(validation labels as noisy as the training labels)")))
RUN_KEYS = ("method", "format", "rank", "label_noise")     # how a diverged or skipped run is named
MARKERS = {"none": "*", "tr": "o", "tt": "^", "cp": "s", "tucker": "D"}


# ----------------------------------------------------------------------------- grouping

def _ordered(values, preferred=()) -> list:
    """The distinct ``values``, those in ``preferred`` first in its order, the rest as they came."""
    seen = list(dict.fromkeys(values))
    return [v for v in preferred if v in seen] + [v for v in seen if v not in preferred]


def methods_of(results: dict) -> list[str]:
    return _ordered((r.get("method") for r in results["runs"]), (results.get("config") or {}).get("methods", ()))


def settings_of(results: dict) -> list[tuple[str, int]]:
    """The (format, rank) models of the runs, in the config's order."""
    cfg = results.get("config") or {}
    key = lambda s: (_index(cfg.get("formats", ()), s[0]), _index(cfg.get("ranks", ()), s[1]), str(s))
    return sorted(dict.fromkeys((r.get("format"), r.get("rank")) for r in results["runs"]), key=key)


def _index(seq, value) -> int:
    return list(seq).index(value) if value in seq else len(seq)


def noises_of(runs) -> list[float]:
    return sorted({r.get("label_noise") for r in runs}, key=lambda p: (p is None, p or 0))


def select(runs, **coords) -> list[dict]:
    return [r for r in runs if all(r.get(k) == v for k, v in coords.items())]


def format_label(fmt) -> str:
    return "dense" if fmt == "none" else str(fmt).upper()


def setting_label(fmt, rank) -> str:
    return format_label(fmt) if fmt == "none" else f"{format_label(fmt)} rank {rank}"


def _finite(run: dict, key: str) -> float | None:
    v = run.get(key)
    ok = run.get("status", "ok") == "ok" and isinstance(v, int | float) and math.isfinite(v)
    return float(v) if ok else None


def stats(runs, key: str, scale: float = 1.0) -> tuple[float, float, int, int]:
    """(mean, sample std, k, n) of ``key`` times ``scale`` over the finished runs; ``n`` counts every
    run that was not skipped, ``k`` those with a finite value (none from a diverged run)."""
    counted = [r for r in runs if not skipped(r)]
    vals = [v * scale for v in (_finite(r, key) for r in counted) if v is not None]
    mean = statistics.fmean(vals) if vals else math.nan
    std = statistics.stdev(vals) if len(vals) > 1 else math.nan
    return mean, std, len(vals), len(counted)


# ----------------------------------------------------------------------------- tables

def acc_cell(runs, key: str) -> str:
    """Accuracy in percent, ``mean ± std (n=k)``; ``skipped`` / ``diverged`` when nothing finished."""
    if not runs:
        return "–"
    if all(skipped(r) for r in runs):
        return "skipped"
    cell = stats(runs, key, 100.0)
    if cell[2] == 0 and any(diverged(r) for r in runs):
        return f"diverged (n={cell[3]})"
    return format_cell(*cell, decimals=2)


def _noise_label(p) -> str:
    return f"{100 * p:g} %" if isinstance(p, int | float) else str(p)


def noise_table(runs, methods, cell) -> str:
    """Noise levels as rows, methods as columns, ``cell(runs of one (noise, method))`` in each."""
    rows = [[_noise_label(p)] + [cell(select(runs, label_noise=p, method=m)) for m in methods]
            for p in noises_of(runs)]
    return markdown_table(["label noise", *methods], rows)


def fit_cell(runs) -> str:
    """Mean training accuracy (%) on the noisy and on the clean labels."""
    noisy, clean = stats(runs, "final_train_acc_noisy", 100.0), stats(runs, "final_train_acc_clean", 100.0)
    if noisy[2] == 0:
        return acc_cell(runs, "final_train_acc_noisy")
    return f"{noisy[0]:.1f} / {clean[0]:.1f}"


def setting_heading(results: dict, fmt, rank) -> str:
    """``### TR rank 10: N parameters, compression ×c against the dense ResNet's M``."""
    params = [r["params"] for r in select(results["runs"], format=fmt, rank=rank) if r.get("params")]
    dense = dense_params(results)
    text = f"### {setting_label(fmt, rank)}"
    if params:
        text += f": {_thousands(params[0])} parameters"
        if dense and fmt != "none":
            text += f", compression ×{dense / params[0]:.2f} against the dense ResNet's {_thousands(dense)}"
    return text


def _thousands(n: int) -> str:
    return f"{n:,}".replace(",", " ")


def setting_tables(results: dict, fmt, rank, methods) -> list[str]:
    """The heading and the three label-noise tables of one model."""
    runs = select(results["runs"], format=fmt, rank=rank)
    methods = [m for m in methods if select(runs, method=m)]
    out = [setting_heading(results, fmt, rank), ""]
    for key, title in ACCURACIES:
        out += [f"{title}:", "", noise_table(runs, methods, lambda rs, key=key: acc_cell(rs, key)), ""]
    out += ["Training accuracy (%) at the end on the noisy / the clean training labels (means over seeds):", "",
            noise_table(runs, methods, fit_cell), ""]
    return out


def step_ratio_cell(runs, sgd_runs) -> str:
    """``ratio× (seconds)`` of the runs' mean step time against SGD's (the seconds alone without SGD)."""
    mean, _, k, _ = stats(runs, "seconds_per_step")
    if k == 0:
        return "skipped" if runs and all(skipped(r) for r in runs) else "–"
    base = stats(sgd_runs, "seconds_per_step")
    ratio = f"{mean / base[0]:.2f}× " if base[2] and base[0] > 0 else ""
    return f"{ratio}({mean:.3g} s)"


def cost_table(results: dict, methods, settings) -> str:
    """Seconds per step relative to SGD of the same model: methods as rows, models as columns."""
    runs = results["runs"]

    def cell(method, fmt, rank):
        return step_ratio_cell(select(runs, method=method, format=fmt, rank=rank),
                               select(runs, method="sgd", format=fmt, rank=rank))

    rows = [[m] + [cell(m, f, r) for f, r in settings] for m in methods]
    return markdown_table(["method", *(setting_label(f, r) for f, r in settings)], rows)


def report_sections(results: dict) -> str:
    """The Markdown body of a vision results file's report (tables, notes on runs)."""
    runs, methods, settings = results["runs"], methods_of(results), settings_of(results)
    if not runs:
        return "_No runs._"
    out = [("Accuracies in percent; cells are mean ± sample std over seeds (n = runs with a result). A diverged "
            "run is left out of the means (the cell then says n=k of m) and listed below; a skipped cell never "
            "ran."), ""]
    for fmt, rank in settings:
        out += setting_tables(results, fmt, rank, methods)
    out += ["### Step time", "", ("Seconds per training step relative to SGD on the same model (mean over runs "
                                   "of each run's median step time, evaluation excluded; runs timed separately, "
                                   "not paired):"), "", cost_table(results, methods, settings), ""]
    for note in (diverged_note(runs, RUN_KEYS), skipped_note(runs, RUN_KEYS)):
        out += [note, ""] if note else []
    return "\n".join(out).rstrip()


def summary_lines(runs: list[dict]) -> list[str]:
    """What ``tensorsam vision`` prints: one line per (noise, model, method), mean ± std over seeds."""
    lines = [(f"{'noise':>6} {'model':<12} {'method':<14} {'final test acc %':>22} {'test acc @ best val %':>22} "
              f"{'train acc noisy/clean %':>24} {'s/step':>7}")]
    res = {"runs": runs}
    for p in noises_of(runs):
        for fmt, rank in settings_of(res):
            for m in methods_of(res):
                rs = select(runs, label_noise=p, format=fmt, rank=rank, method=m)
                if rs:
                    step = stats(rs, "seconds_per_step")[0]
                    lines.append(f"{_noise_label(p):>6} {setting_label(fmt, rank):<12} {m:<14} "
                                 f"{acc_cell(rs, 'final_test_acc'):>22} {acc_cell(rs, 'test_acc_at_best_val'):>22} "
                                 f"{fit_cell(rs):>24} {'–' if math.isnan(step) else f'{step:.3f}':>7}")
    return lines


# ----------------------------------------------------------------------------- parameters

@functools.lru_cache(maxsize=8)
def _dense_count(depth: int, num_classes: int, in_channels: int) -> int:
    from tensorsam.models import resnet
    from tensorsam.nn import count_parameters

    return count_parameters(resnet(depth, None, None, num_classes, in_channels))


def dense_params(results: dict) -> int | None:
    """Parameters of the dense ResNet: a ``format: none`` run's count, else built from the config's
    depth and the data's classes and channels (None when they are not recorded)."""
    for r in results["runs"]:
        if r.get("format") == "none" and r.get("params"):
            return int(r["params"])
    data = next((r["data"] for r in results["runs"] if isinstance(r.get("data"), dict)), None)
    depth = (results.get("config") or {}).get("depth")
    if data is None or depth is None or "num_classes" not in data or "image_shape" not in data:
        return None
    return _dense_count(int(depth), int(data["num_classes"]), int(data["image_shape"][0]))


# ----------------------------------------------------------------------------- figures

def figures(results: dict, out_dir) -> list[Path]:
    """The curves figure of each model and the gain-against-compression figure (when it has data)."""
    paths = [p for fmt, rank in settings_of(results) if (p := curves_figure(results, fmt, rank, out_dir))]
    gain = gain_figure(results, out_dir)
    return paths + ([gain] if gain else [])


def _colors(results: dict) -> dict[str, str]:
    return {m: f"C{i % 10}" for i, m in enumerate(methods_of(results))}


def steps_per_epoch(results: dict, run: dict) -> float:
    """Training steps per epoch of ``run``: from its last evaluation (made after the last step of the
    last epoch), else the data's size over the batch size."""
    last = (run.get("history") or [{}])[-1]
    if last.get("epoch") and last.get("step"):
        return last["step"] / last["epoch"]
    n, batch = (run.get("data") or {}).get("n_train"), (results.get("config") or {}).get("batch_size")
    return float(n // batch) if n and batch and n >= batch else 1.0


def _mean_curve(points: list[list[tuple[float, float]]]) -> tuple[list, list, list]:
    """(x, mean, std) over runs of curves given as (x, y) points, at the x every run has."""
    by_x: dict = {}
    for curve in points:
        for x, y in curve:
            by_x.setdefault(round(x, 6), []).append(y)
    xs = [x for x in sorted(by_x) if len(by_x[x]) == len(points)]
    return (xs, [statistics.fmean(by_x[x]) for x in xs],
            [statistics.stdev(by_x[x]) if len(points) > 1 else 0.0 for x in xs])


def acc_points(results: dict, run: dict) -> list[tuple[float, float]]:
    spe = steps_per_epoch(results, run)
    return [(h["step"] / spe, 100 * h["test_acc"]) for h in run.get("history") or []
            if isinstance(h.get("test_acc"), int | float)]


def q_points(results: dict, run: dict) -> list[tuple[float, float]]:
    """(epoch, mean Q over the tracked layers) of a run's norm-tracker rows (positive means only)."""
    by_step: dict = {}
    for row in run.get("dynamics") or []:
        if isinstance(row.get("Q"), int | float) and math.isfinite(row["Q"]):
            by_step.setdefault(row["step"], []).append(row["Q"])
    spe = steps_per_epoch(results, run)
    return [(s / spe, q) for s, v in sorted(by_step.items()) if (q := statistics.fmean(v)) > 0]


def _plot_mean(ax, curves, color, label) -> None:
    xs, mean, std = _mean_curve(curves)
    if not xs:
        return
    ax.plot(xs, mean, color=color, label=f"{label} (n={len(curves)})")
    if len(curves) > 1:
        ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                        color=color, alpha=0.15, lw=0)


def curves_figure(results: dict, fmt, rank, out_dir) -> Path | None:
    """Test accuracy and mean Q against epochs per method (seed mean, ± std band), a column per noise."""
    from tensorsam.tasks import figure_grid, save_figure

    runs = [r for r in select(results["runs"], format=fmt, rank=rank) if r.get("status") == "ok" and r.get("history")]
    if not runs:
        return None
    noises, colors = noises_of(runs), _colors(results)
    has_q = any(r.get("dynamics") for r in runs)
    fig, axes = figure_grid(1 + has_q, len(noises), (5.0 * len(noises), 3.6 * (1 + has_q)))
    for j, p in enumerate(noises):
        for m in methods_of({"runs": runs, "config": results.get("config")}):
            sel = select(runs, label_noise=p, method=m)
            if sel:
                _plot_mean(axes[0][j], [acc_points(results, r) for r in sel], colors[m], m)
            if has_q and [r for r in sel if r.get("dynamics")]:
                _plot_mean(axes[1][j], [q_points(results, r) for r in sel if r.get("dynamics")], colors[m], m)
        _label_curves(axes, j, p, fmt, rank, has_q, (results.get("config") or {}).get("test_subset"))
    axes[0][0].legend(fontsize="small")
    tag = "dense" if fmt == "none" else f"{fmt}{rank}"
    name = "vision_curves.png" if len(settings_of(results)) == 1 else f"vision_curves_{tag}.png"
    return save_figure(fig, out_dir, name)


def _label_curves(axes, j, p, fmt, rank, has_q, test_subset) -> None:
    subset = f", {test_subset}-image subset" if test_subset else ""
    axes[0][j].set(title=f"{setting_label(fmt, rank)}, label noise {_noise_label(p)}",
                   ylabel=f"test accuracy (%{subset})", xlabel="epoch")
    if has_q:
        axes[1][j].set(xlabel="epoch", ylabel="mean Q over layers (Eq. 5)", yscale="log")


def paired_gain(runs_m, runs_sgd, key: str) -> tuple[float, float] | None:
    """(mean(method) − mean(SGD), std over seeds of the per-seed difference) in percentage points;
    the spread is NaN with fewer than two common seeds; None when either side has no result."""
    m, s = stats(runs_m, key, 100.0), stats(runs_sgd, key, 100.0)
    if m[2] == 0 or s[2] == 0:
        return None
    by_seed = lambda rs: {r.get("seed"): v for r in rs if (v := _finite(r, key)) is not None}
    a, b = by_seed(runs_m), by_seed(runs_sgd)
    diffs = [100 * (a[k] - b[k]) for k in a.keys() & b.keys()]
    return m[0] - s[0], statistics.stdev(diffs) if len(diffs) > 1 else math.nan


def gain_points(results: dict, p, fmt, method, key, dense) -> list[tuple[float, float, float]]:
    """(compression ratio, gain, spread) of ``method`` over SGD per rank of ``fmt`` at noise ``p``."""
    runs, out = select(results["runs"], label_noise=p, format=fmt), []
    for f, rank in (s for s in settings_of(results) if s[0] == fmt):
        params = [r["params"] for r in select(runs, rank=rank) if r.get("params")]
        gain = paired_gain(select(runs, rank=rank, method=method), select(runs, rank=rank, method="sgd"), key)
        if params and gain:
            out.append((dense / params[0], *gain))
    return sorted(out)


def gain_figure(results: dict, out_dir) -> Path | None:
    """The paper's Fig. 3: accuracy gain over SGD against compression ratio, a line per (format,
    method), a column per noise level, rows final / best-validation test accuracy."""
    from tensorsam.tasks import figure_grid, save_figure

    dense = dense_params(results)
    noises, colors = noises_of(results["runs"]), _colors(results)
    formats = list(dict.fromkeys(f for f, _ in settings_of(results)))
    lines = [(f, m) for f in formats for m in methods_of(results) if m != "sgd"]
    if not dense or not any(gain_points(results, p, f, m, ACCURACIES[0][0], dense) for p in noises for f, m in lines):
        return None
    fig, axes = figure_grid(2, len(noises), (4.6 * len(noises) + 2.0, 7.2))
    ratios = {1.0}
    for i, (key, _) in enumerate(ACCURACIES):
        for j, p in enumerate(noises):
            for f, m in lines:
                pts = gain_points(results, p, f, m, key, dense)
                ratios |= {x for x, _, _ in pts}
                if pts:
                    axes[i][j].errorbar([x for x, _, _ in pts], [y for _, y, _ in pts],
                                        yerr=[0.0 if math.isnan(e) else e for _, _, e in pts], capsize=3,
                                        color=colors[m], marker=MARKERS.get(f, "o"), label=f"{m}, {format_label(f)}")
            axes[i][j].axhline(0.0, color="grey", lw=0.6)
    _label_gain(fig, axes, noises, sorted(ratios))
    return save_figure(fig, out_dir, "vision_gain_vs_compression.png")


def _label_gain(fig, axes, noises, ratios) -> None:
    """Titles, labels, x ticks at the compression ratios (1× = dense), one legend outside."""
    from matplotlib import ticker

    for i, what in enumerate(("final test acc", "test acc at best val")):
        for j, p in enumerate(noises):
            ax = axes[i][j]
            ax.set(xscale="log", ylabel=f"{what}: gain over SGD (points)", title=f"label noise {_noise_label(p)}")
            ax.set_xlim(ratios[0] / 1.25, ratios[-1] * 1.25)
            ax.xaxis.set_major_locator(ticker.FixedLocator(ratios))
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda x, _: f"{x:.3g}×"))
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            if i == 1:
                ax.set_xlabel("compression ratio (dense ÷ tensorized params)")
    fig.suptitle("gain over SGD on the same model; bars: std over seeds of the per-seed gain", fontsize="medium")
    fig.legend(*axes[0][0].get_legend_handles_labels(), loc="outside right center", fontsize="small")
