"""`tensorsam vision` end to end on scikit-learn's digits: every method, label noise, a dense
model's skipped cells, the results schema, saved models, a grid that grows, and bad input."""

import json

import pytest
import torch

from tensorsam.cli import main

pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the digits data")

SMALL = ["--set", "train_subset=96", "--set", "batch_size=32", "--set", "test_subset=200", "--set", "threads=1",
         "--epochs", "1", "--rank", "2", "--no-progress"]
METHODS = "sgd,sam,asam,das,rebalance,sam-every-2,sam-random-0.5"


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    out = tmp_path_factory.mktemp("vision")
    n = torch.get_num_threads()
    try:
        assert main(["vision", "--out", str(out), "--methods", METHODS, "--format", "none,tr",
                     "--label-noise", "0.4", *SMALL]) == 0
    finally:
        torch.set_num_threads(n)
    return out, json.loads((out / "results.json").read_text())


def test_every_method_runs_and_records_the_shared_fields(grid):
    out, res = grid
    runs = {(r["format"], r["method"]): r for r in res["runs"]}
    assert len(runs) == 14 and res["task"] == "vision"
    for (fmt, method), r in runs.items():
        if fmt == "none" and method in ("das", "rebalance"):
            assert r["status"] == "skipped" and "tensorized" in r["reason"]
            continue
        assert r["status"] == "ok", r
        for key in ("seed", "label_noise", "format", "rank", "epochs", "params", "trainable_params",
                    "seconds_per_step", "wall_seconds", "final_test_acc", "best_val_acc", "test_acc_at_best_val",
                    "final_train_acc_noisy", "final_train_acc_clean", "history"):
            assert key in r, (fmt, method, key)
        assert 0.0 <= r["final_test_acc"] <= 1.0 and r["history"][-1]["step"] == 3
        # every evaluation scores the training images against their noisy and their clean labels
        assert {"train_loss", "val_acc", "test_acc", "lr", "train_acc_noisy", "train_acc_clean"} <= set(r["history"][-1])
        saved = torch.load(out / "models" / f"{method}_{fmt}2_p0.4_seed1.pt", weights_only=True)
        assert set(saved) == {"config", "cell", "final", "best"}
    assert runs[("tr", "das")]["dynamics"] and not runs[("none", "sgd")]["dynamics"]
    data = runs[("tr", "sgd")]["data"]
    assert data["train_labels_flipped"] == round(0.4 * data["n_train"])     # validation is noisy too
    assert data["val_labels_flipped"] == round(0.4 * data["n_val"])


def test_adding_a_seed_runs_only_the_new_cells(grid, tmp_path):
    out, _ = grid
    args = ["vision", "--out", str(out), "--methods", "sgd", "--format", "tr", "--label-noise", "0.4", *SMALL]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    earlier = json.loads((out / "results.json").read_text())["runs"]
    assert main([*args, "--seeds", "1,2", "--resume"]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    assert after["sgd_tr2_p0.4_seed1.pt"] == before["sgd_tr2_p0.4_seed1.pt"]       # kept, not rerun
    runs = json.loads((out / "results.json").read_text())["runs"]
    # the new cell is added; the fixture grid's other cells (other methods) are carried, not dropped
    assert "sgd_tr2_p0.4_seed2.pt" in after and len(runs) == len(earlier) + 1
    assert [(r["method"], r["seed"]) for r in runs[:2]] == [("sgd", 1), ("sgd", 2)]
    assert all(r in runs for r in earlier)


@pytest.mark.parametrize(("args", "message"), [
    (["--label-noise", "1.0"], "label noise must lie in"),
    (["--methods", "lbfgs"], "unknown method 'lbfgs'"),
    (["--rank", "0"], "rank must be a positive int"),
    (["--set", "batch_size=0"], "batch_size must be a positive int"),
    (["--data", "fashion-mnist", "--set", "data_dir=/nonexistent"], "fashion-mnist"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["vision", "--out", str(out), "--no-progress", *args]) == 2
    assert message in capsys.readouterr().err
    assert not (out / "results.json").exists()


def test_a_diverged_cell_is_recorded_and_the_grid_carries_on(tmp_path):
    out = tmp_path / "out"
    code = main(["vision", "--out", str(out), "--methods", "sgd,sam", "--set", "lr=1e30", "--set", "weight_decay=0",
                 *SMALL])
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert code == 3 and {r["status"] for r in runs} == {"diverged"} and len(runs) == 2
    assert all(isinstance(r["diverged_at"], int) for r in runs)
