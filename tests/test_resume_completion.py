"""Kill `tensorsam completion` with SIGKILL at a random iteration after a checkpoint, resume it,
and get exactly the results of an uninterrupted run."""

import json
import os
import random
import signal
import subprocess
import sys
import time

from tensorsam.cli import main

ARGS = ["--methods", "das", "--seeds", "87", "--iterations", "1500", "--set", "checkpoint_every=50",
        "--set", "log_every=100", "--set", "compile=false", "--no-progress"]


def _cli(out, *extra):
    return [sys.executable, "-m", "tensorsam.cli", "completion", *ARGS, "--out", str(out), *extra]


def _runs(out):
    runs = json.loads((out / "results.json").read_text())["runs"]
    for r in runs:
        r.pop("wall_seconds")
    return runs


def test_sigkill_then_resume_gives_identical_results(tmp_path):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    reference = tmp_path / "reference"
    assert main(["completion", *ARGS, "--out", str(reference)]) == 0  # uninterrupted, in this process

    out = tmp_path / "killed"
    proc = subprocess.Popen(_cli(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    work = out / ".work"
    deadline = time.time() + 120
    while time.time() < deadline and not (work.exists() and any(work.glob("*.ckpt"))):
        time.sleep(0.02)
    time.sleep(random.Random().uniform(0.0, 0.2))  # a random iteration after the first checkpoint
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "results.json").exists(), "the run finished before it could be killed"

    subprocess.run(_cli(out, "--resume"), check=True, env=env, capture_output=True)
    assert _runs(out) == _runs(reference)
    assert not work.exists()
