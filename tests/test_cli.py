import subprocess
import sys

from tensorsam import __version__
from tensorsam.cli import main


def test_version(capsys):
    try:
        main(["--version"])
    except SystemExit as e:
        assert e.code == 0
    assert __version__ in capsys.readouterr().out


def test_help_runs_as_console_script():
    out = subprocess.run([sys.executable, "-m", "tensorsam.cli", "--help"], check=False, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "compress-demo" in out.stdout


def test_python_dash_m_tensorsam_runs():
    out = subprocess.run([sys.executable, "-m", "tensorsam", "--help"], check=False, capture_output=True,
                         text=True)
    assert out.returncode == 0 and "completion" in out.stdout
