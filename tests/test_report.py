import math
import time

import pytest

from tensorsam.cli import main
from tensorsam.report import format_cell, load_results, make_report, metric_label, summarize
from tensorsam.run import write_results
from tensorsam.tasks.registry import TASKS, Task

TRAIN = {"adam": [0.949, 0.951, 0.950], "sam": [0.948, 0.9485, 0.949], "hooi": [0.92, 0.93, 0.925]}


def _runs(heldout_nan=False):
    runs = []
    for method, values in TRAIN.items():
        for seed, v in zip((42, 87, 100), values):
            runs.append(
                {
                    "method": method,
                    "seed": seed,
                    "train_r2": v,
                    "heldout_r2": -80.0 + seed / 10,
                    "train_r2_uncentred": v + 0.001,
                    "heldout_rmse": 9.0,
                    "train_rmse": 0.3,
                    "wall_seconds": 12.0 + seed / 100,
                    "q_curve": [1.0, 0.5],  # not a scalar: not tabulated
                    "converged": True,  # a bool: not tabulated
                }
            )
    if heldout_nan:
        runs[0]["heldout_r2"] = math.nan
    return runs


def _write(path, task="completion", runs=None):
    write_results(
        path,
        task=task,
        config={"rank": [8, 6, 8]},
        runs=_runs() if runs is None else runs,
        started=time.time(),
    )
    return path


def test_summary_is_mean_and_sample_std_per_method():
    methods, metrics, stats = summarize(_runs(heldout_nan=True))
    assert methods == ["adam", "sam", "hooi"]
    assert metrics[:3] == ["train_r2", "heldout_r2", "train_r2_uncentred"]
    assert metrics[-1] == "wall_seconds" and "seed" not in metrics and "q_curve" not in metrics
    mean, std, k, n = stats[("adam", "train_r2")]
    assert mean == pytest.approx(0.950) and std == pytest.approx(0.001) and (k, n) == (3, 3)
    mean, std, k, n = stats[("adam", "heldout_r2")]
    assert (k, n) == (2, 3) and mean == pytest.approx(-80 + 9.35)


def test_cells_and_labels():
    assert format_cell(0.9482, 0.0012, 3, 3) == "0.9482 ± 0.0012 (3)"
    assert format_cell(-80.7, 19.4, 2, 3) == "-81 ± 19 (2 of 3)"
    assert format_cell(0.95, 0.0, 3, 3) == "0.95 ± 0 (3)"
    assert format_cell(0.95, math.nan, 1, 1) == "0.95 (1)"
    assert format_cell(math.nan, math.nan, 0, 3) == "– (0 of 3)"
    assert metric_label("heldout_r2_uncentred") == "held-out R² (uncentred)"
    assert metric_label("train_rmse") == "train RMSE" and metric_label("wall_seconds") == "wall s"


