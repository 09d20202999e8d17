"""Resume checks what it resumes: one fingerprint per run (the settings that change its results
plus its grid coordinates), kept with its checkpoints and its finished record."""

import json

import pytest
import torch

from tensorsam.cli import main
from tensorsam.run import Loop, Sweep
from tensorsam.tasks import toy as toy_task
from tensorsam.tasks.toy import ToyConfig, make_problem, run_one

TINY = ["--set", "size=8", "--set", "rank=2", "--iterations", "40", "--set", "log_every=10"]


def _toy_interrupted_after(tmp_path, monkeypatch, stop_at: int):
    """Run toy (gd then sam) into tmp_path; the sam run is interrupted after ``stop_at`` steps."""
    real = toy_task.Loop

    class StoppingLoop(real):
        def __iter__(self):
            for it in super().__iter__():
                if self.desc.startswith("sam") and it == stop_at:
                    self._signal = 2           # as SIGINT would: save at this boundary, then stop
                yield it

    monkeypatch.setattr(toy_task, "Loop", StoppingLoop)
    assert main(["toy", "--out", str(tmp_path), "--noises", "0.5", *TINY, "--no-progress"]) == 130
    monkeypatch.setattr(toy_task, "Loop", real)


def test_a_changed_setting_is_refused_naming_the_field_for_a_run_interrupted_mid_way(tmp_path, monkeypatch, capsys):
    _toy_interrupted_after(tmp_path, monkeypatch, stop_at=15)
    assert (tmp_path / ".work" / "gd_noise0.5.pt").exists()
    ckpt = tmp_path / ".work" / "sam_noise0.5_run.ckpt"
    before = ckpt.read_bytes()
    code = main(["toy", "--out", str(tmp_path), "--noises", "0.5", *TINY, "--set", "rho=0.1",
                 "--resume", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "rho: 0.05 -> 0.1" in err and "other settings" in err
    assert ckpt.read_bytes() == before and not (tmp_path / "results.json").exists()  # nothing touched


def test_resuming_with_the_same_settings_is_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch, capsys):
    _toy_interrupted_after(tmp_path / "a", monkeypatch, stop_at=25)
    assert main(["toy", "--out", str(tmp_path / "a"), "--noises", "0.5", *TINY, "--resume", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "kept 1 finished earlier, ran 1" in out
    assert main(["toy", "--out", str(tmp_path / "b"), "--noises", "0.5", *TINY, "--no-progress"]) == 0
    runs = [json.loads((tmp_path / d / "results.json").read_text())["runs"] for d in "ab"]
    for r in runs:
        for run in r:
            run.pop("wall_seconds")
    assert runs[0] == runs[1]


def test_a_finished_cell_kept_in_the_work_folder_is_refused_under_other_settings(tmp_path):
    Sweep({"seed": [1]}, tmp_path, same={"lr": 0.1}).run(lambda c: ({"score": 1.0}, None))
    # an interrupted grid: the finished cell is still in .work, no results file yet
    sweep = Sweep({"seed": [1, 2]}, tmp_path, resume=True, same={"lr": 0.1})
    calls = []

    def cell(c):
        calls.append(c.tag)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sweep.run(lambda c: ({"score": 1.0}, None) if c["seed"] == 1 else cell(c))
    with pytest.raises(ValueError, match=r"interrupted runs .* other settings \(lr: 0.1 -> 0.3\)"):
        Sweep({"seed": [1, 2]}, tmp_path, resume=True, same={"lr": 0.3}).run(lambda c: ({"score": 2.0}, None))
    (tmp_path / ".work" / "settings.json").unlink()       # the finished cell's own fingerprint still refuses
    with pytest.raises(ValueError, match=r"cell seed-1 .* other settings \(lr: 0.1 -> 0.3\)"):
        Sweep({"seed": [1, 2]}, tmp_path, resume=True, same={"lr": 0.3}).run(lambda c: ({"score": 2.0}, None))


def test_a_loop_checkpoint_from_another_grid_cell_is_refused(tmp_path):
    cfg = ToyConfig(size=6, rank=2, iterations=10, log_every=5)
    t, n = make_problem(cfg)
    ckpt = tmp_path / "run.ckpt"
    run_one(cfg, "gd", 0.5, t + 0.5 * n, checkpoint=ckpt, fingerprint={"lr": cfg.lr, "method": "gd"})
    with pytest.raises(ValueError, match=r"method: 'gd' -> 'sam'"):
        run_one(cfg, "sam", 0.5, t + 0.5 * n, checkpoint=ckpt, resume=True,
                fingerprint={"lr": cfg.lr, "method": "sam"})
    with pytest.raises(ValueError, match="saved without a fingerprint"):
        Loop(3, state={"w": torch.nn.Linear(1, 1)}, checkpoint=_plain_checkpoint(tmp_path), resume=True,
             fingerprint={"lr": 0.1})


def _plain_checkpoint(tmp_path):
    path = tmp_path / "plain.ckpt"
    for _ in Loop(2, state={"w": torch.nn.Linear(1, 1)}, checkpoint=path, progress=False):
        pass
    return path


def test_resume_without_anything_to_resume_says_it_starts_fresh(tmp_path, capsys):
    assert main(["toy", "--out", str(tmp_path / "new"), "--noises", "0", "--methods", "gd", *TINY, "--resume",
                 "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "nothing to resume in" in out and "starting fresh" in out


def test_settings_that_cannot_change_results_may_differ_on_resume(tmp_path, monkeypatch, capsys):
    _toy_interrupted_after(tmp_path, monkeypatch, stop_at=15)
    # the toy has no neutral field; the progress bar is a flag and may differ
    assert main(["toy", "--out", str(tmp_path), "--noises", "0.5", *TINY, "--resume"]) == 0


def test_the_fingerprint_covers_result_fields_and_coordinates_but_not_the_checkpoint_interval():
    from tensorsam.tasks.vision.config import VisionConfig
    from tensorsam.tasks.vision.experiment import vision_sweep

    sweep = vision_sweep(VisionConfig(threads=2))
    fp = sweep.fingerprint(sweep.cells[0])
    assert fp["threads"] == 2 and fp["lr"] == 0.05 and fp["method"] == "sgd" and fp["seed"] == 1
    assert "checkpoint_every" not in fp and "methods" not in fp


def test_an_interrupted_grid_is_refused_under_other_settings_even_when_its_checkpoints_would_be_renamed(tmp_path):
    from tensorsam.run.sweep import Sweep

    def stop(c):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Sweep({"seed": [1]}, tmp_path, resume=True, same={"rank": [8, 6, 8]}).run(stop)
    with pytest.raises(ValueError, match=r"interrupted runs .* other settings \(rank: \[8, 6, 8\] -> \[4, 4, 4\]\)"):
        Sweep({"seed": [1]}, tmp_path, resume=True, same={"rank": [4, 4, 4]}).run(lambda c: ({}, None))
    # without --resume the new grid starts afresh
    assert Sweep({"seed": [1]}, tmp_path, same={"rank": [4, 4, 4]}).run(lambda c: ({"x": 1}, None)).ran == ["seed-1"]
