"""Results files: ``{"task", "config", "runs", "provenance", "wall_seconds", ...}``, written atomically."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

from tensorsam.run.config import config_to_dict
from tensorsam.run.io import atomic_write_json, to_jsonable
from tensorsam.run.meta import provenance

_RESERVED = ("task", "config", "runs", "provenance", "wall_seconds")


def write_results(
    path, *, task: str, config, runs: list[dict], extra: dict | None = None, started: float
) -> dict:
    """Atomically write a results JSON and return the dict written.

    Layout: ``{"task", "config", "runs", "provenance", "wall_seconds", **extra}``.
    ``started`` is the ``time.time()`` stamp taken when the task began.
    """
    if not isinstance(runs, list) or not all(isinstance(r, Mapping) for r in runs):
        raise ValueError("runs must be a list of dicts (one record per run)")
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(_RESERVED))
    if clash:
        raise ValueError(f"extra keys {clash} clash with the results file's own keys {list(_RESERVED)}")
    wall = time.time() - float(started)
    out = {
        "task": str(task),
        "config": config_to_dict(config),
        "runs": to_jsonable(runs),
        "provenance": provenance(started),
        "wall_seconds": wall if math.isfinite(wall) else None,
        **to_jsonable(extra),
    }
    atomic_write_json(path, out)
    return out