def test_report_command_writes_both_layouts(tmp_path, capsys):
    results = _write(tmp_path / "e1" / "results.json")
    assert main(["report", str(results), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    text = (tmp_path / "out" / "report.md").read_text()
    assert text in printed
    assert "| metric | adam | sam | hooi |" in text
    assert "| train R² | 0.9500 ± 0.0010 (3) |" in text
    assert (
        "| method | train R² | held-out R² | train R² (uncentred) | train RMSE | held-out RMSE | wall s |"
        in text
    )
    assert "seeds 42, 87, 100" in text and "rank: [8, 6, 8]" in text
    # default folder: next to the first results file
    make_report([results])
    assert (tmp_path / "e1" / "report.md").exists()


def test_pooling_files_of_one_task(tmp_path):
    a = _write(tmp_path / "a" / "results.json", runs=_runs()[:2])
    b = _write(tmp_path / "b" / "results.json", runs=_runs()[2:3])
    _, text = make_report([a, b], tmp_path, pool=True)
    assert "completion (pooled over 2 files)" in text and "0.9500 ± 0.0010 (3)" in text
    _, text = make_report([a, b], tmp_path)
    assert text.count("## completion") == 2


def test_bad_results_files_are_refused_and_nothing_is_written(tmp_path, capsys):
    good = _write(tmp_path / "results.json")
    (tmp_path / "broken.json").write_text('{"runs": [')
    (tmp_path / "other.json").write_text('{"loss": 1}')
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        make_report([good, tmp_path / "missing.json"], out)
    with pytest.raises(ValueError, match="broken.json is not valid JSON"):
        load_results(tmp_path / "broken.json")
    with pytest.raises(ValueError, match="other.json is not a tensorsam results file"):
        make_report([tmp_path / "other.json"], out)
    assert main(["report", str(tmp_path / "broken.json"), "--out", str(out)]) == 2
    assert "broken.json" in capsys.readouterr().err
    assert not (out / "report.md").exists()


def test_task_figures_are_made_and_linked(tmp_path, monkeypatch):
    def figures(results, out_dir):
        path = out_dir / f"curves-{len(results['runs'])}.png"
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
        return [path]

    monkeypatch.setitem(TASKS, "fakefig", Task("fakefig", "a task with figures", command="", figures=figures))
    monkeypatch.setitem(TASKS, "nofig", Task("nofig", "a task without figures", command=""))
    a = _write(tmp_path / "run" / "results.json", task="fakefig")
    b = _write(tmp_path / "none" / "results.json", task="nofig")
    c = _write(tmp_path / "alien" / "results.json", task="no_such_task_module")
    _, text = make_report([a, b, c], tmp_path / "rep")
    assert "![curves-9](figures/run-results/curves-9.png)" in text
    assert (tmp_path / "rep" / "figures" / "run-results" / "curves-9.png").exists()
    assert text.count("![") == 1
    _, text = make_report([a], tmp_path / "rep2", figures=False)
    assert "![" not in text


def test_group_by_named_in_the_results_file(tmp_path):
    runs = [
        {"method": m, "noise": noise, "seed": seed, "final_q": noise + seed}
        for m in ("gd", "sam")
        for noise in (0.0, 0.5)
        for seed in (1, 2)
    ]
    path = tmp_path / "results.json"
    write_results(
        path, task="toy", config={}, runs=runs, extra={"group_by": ["method", "noise"]}, started=time.time()
    )
    _, text = make_report([path], tmp_path)
    assert "| metric | gd, noise=0.0 | gd, noise=0.5 | sam, noise=0.0 | sam, noise=0.5 |" in text
    assert "| final q | 1.50 ± 0.71 (2) |" in text and "| noise |" not in text
    write_results(path, task="toy", config={}, runs=runs, extra={"group_by": "method"}, started=time.time())
    with pytest.raises(ValueError, match="group_by"):
        load_results(path)


def test_notes_and_reference_comparison(tmp_path):
    path = tmp_path / "results.json"
    reference = {
        "source": "paper Table 1",
        "values": {"adam": {"train_r2": [0.9482, 0.0012]}, "das": {"train_r2": [0.9484, 0.0017]}},
    }
    extra = {"notes": "R² on training entries is what the paper reports.", "reference": reference}
    write_results(path, task="completion", config={}, runs=_runs(), extra=extra, started=time.time())
    _, text = make_report([path], tmp_path)
    assert "> R² on training entries is what the paper reports." in text
    assert "| adam | train R² | 0.9500 ± 0.0010 (3) | 0.9482 ± 0.0012 | +1.5 σ |" in text
    assert "| das | train R² | – | 0.9484 ± 0.0017 | – |" in text
    extra["reference"] = {"values": {"adam": {"train_r2": 0.9}}}
    write_results(path, task="completion", config={}, runs=_runs(), extra=extra, started=time.time())
    with pytest.raises(ValueError, match="'reference' must be"):
        load_results(path)


def test_diverged_runs_are_marked_and_left_out_of_the_means(tmp_path):
    runs = _runs()
    for r in runs:
        r["status"] = "ok"
    runs[1].update(status="diverged", diverged_at=37, train_r2=0.5, heldout_r2=None, train_rmse=None)
    _, metrics, stats = summarize(runs)
    assert "diverged_at" not in metrics
    mean, _, k, n = stats[("adam", "train_r2")]
    assert (k, n) == (2, 3) and mean == pytest.approx((0.949 + 0.950) / 2)     # 0.5 left out
    path = _write(tmp_path / "results.json", runs=runs)
    _, text = make_report([path], tmp_path, figures=False)
    assert "3 of 9 runs" not in text and "9 runs (1 diverged)" in text
    assert "- **diverged**: adam, seed 87 at step 37" in text
    assert "| train R² | 0.94950 ± 0.00071 (2 of 3) |" in text
