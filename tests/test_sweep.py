import json
import time

import pytest
import torch

from tensorsam.cli import main
from tensorsam.run import Sweep, write_results
from tensorsam.tasks.completion import CompletionConfig, run_completion
from tensorsam.tasks.completion import experiment as completion_experiment


def _grid(out, seeds, ran, *, resume=True, same=None):
    """A method x seed sweep whose cells record their call in ``ran`` and keep a tensor payload."""

    def cell(c):
        ran.append(c.tag)
        record = {"method": c["method"], "seed": c["seed"], "score": c["seed"] * 10.0}
        return record, [torch.full((2,), c["seed"])]

    def write(result):
        write_results(out / "results.json", task="demo", config={"lr": 0.1, "seeds": seeds}, runs=result.all_runs(),
                      extra={"sweep": result.record()}, started=time.time())

    sweep = Sweep({"seed": seeds, "method": ["a", "b"]}, out, resume=resume, payload_file="payloads.pt",
                  tag=lambda c: f"{c['method']}_seed{c['seed']}", same=same or {"lr": 0.1})
    return sweep.run(cell, write)


def test_adding_a_seed_runs_only_its_cells_and_keeps_the_others(tmp_path):
    ran = []
    first = _grid(tmp_path, [1], ran)
    assert ran == ["a_seed1", "b_seed1"] and first.kept == [] and not (tmp_path / ".work").exists()
    ran.clear()
    grown = _grid(tmp_path, [1, 2], ran)
    assert ran == ["a_seed2", "b_seed2"] and grown.kept == ["a_seed1", "b_seed1"]
    assert grown.summary() == "4 cells: kept 2 finished earlier, ran 2"
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [("a", 1), ("b", 1), ("a", 2), ("b", 2)]
    assert res["sweep"]["kept"] == ["a_seed1", "b_seed1"]
    payloads = torch.load(tmp_path / "payloads.pt", weights_only=True)
    assert sorted(payloads) == ["a_seed1", "a_seed2", "b_seed1", "b_seed2"]
    assert torch.equal(payloads["b_seed2"][0], torch.full((2,), 2))
    # a smaller grid keeps what it has; without --resume its cells run again
    ran.clear()
    assert _grid(tmp_path, [1, 2], ran).carried == 0 and ran == []
    assert len(_grid(tmp_path, [1, 2], ran, resume=False).ran) == 4


def test_another_grid_in_the_same_dir_carries_the_earlier_runs_and_payloads(tmp_path):
    ran = []
    _grid(tmp_path, [1, 2], ran)
    before = json.loads((tmp_path / "results.json").read_text())["runs"]
    ran.clear()
    other = _grid(tmp_path, [3], ran)
    assert ran == ["a_seed3", "b_seed3"] and other.carried == 4
    assert other.summary() == "2 cells: kept 0 finished earlier, ran 2; 4 earlier run(s) outside this grid carried over"
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["runs"][2:] == before and res["sweep"]["carried"] == 4
    assert [c["config"]["seeds"] for c in res["sweep"]["carried_from"]] == [[1, 2]]
    assert other.runs == res["runs"][:2] and other.all_runs() == res["runs"]
    assert [(r["method"], r["seed"]) for r in res["runs"][:2]] == [("a", 3), ("b", 3)]
    payloads = torch.load(tmp_path / "payloads.pt", weights_only=True)
    assert sorted(payloads) == [f"{m}_seed{s}" for m in "ab" for s in (1, 2, 3)]
    # the first grid again: nothing runs, and the third seed's runs stay
    ran.clear()
    assert _grid(tmp_path, [1, 2], ran).carried == 2 and ran == []
    assert len(json.loads((tmp_path / "results.json").read_text())["runs"]) == 6
    # starting afresh (no --resume) where runs outside the grid would be lost is refused, and writes nothing
    mtime = (tmp_path / "results.json").stat().st_mtime_ns
    with pytest.raises(ValueError, match=r"holds 4 finished run\(s\) outside this grid.*--resume"):
        _grid(tmp_path, [3], ran, resume=False)
    assert ran == [] and (tmp_path / "results.json").stat().st_mtime_ns == mtime
    assert not (tmp_path / ".tensorsam.lock").exists()


def test_one_writer_at_a_time_and_a_killed_writer_blocks_nothing(tmp_path):
    import os
    import subprocess
    import sys

    from tensorsam.run.io import claim_directory

    ran = []
    with claim_directory(tmp_path), pytest.raises(ValueError, match=rf"in use by process {os.getpid()} on .*lock"):
        _grid(tmp_path, [1], ran)
    assert ran == [] and not (tmp_path / "results.json").exists()
    # a holder killed with SIGKILL leaves its lock file, but the kernel dropped the lock
    code = f"import os; from tensorsam.run.io import claim_directory\nwith claim_directory({str(tmp_path)!r}):\n" \
           "    os.kill(os.getpid(), 9)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == -9
    assert (tmp_path / ".tensorsam.lock").exists()
    _grid(tmp_path, [1], ran)
    assert ran == ["a_seed1", "b_seed1"] and not (tmp_path / ".tensorsam.lock").exists()


