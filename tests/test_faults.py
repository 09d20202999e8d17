"""Fault tests: a task run SIGKILLed at a chosen point (mid-run, just before or after a checkpoint,
while a checkpoint's or a results file's temporary file exists, between grid cells, before the
results are written, ...) and then rerun with ``--resume`` ends with results and saved tensors
bit-identical to an uninterrupted run's, and leaves no temporary file behind.

The runs go through ``tests/faults_helper.py``, a fork server that imports tensorsam once, so each
run costs its own compute only; the kill points are its triggers (see its docstring).
(tests/test_resume_completion.py kills a fresh ``python -m tensorsam.cli`` process by time.)
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tensorsam.run.io import load_checkpoint

HELPER = Path(__file__).with_name("faults_helper.py")
KILLED = -signal.SIGKILL

COMPLETION = ["completion", "--methods", "adam,das", "--seeds", "87", "--iterations", "200", "--set",
              "checkpoint_every=20", "--set", "log_every=50", "--set", "compile=false", "--no-progress"]
TOY = ["toy", "--noises", "0", "--methods", "gd,sam", "--iterations", "700", "--set", "log_every=600",
       "--set", "size=8", "--set", "rank=2", "--no-progress"]           # checkpoints at 600 and 700
VISION = ["vision", "--epochs", "2", "--train-subset", "96", "--rank", "2", "--methods", "sgd,das", "--seeds", "1",
          "--device", "cpu", "--set", "batch_size=32", "--set", "val_size=40", "--set", "test_subset=100",
          "--set", "threads=1", "--set", "checkpoint_every=2",
          "--no-progress"]                                             # 3 steps an epoch; checkpoints at 2, 4, 6
# per task: the saved tensors compared bit for bit (globs; results.json always is) and the figures
OUTPUTS = {"completion": (["solutions.pt"], []), "toy": ([], ["fig1_toy.png"]),
           "vision": (["models/*.pt"], ["vision_curves.png"])}


@dataclasses.dataclass
class Point:
    """A kill point: the trigger of each killed run (the first fresh, the others resumed), and for a
    kill while a temporary file exists, what its target held: None (nothing yet), an int (a loop
    checkpoint at that iteration) or ... (not checked)."""

    id: str
    kills: list[str]
    previous: object = ...


def _points(*points: Point):
    return [pytest.param(p, id=p.id) for p in points]


CKPT = "*/.work/*.ckpt"
COMPLETION_POINTS = _points(                    # 200 iterations a cell, a checkpoint every 20
    Point("at-start-up", ["iter:0"]),
    Point("mid-run-before-first-checkpoint", ["iter:13"]),
    Point("while-first-checkpoint-tmp-exists", [f"tmp:{CKPT}:1"], previous=None),
    Point("while-checkpoint-tmp-exists", [f"tmp:{CKPT}:3"], previous=40),
    Point("just-after-checkpoint", [f"after:{CKPT}:4"]),
    Point("just-before-checkpoint", ["iter:100"]),
    Point("while-last-checkpoint-tmp-exists", [f"tmp:{CKPT}:10"], previous=180),
    Point("while-finished-cell-tmp-exists", ["tmp:*/.work/adam_seed87.pt:1"], previous=None),
    Point("between-cells", ["after:*/.work/adam_seed87.pt:1"]),
    Point("mid-second-cell", ["iter:263"]),
    Point("while-solutions-tmp-exists", ["tmp:*/solutions.pt:1"], previous=None),
    Point("while-results-tmp-exists", ["tmp:*/results.json:1"], previous=None),
    Point("after-results-before-cleanup", ["after:*/results.json:1"]),
    Point("killed-again-while-resuming", [f"tmp:{CKPT}:3", "tmp:*/.work/das_*.ckpt:2"], previous=40),
)
TOY_POINTS = _points(                           # 700 iterations a cell
    Point("at-start-up", ["iter:0"]),
    Point("while-checkpoint-tmp-exists", [f"tmp:{CKPT}:2"], previous=600),
    Point("between-cells", ["after:*/.work/gd_noise0.pt:1"]),
    Point("mid-second-cell", ["iter:1350"]),
    Point("while-figure-tmp-exists", ["tmp:*/fig1_toy.png:1"], previous=None),
)
VISION_POINTS = _points(                        # 6 steps a cell
    Point("while-checkpoint-tmp-exists", [f"tmp:{CKPT}:2"], previous=2),   # resumes mid-epoch
    Point("while-model-file-tmp-exists", ["tmp:*/models/sgd_*.pt:1"], previous=None),
    Point("after-model-file-before-cell-finished", ["after:*/models/sgd_*.pt:1"]),
    Point("mid-second-cell", ["iter:9"]),                                  # after its first evaluation
    Point("while-figure-tmp-exists", ["tmp:*/vision_curves.png:1"], previous=None),
)


class Driver:
    """The fork server of tests/faults_helper.py: ``run(argv, trigger)`` -> exit status (-9: killed)."""

    def __init__(self, logs: Path):
        self.logs, self.n = logs, 0
        # auto decided by its estimate alone: its one-time timing may pick another forward mode (other
        # rounding) in the reference run than in the killed one, whose choices the resume replays
        env = {**os.environ, "PYTHONHASHSEED": "0", "TENSORSAM_AUTO_TIMING": "0"}
        self.proc = subprocess.Popen([sys.executable, str(HELPER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     env=env, text=True)
        assert json.loads(self.proc.stdout.readline()) == {"ready": True}

    def run(self, argv: list[str], trigger: str | None = None) -> tuple[int, Path]:
        self.n += 1
        log = self.logs / f"run{self.n}.log"
        self.proc.stdin.write(json.dumps({"argv": argv, "trigger": trigger, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())["status"], log

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    d = Driver(tmp_path_factory.mktemp("fault-logs"))
    yield d
    d.close()


def _reference(driver, tmp_path_factory, args):
    out = tmp_path_factory.mktemp(f"{args[0]}-reference")
    status, log = driver.run([*args, "--out", str(out)])
    assert status == 0, log.read_text()
    return out


@pytest.fixture(scope="module")
def completion_reference(driver, tmp_path_factory):
    return _reference(driver, tmp_path_factory, COMPLETION)


@pytest.fixture(scope="module")
def toy_reference(driver, tmp_path_factory):
    return _reference(driver, tmp_path_factory, TOY)


@pytest.fixture(scope="module")
def vision_reference(driver, tmp_path_factory):
    return _reference(driver, tmp_path_factory, VISION)


def _results(out: Path) -> dict:
    """results.json without what may differ between invocations: wall-clock times, provenance
    (start time, argv, ...) and the sweep's kept/ran split."""
    data = json.loads((out / "results.json").read_text())
    for key in ("provenance", "wall_seconds", "sweep"):
        data.pop(key, None)
    for run in data["runs"]:
        for key in ("wall_seconds", "seconds_per_step"):
            run.pop(key, None)
    return data


