"""How a result was made (versions, git commit, host, argv, times, device), seeding, and the
RNG states a checkpoint saves and restores."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

_IMPORT_TIME = time.time()


def seed_everything(seed: int) -> None:
    """Seed python's ``random``, numpy's global generator and torch (CPU and CUDA)."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _git(*args: str) -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_commit(short: bool = True) -> str:
    """This checkout's commit (abbreviated with ``short``), or ``"unknown"`` outside one."""
    return _git("rev-parse", *(["--short"] if short else []), "HEAD") or "unknown"


def _utc(stamp: float) -> str:
    return _dt.datetime.fromtimestamp(stamp, _dt.UTC).isoformat(timespec="seconds")


def provenance(started: float | None = None) -> dict:
    """How a result was made: versions, git commit (None outside a checkout), host, argv, time, device.

    ``started`` is a ``time.time()`` stamp; without it, the time this module was imported.
    """
    import tensorly

    from tensorsam import __version__

    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)}"
    else:
        device = f"cpu ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    commit = _git("rev-parse", "HEAD") or None
    dirty = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {
        "tensorsam": __version__,
        "torch": torch.__version__,
        "tensorly": tensorly.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "git_commit": commit,
        "git_dirty": None if dirty is None else bool(dirty),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "argv": list(sys.argv),
        "started_utc": _utc(_IMPORT_TIME if started is None else started),
        "written_utc": _utc(time.time()),
        "device": device,
    }


def rng_state() -> dict:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "mt": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["mt"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"])
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


