"""Fault-injection driver for tests/test_faults.py: runs ``tensorsam <task> ...`` and SIGKILLs it at
a chosen point.

Run as a script it is a fork server: it imports tensorsam's tasks once (no torch op runs in it, so
forking is safe), then reads one JSON request a line from stdin, ``{"argv": [...], "trigger": spec
or null, "log": path}``, runs ``tensorsam.cli.main(argv)`` in a forked child with the trigger
installed and its output in ``log``, and answers ``{"status": exit code, or -signal, "cpu": its
CPU seconds}``.  A fresh
child costs milliseconds instead of a ~3 s import.

Triggers (the child kills itself with SIGKILL; counts are per process, 1-based):

- ``iter:N``: after the body of the N-th :class:`~tensorsam.run.loop.Loop` iteration, before the
  loop's checkpoint check; ``iter:0``: as the first loop starts, before any iteration.
- ``before:GLOB:N`` / ``tmp:GLOB:N`` / ``after:GLOB:N``: in the N-th ``atomic_write`` whose path
  matches GLOB (fnmatch on the full path): before the temporary file is made / once it is written
  and fsynced but before ``os.replace`` (the temporary file exists) / just after ``os.replace``.
"""

from __future__ import annotations

import fnmatch
import json
import os
import signal
import sys
import time


def _die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec: str) -> None:
    """Arm the trigger ``spec`` (see the module docstring) in this process."""
    from tensorsam.run import io as run_io
    from tensorsam.run.loop import Loop

    kind, _, rest = spec.partition(":")
    if kind == "iter":
        n, seen = int(rest), [0]
        inner = Loop.__iter__

        def __iter__(self):
            if n == 0:
                _die()
            it = inner(self)
            try:
                for i in it:
                    yield i
                    seen[0] += 1
                    if seen[0] == n:
                        _die()
            finally:
                it.close()

        Loop.__iter__ = __iter__
        return
    if kind not in ("before", "tmp", "after"):
        raise ValueError(f"unknown trigger {spec!r}")
    pattern, _, n = rest.rpartition(":")
    n, seen = int(n), [0]
    inner = run_io.atomic_write

    def atomic_write(path, write, check=None):
        hit = False
        if fnmatch.fnmatch(os.fspath(path), pattern):
            seen[0] += 1
            hit = seen[0] == n
        if hit and kind == "before":
            _die()

        def checked(tmp):
            if check is not None:
                check(tmp)
            if hit and kind == "tmp":
                _die()

        inner(path, write, checked)
        if hit and kind == "after":
            _die()

    run_io.atomic_write = atomic_write  # every atomic writer of the package looks it up here


def _child(request: dict) -> None:
    fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    rc = 1
    try:
        import random

        import numpy as np

        random.seed()                  # unseeded streams differ between runs, as in fresh processes
        np.random.seed()
        if request.get("trigger"):
            install(request["trigger"])
        from tensorsam.cli import main

        rc = main(request["argv"])
    except SystemExit as exit_:
        rc = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - reported through the log and the status
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def serve(timeout: float = 120.0) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()          # the first drawing loads the fonts: paid once, here
    ax.plot([0, 1], [1, 2], label="a")
    ax.set(title="t", xlabel="x", ylabel="y", yscale="log")
    ax.legend()
    fig.savefig(io.BytesIO(), format="png")
    plt.close(fig)

    import importlib

    for name in ("sklearn.datasets", "torch._dynamo", "yaml"):   # what the tasks import lazily
        try:
            importlib.import_module(name)
        except ImportError:
            pass

    from tensorsam.tasks.registry import TASKS

    for task in ("completion", "toy", "vision"):
        for part in ("config", "run", "figures"):
            TASKS[task].get(part)
        __import__(TASKS[task].command)

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(request)
        deadline = time.monotonic() + request.get("timeout", timeout)
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                status = None
                break
            time.sleep(0.005)
        if status is None:
            answer = {"status": "timeout"}
        else:
            answer = {"status": os.waitstatus_to_exitcode(status), "cpu": usage.ru_utime + usage.ru_stime}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    serve()
