import math
import time

import pytest

from tensorsam.cli import main
from tensorsam.report import (
    format_cell,
    load_results,
    make_report,
    metric_label,
    summarize,
)
from tensorsam.run import write_results
from tensorsam.tasks.registry import TASKS, Task
from tensorsam.ticks import readable_ticks, tick_problems

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
    assert format_cell(0.9482, 0.0012, 3, 3) == "0.9482 ± 0.0012 (n=3)"
    assert format_cell(-80.7, 19.4, 2, 3) == "-81 ± 19 (n=2 of 3)"
    assert format_cell(0.95, 0.0, 3, 3) == "0.95 ± 0 (n=3)"
    assert format_cell(math.nan, math.nan, 0, 3) == "– (n=0 of 3)"
    assert format_cell(71.6, 0.42, 2, 2, decimals=2) == "71.60 ± 0.42 (n=2)"
    assert metric_label("heldout_r2_uncentred") == "held-out R² (uncentred)"
    assert metric_label("train_rmse") == "train RMSE" and metric_label("wall_seconds") == "wall s"


def test_report_prints_each_table_once(tmp_path, capsys):
    results = _write(tmp_path / "e1" / "results.json")
    assert main(["report", str(results), "--out", str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    text = (tmp_path / "out" / "report.md").read_text()
    assert text in printed
    assert "| metric | adam | sam | hooi |" in text            # 6 metrics, 3 methods: metrics as rows
    assert "| train R² | 0.9500 ± 0.0010 (n=3) |" in text
    assert "| method |" not in text and text.count("0.9500 ± 0.0010 (n=3)") == 1
    assert "seeds 42, 87, 100" in text and "rank: [8, 6, 8]" in text
    # default folder: next to the first results file
    make_report([results])
    assert (tmp_path / "e1" / "report.md").exists()


def test_pooling_files_of_one_task(tmp_path):
    a = _write(tmp_path / "a" / "results.json", runs=_runs()[:2])
    b = _write(tmp_path / "b" / "results.json", runs=_runs()[2:3])
    _, text = make_report([a, b], tmp_path, pool=True)
    assert "completion (pooled over 2 files)" in text and "0.9500 ± 0.0010 (n=3)" in text
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
    # four groups, one metric: a row per group
    assert "| method | final q |" in text and "| metric |" not in text
    assert "| gd, noise=0.0 | 1.50 ± 0.71 (n=2) |" in text and "| sam, noise=0.5 | 2.00 ± 0.71 (n=2) |" in text
    write_results(path, task="toy", config={}, runs=runs, extra={"group_by": "method"}, started=time.time())
    with pytest.raises(ValueError, match="group_by"):
        load_results(path)


PAPER = {"source": "paper Table 1", "protocol": {"iterations": 50000, "rank": [8, 6, 8], "lr": 0.001},
         "values": {"adam": {"train_r2": [0.9482, 0.0012]}, "das": {"train_r2": [0.9484, 0.0017]}}}


def _with_reference(path, config, reference=PAPER, notes=None):
    extra = {"reference": reference, **({"notes": notes} if notes else {})}
    write_results(path, task="completion", config=config, runs=_runs(), extra=extra, started=time.time())
    return path


def test_notes_and_reference_comparison(tmp_path):
    path = _with_reference(tmp_path / "results.json", {"iterations": 50000, "rank": [8, 6, 8], "lr": 1e-3},
                           notes="R² on training entries is what the paper reports.")
    _, text = make_report([path], tmp_path)
    assert "> R² on training entries is what the paper reports." in text
    assert "| adam | train R² | 0.9500 ± 0.0010 (n=3) | 0.9482 ± 0.0012 | +1.5 σ |" in text
    assert "| das | train R² | – | 0.9484 ± 0.0017 | – |" in text
    write_results(path, task="completion", config={}, runs=_runs(),
                  extra={"reference": {"values": {"adam": {"train_r2": 0.9}}}}, started=time.time())
    with pytest.raises(ValueError, match="'reference' must be"):
        load_results(path)
    write_results(path, task="completion", config={}, runs=_runs(),
                  extra={"reference": {**PAPER, "protocol": [50000]}}, started=time.time())
    with pytest.raises(ValueError, match="'reference' must be"):
        load_results(path)


def test_paper_comparison_only_when_protocol_matches(tmp_path):
    short = _with_reference(tmp_path / "a" / "results.json", {"iterations": 200, "rank": [8, 6, 8], "lr": 0.001})
    _, text = make_report([short], tmp_path / "a", figures=False)
    assert "σ" not in text
    assert ("_Comparison with paper Table 1 omitted: the protocol differs (this run vs the reference): "
            "iterations 200 vs 50000._") in text
    no_field = _with_reference(tmp_path / "b" / "results.json", {"iterations": 50000, "rank": [8, 6, 8]})
    _, text = make_report([no_field], tmp_path / "b", figures=False)
    assert "σ" not in text and "lr unset vs 0.001" in text
    unknown = _with_reference(tmp_path / "c" / "results.json", {"iterations": 200},
                              reference={k: v for k, v in PAPER.items() if k != "protocol"})
    _, text = make_report([unknown], tmp_path / "c", figures=False)
    assert "σ" not in text and "the reference does not record the protocol" in text
    full = _with_reference(tmp_path / "d" / "results.json", {"iterations": 50000, "rank": [8, 6, 8], "lr": 0.001})
    _, text = make_report([full, short], tmp_path / "d", pool=True, figures=False)   # one file differs: omitted
    assert "σ" not in text and "iterations 200 vs 50000" in text
    _, text = make_report([full], tmp_path / "d", figures=False)
    assert "+1.5 σ" in text


def test_single_seed_shows_no_spread(tmp_path):
    assert format_cell(0.95, math.nan, 1, 1) == "0.95 (n=1)"
    assert format_cell(0.95, 0.0, 1, 1) == "0.95 (n=1)"
    runs = [r for r in _runs() if r["seed"] == 42]
    _, text = make_report([_write(tmp_path / "results.json", runs=runs)], tmp_path, figures=False)
    table = text[text.index("| metric |"):text.index("<details>")]
    assert "±" not in table and "| train R² | 0.949 (n=1) | 0.948 (n=1) | 0.92 (n=1) |" in table


def test_skipped_runs_are_listed_and_not_counted(tmp_path):
    runs = _runs()
    runs.append({"method": "das", "seed": 42, "status": "skipped", "reason": "no tensorized layers"})
    runs.append({"method": "sam", "seed": 7, "status": "skipped", "reason": "no pairs"})
    path = _write(tmp_path / "results.json", runs=runs)
    _, text = make_report([path], tmp_path, figures=False)
    assert "| metric | adam | sam | hooi |" in text and "(n=3)" in text and "of 4" not in text
    assert "- **skipped**: das, seed 42: no tensorized layers" in text
    assert "11 runs (2 skipped)" in text


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
    assert "| train R² | 0.94950 ± 0.00071 (n=2 of 3) |" in text


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure saved through tensorsam.run.io.atomic_save_figure, with its path."""
    from tensorsam.run import io

    saved, save = [], io.atomic_save_figure

    def capture(fig, path, **kwargs):
        saved.append((fig, path))
        return save(fig, path, **kwargs)

    monkeypatch.setattr(io, "atomic_save_figure", capture)
    return saved


def _flatness_results():
    d = [i / 10 - 3 for i in range(61)]
    runs = []
    for direction in ("raw", "filter"):
        for method, r2 in (("hooi", -14.0), ("adam", -230.0), ("sam", -16.0), ("das", -15.5)):
            trace = {"d": d, "loss": [1000 + 500 * x * x for x in d], "heldout_r2": [r2 - x * x for x in d]}
            runs.append({"method": method, "direction": direction, "trace": trace})
    return {"task": "flatness", "runs": runs}


def test_flatness_figure_has_readable_tick_labels(tmp_path, saved_figures):
    from tensorsam.tasks.flatness import figures

    (path,) = figures(_flatness_results(), tmp_path)
    assert path.stat().st_size > 0
    (fig, _), = saved_figures
    assert tick_problems(fig, min_labels=3) == []


def _axes(scale, values):
    from tensorsam.tasks import figure_grid

    fig, axes = figure_grid(1, 1, (4, 3))
    axes[0][0].plot(range(len(values)), values)
    axes[0][0].set_yscale(scale)
    return fig


def test_readable_ticks_fills_a_bare_axis_and_thins_crowded_labels():
    bare = _axes("symlog", [-14.0, -20.0, -240.0])            # one decade label in view
    assert any("tick label" in p for p in tick_problems(bare, min_labels=3))
    assert tick_problems(readable_ticks(bare), min_labels=3) == []
    crowded = _axes("symlog", [1e4, 0.0, -1e5])               # ±10⁰ and 0 overlap at linthresh 2
    assert any("overlapping" in p for p in tick_problems(crowded))
    readable_ticks(crowded)
    assert tick_problems(crowded) == []
    labels = [t.get_text() for t in crowded.axes[0].get_yticklabels()]
    assert any(text.endswith("{0}$") and "10" not in text for text in labels)       # zero kept
