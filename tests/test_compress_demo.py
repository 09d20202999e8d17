import pytest
import torch

from tensorsam.cli import main
from tensorsam.commands.compress_demo import FORMAT_ORDER, compress_weight, structured_weight
from tensorsam.tensors import balanced_factors


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread (restored afterwards): CP-ALS runs thousands of tiny matmuls, which
    took 25 s instead of 1 s with 2 threads on the shared, oversubscribed 2-core CI box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_compress_weight_every_format_and_exact_at_full_rank():
    w = structured_weight(12, 18, seed=1)
    in_modes, out_modes = balanced_factors(18, 2), balanced_factors(12, 2)
    rows = compress_weight(w, in_modes, out_modes, [1, 12])
    assert {r["format"] for r in rows} == set(FORMAT_ORDER)
    by = {(r["format"], r["rank"]): r for r in rows}
    for fmt in ("tucker", "tt", "ttm"):  # rank 12 is full for these modes
        assert by[fmt, 12]["error"] < 1e-10
        assert by[fmt, 1]["error"] > 0.1  # rank 1 cannot hold a rank-8 weight
    assert by["cp", 12]["error"] < by["cp", 1]["error"]
    assert by["tt", 1]["params"] == 3 + 6 + 4 + 3 and by["tt", 1]["ratio"] == 216 / 16


def test_structured_weight_is_structured():
    s = torch.linalg.svdvals(structured_weight(64, 48, seed=0))
    assert s[8:].square().sum() / s.square().sum() < 0.01  # rank-8 signal, 5% noise


def test_cli_prints_table(capsys, tmp_path):
    assert main(["compress-demo", "--in-features", "16", "--out-features", "12", "--ranks", "2", "3",
                 "--seed", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for name in ("dense", "CP", "Tucker", "TT", "TTM", "TR", "rel. error"):
        assert name in out
    assert "192" in out  # dense parameter count


def test_cli_rejects_bad_arguments(capsys):
    assert main(["compress-demo", "--in-features", "0"]) == 2
    assert main(["compress-demo", "--formats", "hss"]) == 2
    assert "unknown tensor format" in capsys.readouterr().err


def test_cli_shows_progress_per_row_and_resume_runs_only_new_rows(capsys, tmp_path):
    args = ["compress-demo", "--in-features", "16", "--out-features", "12", "--formats", "tt", "tucker",
            "--seed", "1", "--out", str(tmp_path), "--resume"]
    assert main([*args, "--ranks", "2"]) == 0
    out, err = capsys.readouterr()
    assert "nothing to resume" in out and "[1/2] tt_rank2" in err and "[2/2] tucker_rank2" in err
    assert main([*args, "--ranks", "2", "3"]) == 0
    assert "4 cells: kept 2 finished earlier, ran 2" in capsys.readouterr().out
    assert main([*args, "--ranks", "2", "--seed", "2"]) == 2      # another weight: refused
    assert "other settings (seed: 1 -> 2)" in capsys.readouterr().err
