"""Files tensorsam writes: atomic, with the mode a plain ``open`` would give (the user's umask), every
one through ``tensorsam.run.io``; and an output folder that cannot be written is refused in one line
(exit status 2) before any work."""

import os
import re
import stat
from pathlib import Path

import pytest
import torch

from tensorsam.cli import main
from tensorsam.run.io import (
    atomic_save_figure,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_writable_dir,
)

ROOT = Path(__file__).resolve().parents[1]


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for a test; the old one is restored afterwards."""
    old = os.umask(0o022)
    os.umask(old)
    yield os.umask
    os.umask(old)


def test_atomic_files_follow_the_umask(tmp_path, umask):
    from tensorsam.tasks import figure_grid

    fig, _ = figure_grid(1, 1, (2, 2))
    writers = {"a.txt": lambda p: atomic_write_text(p, "x"), "a.json": lambda p: atomic_write_json(p, {"a": 1}),
               "a.pt": lambda p: atomic_torch_save({"t": torch.ones(1)}, p),
               "a.png": lambda p: atomic_save_figure(fig, p)}
    for mask, expected in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        umask(mask)
        for name, write in writers.items():
            path = tmp_path / f"{mask:o}" / name
            write(path)
            plain = path.with_name("plain-" + name)
            plain.write_bytes(b"")                       # what open() gives under the same umask
            assert mode(path) == expected == mode(plain), (name, oct(mask))
    assert not list(tmp_path.rglob("*.tmp"))


def test_a_replaced_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "results.json"
    atomic_write_json(path, {"a": 1})
    path.chmod(0o640)
    atomic_write_json(path, {"a": 2})
    assert mode(path) == 0o640 and path.read_text().strip().endswith("}")


# -- the output folder, checked first ---------------------------------------------------------------

TASK_ARGS = {
    "completion": ["--methods", "adam", "--seeds", "42", "--iterations", "5", "--set", "compile=false"],
    "toy": ["--noises", "0", "--iterations", "5"],
    "flatness": ["--methods", "adam", "--set", "iterations=5"],
}


@pytest.fixture
def no_work(monkeypatch):
    """Make every task's first piece of work fail loudly, so a refusal is seen to come before it."""
    from tensorsam.tasks import flatness, toy
    from tensorsam.tasks.completion import experiment

    def work(*args, **kwargs):
        raise AssertionError("work started before the output directory was checked")

    monkeypatch.setattr(experiment, "prepare", work)
    monkeypatch.setattr(toy, "make_problem", work)
    monkeypatch.setattr(flatness, "run_flatness", work)


@pytest.mark.parametrize("task", sorted(TASK_ARGS))
def test_out_that_is_a_file_is_refused_before_any_work(task, tmp_path, capsys, no_work):
    out = tmp_path / "results"
    out.write_text("not a folder")
    assert main([task, "--out", str(out), "--no-progress", *TASK_ARGS[task]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(out) in err[0] and "is a file, not a directory" in err[0]
    below = out / "deeper"
    assert main([task, "--out", str(below), "--no-progress", *TASK_ARGS[task]]) == 2
    assert str(below) in capsys.readouterr().err
    assert out.read_text() == "not a folder"


def _unwritable(tmp_path) -> Path:
    """A folder this process cannot write: a read-only folder, or (as root, which ignores modes) /sys."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    if Path("/sys").is_dir():
        try:
            check_writable_dir("/sys")
        except ValueError:
            return Path("/sys")
    pytest.skip("running as root and no unwritable folder to try")


@pytest.mark.parametrize("task", sorted(TASK_ARGS))
def test_read_only_out_is_refused_before_any_work(task, tmp_path, capsys, no_work):
    ro = _unwritable(tmp_path)
    try:
        for out in (ro, ro / "new-run"):
            assert main([task, "--out", str(out), "--no-progress", *TASK_ARGS[task]]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and str(out) in err[0] and "not writable" in err[0]
        assert not (ro / "new-run").exists()
    finally:
        if ro.is_relative_to(tmp_path):
            ro.chmod(0o755)


def test_report_and_merge_check_their_out_first(tmp_path, capsys):
    from tensorsam.run import write_results

    res = tmp_path / "results.json"
    write_results(res, task="t", config={}, runs=[{"method": "a", "status": "ok", "x": 1.0}], started=0.0)
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["report", str(res), "--out", str(blocker)]) == 2
    assert str(blocker) in capsys.readouterr().err and not (tmp_path / "report.md").exists()
    assert main(["completion", "--merge", str(tmp_path), "--out", str(blocker)]) == 2
    assert "is a file, not a directory" in capsys.readouterr().err


def test_check_writable_dir_accepts_new_and_existing_folders(tmp_path):
    assert check_writable_dir(tmp_path) == tmp_path
    assert check_writable_dir(tmp_path / "a" / "b") == tmp_path / "a" / "b"
    assert not (tmp_path / "a").exists() and not list(tmp_path.iterdir())    # nothing made, no probe left


# -- every file through run/io -----------------------------------------------------------------------

WRITES = re.compile(r"\.write_text\(|\.write_bytes\(|torch\.save\(|np\.save\(|\.savefig\(|json\.dump\("
                    r"|open\([^)]*[\"'][wax]b?\+?[\"']")
# The norm tracker's streaming log (tensorsam/dynamics.py) appends rows as they come, by design.
ALLOWED = {"src/tensorsam/run/io.py": "the atomic writes themselves",
           "src/tensorsam/dynamics.py": "NormTracker's append-only log"}


def test_every_file_tensorsam_writes_goes_through_run_io():
    found = []
    for path in sorted([*ROOT.glob("src/tensorsam/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        rel = path.relative_to(ROOT).as_posix()
        if rel in ALLOWED:
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if WRITES.search(line):
                found.append(f"{rel}:{i}: {line.strip()}")
    assert not found, "writes outside tensorsam.run.io:\n" + "\n".join(found)


def test_a_directory_of_another_library_is_published_whole_with_an_atomic_latest_pointer(tmp_path):
    from tensorsam.run.io import current_umask, latest_directory, publish_directory

    assert latest_directory(tmp_path) is None
    first = publish_directory(tmp_path, "step-1", lambda d: (d / "a.bin").write_bytes(b"1"))
    assert latest_directory(tmp_path) == first and (first / "a.bin").read_bytes() == b"1"

    def dies(d):
        (d / "a.bin").write_bytes(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):   # killed while writing: latest still names the whole old one
        publish_directory(tmp_path, "step-2", dies)
    assert latest_directory(tmp_path) == first and sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step-1"]
    with pytest.raises(ValueError, match="publish under a new name"):
        publish_directory(tmp_path, "step-1", lambda d: None)
    second = publish_directory(tmp_path, "step-2", lambda d: (d / "a.bin").write_bytes(b"2"))
    assert latest_directory(tmp_path) == second and not first.exists()
    assert oct((tmp_path / "latest").stat().st_mode & 0o777) == oct(0o666 & ~current_umask())