def _interrupted_at(seed: int, calls: list, result):
    """A cell function that records each tag in ``calls`` and is interrupted at ``seed``."""
    def cell(c):
        calls.append(c.tag)
        if c["seed"] == seed:
            raise KeyboardInterrupt
        return result(c)

    return cell


def test_cells_of_an_interrupted_grid_outside_the_new_one_are_carried(tmp_path):
    calls = []
    interrupted = _interrupted_at(3, calls, lambda c: ({"method": c["method"], "seed": c["seed"]}, [torch.zeros(1)]))

    with pytest.raises(KeyboardInterrupt):
        Sweep({"seed": [1, 3], "method": ["a"]}, tmp_path, resume=True, payload_file="payloads.pt",
              tag=lambda c: f"{c['method']}_seed{c['seed']}", same={"lr": 0.1}).run(interrupted)
    ran = []
    with pytest.raises(ValueError, match=r"holds 1 finished run\(s\) outside this grid"):
        _grid(tmp_path, [2], ran, resume=False)
    res = _grid(tmp_path, [2], ran)
    assert ran == ["a_seed2", "b_seed2"] and res.carried == 1 and [r["seed"] for r in res.runs] == [2, 2]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in saved["runs"]] == [("a", 2), ("b", 2), ("a", 1)]
    assert saved["sweep"]["carried_from"] == [{"interrupted grid in this dir, same settings": ["a_seed1"]}]
    assert sorted(torch.load(tmp_path / "payloads.pt", weights_only=True)) == ["a_seed1", "a_seed2", "b_seed2"]


def test_a_cell_without_its_payload_runs_again_and_other_settings_are_refused(tmp_path):
    ran = []
    _grid(tmp_path, [1], ran)
    payloads = torch.load(tmp_path / "payloads.pt", weights_only=True)
    del payloads["b_seed1"]
    torch.save(payloads, tmp_path / "payloads.pt")
    ran.clear()
    _grid(tmp_path, [1], ran)
    assert ran == ["b_seed1"]
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.1 -> 0.2\)"):
        _grid(tmp_path, [1, 2], ran, same={"lr": 0.2})


def test_interrupted_cells_resume_from_the_work_folder(tmp_path):
    calls = []
    cell = _interrupted_at(2, calls, lambda c: ({"score": 1.0}, None))

    sweep = Sweep({"seed": [1, 2]}, tmp_path, resume=True)
    with pytest.raises(KeyboardInterrupt):
        sweep.run(cell)
    assert (tmp_path / ".work" / "seed-1.pt").exists()
    result = Sweep({"seed": [1, 2]}, tmp_path, resume=True).run(lambda c: ({"score": 2.0}, None))
    assert result.kept == ["seed-1"] and result.ran == ["seed-2"]
    assert [r["seed"] for r in result.runs] == [1, 2] and [r["score"] for r in result.runs] == [1.0, 2.0]


def test_a_grid_listing_a_value_twice_is_refused():
    with pytest.raises(ValueError, match="lists seed 1 twice"):
        Sweep({"seed": [1, 1]})
    with pytest.raises(ValueError, match="no values"):
        Sweep({"seed": []})


def test_completion_grid_grows_by_a_seed(tmp_path, monkeypatch, capsys):
    calls = []
    real = completion_experiment.train_run

    def counting(method, cfg, values, masks, seed, rank, **kw):
        calls.append((method, seed))
        return real(method, cfg, values, masks, seed, rank, **kw)

    monkeypatch.setattr(completion_experiment, "train_run", counting)
    # the command caps hooi_iterations at 2000 for short runs: the same settings as this call
    cfg = CompletionConfig(methods=["adam"], seeds=[42], iterations=50, log_every=25, compile=False,
                           hooi_iterations=2000)
    first = run_completion(cfg, tmp_path)
    assert calls == [("adam", 42)]
    calls.clear()
    args = ["completion", "--methods", "adam", "--seeds", "42,87", "--iterations", "50",
            "--out", str(tmp_path), "--set", "log_every=25", "--set", "compile=false", "--no-progress",
            "--resume"]
    assert main(args) == 0
    assert calls == [("adam", 87)]
    assert "2 cells: kept 1 finished earlier, ran 1" in capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    assert [(r["method"], r["seed"]) for r in res["runs"]] == [("adam", 42), ("adam", 87)]
    assert res["runs"][0]["train_r2"] == first["runs"][0]["train_r2"] and res["config"]["seeds"] == [42, 87]
    sol = torch.load(tmp_path / "solutions.pt", weights_only=True)
    assert sorted(sol) == ["adam_seed42", "adam_seed87"]
    assert all(torch.equal(a, b) for a, b in zip(sol["adam_seed42"], first["solutions"]["adam_seed42"]))
    # growing with other settings would mix runs: refused, nothing changed
    assert main([*args[:-1], "--set", "lr=0.01", "--seeds", "42,87,100", "--resume"]) == 2
    assert "other settings (lr: 0.001 -> 0.01)" in capsys.readouterr().err
    assert calls == [("adam", 87)]
