import json

import pytest

from tensorsam.cli import main
from tensorsam.tasks.toy import ToyConfig, figures, make_model, run_toy


def test_imbalanced_start_keeps_the_product():
    bal = make_model(ToyConfig(imbalance=1.0))
    imb = make_model(ToyConfig(imbalance=4.0))
    assert (imb.reconstruct() - bal.reconstruct()).abs().max() < 1e-12
    assert imb.cores[1].norm() > 3.9 * bal.cores[1].norm()


def test_gd_conserves_q_and_sam_lowers_it_more_with_noise(tmp_path):
    cfg = ToyConfig(noises=[0.0, 2.0], iterations=400, log_every=100)
    runs = {(r["method"], r["noise"]): r for r in run_toy(cfg)["runs"]}
    # Theorem 1: GD changes Q only at O(eta^2) per step
    for noise in (0.0, 2.0):
        q = runs[("gd", noise)]["trace"]["Q"]
        assert abs(q[-1] / q[0] - 1) < 0.05  # the first, large steps move Q by O(eta^2) each
        assert abs(q[-1] / q[1] - 1) < 0.01  # afterwards Q stays put
    # Theorem 3: SAM lowers Q, faster when noise keeps the gradients from vanishing
    assert runs[("sam", 2.0)]["Q_ratio"] < min(1.0, runs[("sam", 0.0)]["Q_ratio"] - 0.05)
    assert runs[("sam", 2.0)]["Q_ratio"] < runs[("gd", 2.0)]["Q_ratio"] - 0.05
    (path,) = figures({"runs": list(runs.values())}, tmp_path)
    assert path.name == "fig1_toy.png" and path.stat().st_size > 1000


def test_cli_writes_results_and_figure(tmp_path):
    rc = main(["toy", "--noises", "0,1", "--iterations", "50", "--out", str(tmp_path), "--set", "size=8",
               "--set", "rank=2", "--set", "log_every=10"])
    assert rc == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["task"] == "toy" and len(res["runs"]) == 4
    assert (tmp_path / "fig1_toy.png").exists()


@pytest.mark.parametrize("override,message", [("rank=40", "rank"), ("methods=[gd,adam]", "unknown method"),
                                              ("noises=[-1]", "noises"), ("lr=0", "lr")])
def test_bad_config_is_refused(tmp_path, capsys, override, message):
    assert main(["toy", "--out", str(tmp_path / "o"), "--set", override]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
