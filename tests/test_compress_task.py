"""`tensorsam compress` end to end on scikit-learn's digits: a dense model from `tensorsam vision`,
compressed to a ratio with and without balanced cores, fine-tuned over methods; the results
fields, the saved compressed model, a grid that grows by a seed, a plain state_dict at a rank,
and bad input refused before anything is written."""

import json

import pytest
import torch

from tensorsam.cli import main
from tensorsam.models import resnet
from tensorsam.tasks.compress.experiment import load_compressed, q_total
from tensorsam.tasks.compress.report import report_sections

pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the digits data")

SMALL = ["--set", "train_subset=96", "--set", "batch_size=32", "--set", "test_subset=200", "--set", "threads=1",
         "--epochs", "1", "--no-progress"]
GRID = ["--methods", "sgd,das", "--ratio", "2.5", "--balance", "false,true", *SMALL]


def _main(args) -> int:
    n = torch.get_num_threads()
    try:
        return main([str(a) for a in args])
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory):
    """DIR/models/<run>.pt of a tiny dense `tensorsam vision` run."""
    out = tmp_path_factory.mktemp("vision")
    assert _main(["vision", "--out", out, "--methods", "sgd", "--format", "none", *SMALL]) == 0
    return out / "models" / "sgd_none5_p0_seed1.pt"


@pytest.fixture(scope="module")
def grid(dense_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("compress")
    assert _main(["compress", "--model", dense_model, "--out", out, *GRID]) == 0
    return out, json.loads((out / "results.json").read_text())


def test_each_run_records_the_shared_fields_and_its_compression(grid):
    out, res = grid
    runs = {(r["balance"], r["method"]): r for r in res["runs"]}
    assert res["task"] == "compress" and len(runs) == 4 and res["source"]["kind"] == "vision"
    for (balance, method), r in runs.items():
        assert r["status"] == "ok", r
        for key in ("seed", "epochs", "params", "trainable_params", "seconds_per_step", "wall_seconds", "final_test_acc",
                    "best_val_acc", "test_acc_at_best_val", "history", "dynamics", "format", "target_ratio",
                    "achieved_ratio", "dense_params", "acc_dense", "acc_before_finetune", "q_after_decompose",
                    "q_after_balance", "q_final"):
            assert key in r, (balance, method, key)
        assert r["format"] == "tt" and r["target_ratio"] == 2.5
        assert abs(r["achieved_ratio"] / 2.5 - 1) < 0.05 and r["dense_params"] / r["params"] == r["achieved_ratio"]
        assert 0 <= r["acc_before_finetune"] <= 1 and 0 <= r["final_test_acc"] <= 1 and r["history"][-1]["step"] == 3
        assert r["q_after_decompose"] > 1.0 and r["q_final"] >= 0        # TT-SVD leaves the norm in one core
        if balance:
            assert abs(r["q_after_balance"]) < 1e-6 * r["q_after_decompose"]
        else:
            assert r["q_after_balance"] is None
        assert (out / "models" / f"{method}_ttx2.5{'_bal' if balance else ''}_seed1.pt").is_file()
    assert runs[(True, "sgd")]["acc_before_finetune"] == pytest.approx(runs[(False, "sgd")]["acc_before_finetune"],
                                                                       abs=1 / 360)  # balancing is exact
    assert (out / "compress_curves.png").is_file()
    text = report_sections(res)
    assert "### TT ×2.5: achieved ×2.5" in text and "| compressed, before fine-tuning |" in text and "| das |" in text


def test_the_saved_compressed_models_load_back_with_their_cores(grid):
    out, res = grid
    for entry in res["compressions"]:
        model = load_compressed(out / entry["path"])
        assert sum(p.numel() for p in model.parameters()) == entry["params"]
        q = entry["q_after_balance"] if entry["balance"] else entry["q_after_decompose"]
        assert q_total(model) == pytest.approx(q, rel=1e-4, abs=1e-6)
        assert [layer["name"] for layer in entry["layers"]][-1] == "blocks.8.conv2"      # fc kept dense


def test_adding_a_seed_runs_only_the_new_cells(grid, dense_model, capsys):
    out, first = grid
    before = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    assert _main(["compress", "--model", dense_model, "--out", out, *GRID, "--seeds", "1,2", "--resume"]) == 0
    assert "8 cells: kept 4 finished earlier, ran 4" in capsys.readouterr().out
    after = {p.name: p.stat().st_mtime_ns for p in (out / "models").iterdir()}
    assert all(after[name] == t for name, t in before.items()) and len(after) == 8
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert [r for r in runs if r["seed"] == 1] == first["runs"]


def test_a_fresh_grid_over_other_runs_is_refused_before_any_compressed_model_is_written(grid, dense_model, capsys):
    out, _ = grid
    before = {p.name: p.stat().st_mtime_ns for p in (out / "compressed").iterdir()}
    assert _main(["compress", "--model", dense_model, "--out", out, "--methods", "sgd", "--ratio", "5", *SMALL]) == 2
    assert "outside this grid" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in (out / "compressed").iterdir()} == before


def test_a_plain_state_dict_with_its_architecture_named_compresses_at_a_rank(tmp_path):
    torch.save(resnet(20, None, None, 10, 1).state_dict(), tmp_path / "dense.pt")
    out = tmp_path / "out"
    assert _main(["compress", "--model", tmp_path / "dense.pt", "--arch", "resnet20", "--data", "digits", "--rank", "2",
                  "--balance", "true", "--methods", "sgd", "--out", out, *SMALL]) == 0
    (run,) = json.loads((out / "results.json").read_text())["runs"]
    assert run["status"] == "ok" and run["rank"] == 2 and run["target_ratio"] is None and run["balance"] is True
    assert run["achieved_ratio"] > 10 and (out / "compressed" / "ttr2_bal.pt").is_file()


def test_resuming_with_another_model_file_is_refused(grid, tmp_path, capsys):
    out, _ = grid
    torch.save(resnet(20, None, None, 10, 1).state_dict(), tmp_path / "other.pt")
    args = ["compress", "--model", tmp_path / "other.pt", "--arch", "resnet20", "--data", "digits", "--out", out]
    assert _main([*args, *GRID, "--resume"]) == 2
    assert "made from another model file" in capsys.readouterr().err


def _state_dict(tmp_path, depth=20, in_channels=1):
    path = tmp_path / f"resnet{depth}_{in_channels}.pt"
    torch.save(resnet(depth, None, None, 10, in_channels).state_dict(), path)
    return ["--model", path]


@pytest.mark.parametrize(("make", "message"), [
    (lambda d, m: ["--model", m, "--ratio", "1000"], "ratio=1000 is unreachable"),
    (lambda d, m: ["--model", m, "--ratio", "1"], "ratio must be > 1"),
    (lambda d, m: [*_state_dict(d, depth=32), "--arch", "resnet20", "--data", "digits"],
     "unexpected keys: blocks.9.conv1.weight"),
    (lambda d, m: [*_state_dict(d, in_channels=3), "--arch", "resnet20", "--data", "digits"],
     "conv1.weight (16, 3, 3, 3) vs (16, 1, 3, 3)"),
    (lambda d, m: [*_state_dict(d), "--data", "digits"], "plain state_dict: name its architecture"),
    (lambda d, m: ["--model", d / "nowhere.pt"], "model file not found"),
])
def test_bad_input_is_a_clear_error_and_writes_nothing(make, message, dense_model, tmp_path, capsys):
    out = tmp_path / "out"
    assert _main(["compress", "--out", out, "--methods", "sgd", *make(tmp_path, dense_model), *SMALL]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())
