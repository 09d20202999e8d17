"""CLI subcommands, one module each (see tensorsam.cli)."""

import time
from pathlib import Path


def print_outputs(figures, out: Path, started: float) -> int:
    """Name the figures and results file a command wrote; returns the exit status 0."""
    for path in figures:
        print(f"wrote {path}")
    print(f"wrote {out / 'results.json'} ({time.time() - started:.1f} s)")
    return 0
