"""The README's quick start is a file; running it keeps the README true."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_runs():
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart.py")], check=False,
                         capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "DAS: Q of the first conv's cores" in out.stdout and "SAM: done" in out.stdout
