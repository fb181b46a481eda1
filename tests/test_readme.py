"""The README as a new user meets it: every Python block is a tested example file, and the two
commands are the ones CI runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"<!-- example: (?P<path>[^ ]+) -->\n```python\n(?P<code>.*?)```", re.S)


def test_every_python_block_is_an_example_file() -> None:
    blocks = re.findall(r"```python\n", README)
    examples = list(BLOCK.finditer(README))
    assert len(examples) == len(blocks) >= 4
    for match in examples:
        text = (ROOT / match["path"]).read_text(encoding="utf-8")
        assert match["code"] == text, f"README block differs from {match['path']}"


@pytest.mark.parametrize("path", [m["path"] for m in BLOCK.finditer(README)])
def test_readme_example_runs_as_written(path: str, tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, str(ROOT / path)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_the_two_commands() -> None:
    assert 'pip install -e ".[all]" && aiam demo' in README
    assert 'pip install -e ".[all,dev]" && pytest' in README
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert '\npip install -e ".[all,dev]" && pytest\n' in ci