def _difference(a, b, where: str = "") -> str | None:
    """Where ``a`` and ``b`` first differ (tensors compared bit for bit), or None."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes())
        return None if same else f"{where or '<root>'}: tensors differ"
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where or '<root>'}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        return next((d for k in a if (d := _difference(a[k], b[k], f"{where}.{k}")) is not None), None)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and type(a) is type(b):
        if len(a) != len(b):
            return f"{where or '<root>'}: lengths {len(a)} != {len(b)}"
        return next((d for i, (x, y) in enumerate(zip(a, b))
                     if (d := _difference(x, y, f"{where}[{i}]")) is not None), None)
    return None if type(a) is type(b) and a == b else f"{where or '<root>'}: {a!r} != {b!r}"


def _temporaries(out: Path) -> list[Path]:
    return sorted(out.rglob(".*.tmp"))


def _check_left_behind(out: Path, point: Point) -> None:
    """After a kill while a temporary file existed: that file is there, and its target still holds
    what it held before (nothing, or the previous checkpoint)."""
    if point.previous is ...:
        return
    tmps = _temporaries(out)
    assert len(tmps) == 1, f"expected one temporary file after the kill, found {tmps}"
    target = tmps[0].parent / tmps[0].name[1:].rsplit(".", 2)[0]   # .<name>.XXXXXXXX.tmp
    if point.previous is None:
        assert not target.exists(), f"{target} was written although the kill came before os.replace"
    else:
        assert load_checkpoint(target)["iteration"] == point.previous, f"{target} is not the previous checkpoint"


def _kill_and_resume(driver, tmp_path, args, point: Point, reference: Path) -> None:
    out = tmp_path / "out"
    argv = [*args, "--out", str(out)]
    for k, trigger in enumerate(point.kills):
        status, log = driver.run(argv + (["--resume"] if k else []), trigger)
        assert status == KILLED, f"run {k + 1} was not killed at {trigger} (status {status}):\n{log.read_text()}"
        if k == 0:
            _check_left_behind(out, point)
    status, log = driver.run(argv + ["--resume"])
    assert status == 0, f"the resumed run failed (status {status}):\n{log.read_text()}"

    diff = _difference(_results(out), _results(reference))
    assert diff is None, f"results.json differs from the uninterrupted run's at {diff}"
    compared, present = OUTPUTS[args[0]]
    for pattern in compared:
        names = sorted(p.relative_to(reference) for p in reference.glob(pattern))
        assert names, f"the reference run wrote no {pattern}"
        assert sorted(p.relative_to(out) for p in out.glob(pattern)) == names, f"the files {pattern} differ"
        for name in names:
            diff = _difference(load_checkpoint(out / name), load_checkpoint(reference / name))
            assert diff is None, f"{name} differs from the uninterrupted run's at {diff}"
    for name in present:
        assert (out / name).is_file(), f"{name} was not written"
    assert not (out / ".work").exists(), "the resumed run left its .work folder"
    left = _temporaries(out)
    assert not left, (f"the resumed run left temporary files {[str(p.relative_to(out)) for p in left]}: a temporary "
                      "file orphaned by the kill (before os.replace) is never removed")


@pytest.mark.parametrize("point", COMPLETION_POINTS)
def test_completion_killed_at_any_point_resumes_bit_identically(driver, completion_reference, tmp_path, point):
    _kill_and_resume(driver, tmp_path, COMPLETION, point, completion_reference)


@pytest.mark.parametrize("point", TOY_POINTS)
def test_toy_killed_at_any_point_resumes_bit_identically(driver, toy_reference, tmp_path, point):
    _kill_and_resume(driver, tmp_path, TOY, point, toy_reference)


@pytest.mark.parametrize("point", VISION_POINTS)
def test_vision_killed_at_any_point_resumes_bit_identically(driver, vision_reference, tmp_path, point):
    _kill_and_resume(driver, tmp_path, VISION, point, vision_reference)
