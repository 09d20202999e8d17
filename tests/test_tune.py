"""`tensorsam tune vision`: an optuna study on the validation split, kept in SQLite so that it
continues, with diverged trials pruned and the test split never scored."""

import json

import pytest

from tensorsam.cli import main

optuna = pytest.importorskip("optuna")
pytest.importorskip("sklearn.datasets", reason="scikit-learn provides the digits data")

TINY = ["--set", "train_subset=64", "--set", "batch_size=32", "--set", "val_size=64", "--set", "threads=1",
        "--epochs", "2", "--rank", "2", "--no-progress"]


@pytest.fixture(autouse=True)
def no_test_split(monkeypatch):
    """The search must never score the test split: take it away."""
    from tensorsam.tasks.vision import experiment

    real = experiment._Data.__init__

    def init(self, *args, **kwargs):
        real(self, *args, **kwargs)
        self.test = self.test_subset = None

    monkeypatch.setattr(experiment._Data, "__init__", init)


def _trials(out):
    return json.loads((out / "tune.json").read_text())["trials"]


def test_a_study_continues_in_its_sqlite_file_and_runs_only_the_missing_trials(tmp_path, capsys):
    args = ["tune", "vision", "--methods", "das", "--out", str(tmp_path), *TINY]
    assert main([*args, "--trials", "2"]) == 0
    assert (tmp_path / "study.db").is_file() and (tmp_path / "tune.png").is_file()
    first = _trials(tmp_path)
    assert [t["state"] for t in first] == ["complete", "complete"] and {"alpha", "lr"} <= set(first[0])
    assert main([*args, "--trials", "3"]) == 0
    grown = _trials(tmp_path)
    assert len(grown) == 3 and grown[:2] == first
    report = json.loads((tmp_path / "tune.json").read_text())
    assert report["best"]["best_val_acc"] == max(t["best_val_acc"] for t in grown)
    assert "test split is not scored" in report["score"]
    # other settings: refused, naming the field
    assert main([*args, "--trials", "4", "--set", "weight_decay=0.01"]) == 2
    assert "weight_decay: 0.0005 -> 0.01" in capsys.readouterr().err


def test_a_diverged_trial_is_pruned_and_the_study_goes_on(tmp_path):
    assert main(["tune", "vision", "--methods", "sam", "--params", "rho", "--set", "lr=1e12", "--trials", "2",
                 "--out", str(tmp_path), *TINY]) == 0
    trials = _trials(tmp_path)
    assert [t["state"] for t in trials] == ["pruned", "pruned"] and all("diverged_at" in t for t in trials)


def test_a_trial_left_running_by_a_killed_process_is_tried_again_first(tmp_path):
    args = ["tune", "vision", "--methods", "sgd", "--out", str(tmp_path), *TINY]
    assert main([*args, "--trials", "1"]) == 0
    study = optuna.load_study(study_name="vision-sgd", storage=f"sqlite:///{tmp_path / 'study.db'}")
    orphan = study.ask({"lr": optuna.distributions.FloatDistribution(1e-3, 0.5, log=True)})   # never told
    assert main([*args, "--trials", "2"]) == 0
    trials = _trials(tmp_path)
    assert [t["state"] for t in trials] == ["complete", "fail", "complete"]
    assert trials[2]["lr"] == orphan.params["lr"] and trials[2]["retry_of"] == 1


def test_a_search_needs_one_method_and_known_values(tmp_path, capsys):
    assert main(["tune", "vision", "--methods", "sgd,sam", "--out", str(tmp_path), *TINY]) == 2
    assert main(["tune", "vision", "--methods", "sam", "--params", "momentum", "--out", str(tmp_path), *TINY]) == 2
    err = capsys.readouterr().err
    assert "one method at a time" in err and "searchable values: ['rho', 'alpha', 'lr']" in err
