"""`tensorsam report` on a vision results file: the label-noise tables, the step-time table, the
curves and gain-against-compression figures, diverged / skipped / single-seed runs."""

import json
import math
import time

import pytest

from tensorsam.cli import main
from tensorsam.report import make_report
from tensorsam.run import write_results
from tensorsam.tasks.vision import report as vr
from tensorsam.ticks import tick_problems

NOISES = (0.4, 0.8)
BASE = {0.4: 0.80, 0.8: 0.50}                       # SGD's accuracy at each noise level
GAIN = {"sgd": 0.0, "sam": 0.03, "das": 0.02}
STEP = {"sgd": 0.1, "sam": 0.2, "das": 0.11}
PARAMS = {5: 20_000, 10: 50_000}
DENSE = 270_000


def _run(p, fmt, rank, method, seed, **extra):
    acc = BASE[p] + GAIN[method] + 0.01 * seed - (0.05 if (fmt, rank) == ("tr", 5) else 0.0)
    history = [{"step": 10 * e, "epoch": e, "test_acc": acc * e / 3, "val_acc": 0.3} for e in (1, 2, 3)]
    dynamics = [{"step": s, "group": g, "Q": q * (1 - s / 100), "cov": 0.0}
                for s in (0, 10, 20, 30) for g, q in (("a", 100.0), ("b", 300.0))]
    return {"label_noise": p, "format": fmt, "rank": rank, "method": method, "seed": seed, "epochs": 3,
            "status": "ok", "params": DENSE if fmt == "none" else PARAMS[rank], "seconds_per_step": STEP[method],
            "final_test_acc": acc, "test_acc_at_best_val": acc - 0.01, "best_val_acc": 0.3,
            "final_train_acc_noisy": 0.5, "final_train_acc_clean": 0.75, "history": history,
            "dynamics": [] if fmt == "none" else dynamics,
            "data": {"n_train": 1280, "num_classes": 10, "image_shape": [1, 28, 28]}, **extra}


def _runs():
    runs = [_run(p, "tr", rank, m, seed) for p in NOISES for rank in (5, 10) for m in ("sgd", "sam", "das")
            for seed in (1, 2) if not (m == "das" and seed == 2)]             # das: a single seed
    for r in runs:
        if (r["label_noise"], r["rank"], r["method"], r["seed"]) == (0.8, 5, "sam", 2):
            r.update(status="diverged", diverged_at=7, final_test_acc=None, test_acc_at_best_val=None)
    for p in NOISES:
        runs.append(_run(p, "none", 5, "sgd", 1))
        runs.append({"label_noise": p, "format": "none", "rank": 5, "method": "das", "seed": 1, "status": "skipped",
                     "reason": "das scales the cores of tensorized layers; a dense network has none"})
    return runs


CONFIG = {"depth": 20, "batch_size": 128, "test_subset": 500, "formats": ["none", "tr"], "ranks": [5, 10],
          "methods": ["sgd", "sam", "das"], "label_noises": list(NOISES), "seeds": [1, 2]}


@pytest.fixture
def results_file(tmp_path):
    path = tmp_path / "run" / "results.json"
    write_results(path, task="vision", config=CONFIG, runs=_runs(), started=time.time())
    return path


def _table(text, title, heading):
    """The Markdown table under ``title`` in the section ``heading``."""
    part = text[text.index(heading):]
    part = part[part.index(title):]
    return [line for line in part.split("\n\n")[1].splitlines()]


def test_label_noise_tables_have_noise_rows_method_columns_and_seed_spread(results_file, tmp_path):
    _, text = make_report([results_file], tmp_path / "rep", figures=False)
    final = _table(text, "Final test accuracy", "### TR rank 10")
    assert final[0] == "| label noise | sgd | sam | das |"
    # sgd at 40 %: seeds 1, 2 -> 81 % and 82 %: mean 81.50, sample std 0.71
    assert final[2] == "| 40 % | 81.50 ± 0.71 (n=2) | 84.50 ± 0.71 (n=2) | 83.00 (n=1) |"
    assert final[3] == "| 80 % | 51.50 ± 0.71 (n=2) | 54.50 ± 0.71 (n=2) | 53.00 (n=1) |"
    best = _table(text, "Test accuracy (%) at the epoch of best validation", "### TR rank 10")
    assert best[2] == "| 40 % | 80.50 ± 0.71 (n=2) | 83.50 ± 0.71 (n=2) | 82.00 (n=1) |"
    fit = _table(text, "Training accuracy", "### TR rank 10")
    assert fit[2] == "| 40 % | 50.0 / 75.0 | 50.0 / 75.0 | 50.0 / 75.0 |"
    assert "### TR rank 10: 50 000 parameters, compression ×5.40 against the dense ResNet's 270 000" in text


