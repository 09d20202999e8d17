"""The README's Quick start runs exactly as printed: every ```python block of that section is
run on its own, in a fresh interpreter (so each must be self-contained), in a scratch directory.

A block that must stay illustrative says so on its first line, ``# not run: <why>``, and is
skipped (reported as such)."""

import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = "# not run:"


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section (up to the next ``## `` heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


QUICK_START = python_blocks(section(README.read_text(encoding="utf-8"), "Quick start"))


def test_the_quick_start_has_its_snippets():
    assert len(QUICK_START) >= 3
    assert python_blocks("text\n```python\nx = 1\n```\nmore\n```python\ny = 2\n```\n") == ["x = 1\n", "y = 2\n"]


@pytest.mark.parametrize("code", QUICK_START, ids=[f"block{i}" for i in range(len(QUICK_START))])
def test_readme_quick_start_snippet_runs_as_printed(code, tmp_path):
    if code.lstrip().startswith(NOT_RUN):
        pytest.skip(code.lstrip().splitlines()[0])
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         timeout=300, check=False)
    assert out.returncode == 0, f"README snippet failed:\n{code}\n{out.stderr}"