def test_diverged_run_is_left_out_and_skipped_cells_say_so(results_file, tmp_path):
    _, text = make_report([results_file], tmp_path / "rep", figures=False)
    final = _table(text, "Final test accuracy", "### TR rank 5")
    assert final[3] == "| 80 % | 46.50 ± 0.71 (n=2) | 49.00 (n=1 of 2) | 48.00 (n=1) |"
    dense = _table(text, "Final test accuracy", "### dense")
    assert dense[0] == "| label noise | sgd | das |" and dense[2] == "| 40 % | 81.00 (n=1) | skipped |"
    assert "- **diverged**: sam, format=tr, rank=5, label_noise=0.8, seed 2 at step 7" in text
    assert "- **skipped**: das, format=none, rank=5, label_noise=0.4, seed 1: das scales the cores" in text
    assert "(1 diverged, 2 skipped)" in text


def test_step_time_table_is_relative_to_sgd_of_the_same_model(results_file, tmp_path):
    _, text = make_report([results_file], tmp_path / "rep", figures=False)
    cost = _table(text, "Seconds per training step relative to SGD", "### Step time")
    assert cost[0] == "| method | dense | TR rank 5 | TR rank 10 |"
    assert cost[2] == "| sgd | 1.00× (0.1 s) | 1.00× (0.1 s) | 1.00× (0.1 s) |"
    assert cost[3] == "| sam | – | 2.00× (0.2 s) | 2.00× (0.2 s) |"
    assert cost[4] == "| das | skipped | 1.10× (0.11 s) | 1.10× (0.11 s) |"


def test_figures_are_written_with_readable_tick_labels(results_file, tmp_path, monkeypatch):
    from tensorsam.run import io

    saved, save = [], io.atomic_save_figure
    monkeypatch.setattr(io, "atomic_save_figure", lambda fig, path, **kw: (saved.append(fig), save(fig, path, **kw))[1])
    assert main(["report", str(results_file), "--out", str(tmp_path / "rep")]) == 0
    names = sorted(p.name for p in (tmp_path / "rep" / "figures" / "run-results").iterdir())
    assert names == ["vision_curves_dense.png", "vision_curves_tr10.png", "vision_curves_tr5.png",
                     "vision_gain_vs_compression.png"]
    text = (tmp_path / "rep" / "report.md").read_text()
    assert text.count("![vision_") == 4
    for fig in saved:
        assert tick_problems(fig) == [], fig.axes[0].get_title()
        for ax in fig.axes:
            assert [t.get_text() for t in ax.get_xticklabels() if t.get_text()], ax.get_title()


def test_gain_points_are_mean_differences_against_compression_ratio(results_file):
    res = json.loads(results_file.read_text())
    dense = vr.dense_params(res)
    assert dense == DENSE                                    # from the format "none" run
    pts = vr.gain_points(res, 0.4, "tr", "sam", "final_test_acc", dense)
    assert [round(x, 3) for x, _, _ in pts] == [5.4, 13.5]   # rank 10, then rank 5
    assert [round(y, 6) for _, y, _ in pts] == [3.0, 3.0] and all(e == pytest.approx(0) for _, _, e in pts)
    single = vr.gain_points(res, 0.4, "tr", "das", "final_test_acc", dense)
    assert single[0][1] == pytest.approx(1.5) and all(math.isnan(e) for _, _, e in single)   # one seed: no bar


def test_dense_count_is_built_when_no_dense_run_exists():
    from tensorsam.models import resnet
    from tensorsam.nn import count_parameters

    res = {"config": CONFIG, "runs": [r for r in _runs() if r["format"] != "none"]}
    assert vr.dense_params(res) == count_parameters(resnet(20, None, None, 10, 1))
    assert vr.dense_params({"config": {}, "runs": [{"format": "tr"}]}) is None


def test_summary_lines_mark_diverged_and_skipped_cells():
    lines = vr.summary_lines(_runs())
    assert any("TR rank 5" in line and "sam" in line and "(n=1 of 2)" in line and "80 %" in line for line in lines)
    assert any("dense" in line and "das" in line and "skipped" in line for line in lines)
    assert not any("± 0.00 " in line for line in lines)
