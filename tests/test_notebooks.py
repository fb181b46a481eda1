"""Execute every demo notebook top to bottom, offline, and fail on any error.

Each ``notebooks/*.ipynb`` is picked up automatically (a new notebook needs no change here). The
kernel is ipykernel's built-in ``python3`` spec, which jupyter-client launches with
``sys.executable``: the notebooks run in this test's own interpreter and virtual environment.
The working directory is ``notebooks/``, as when a reader opens them in Jupyter.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))


def _warnings_in_outputs(nb: Any) -> list[str]:
    """stderr text of executed cells that reports a Python warning."""
    found = []
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                text = output.get("text", "")
                if "Warning" in text:
                    found.append(f"cell {index}: {text.strip()[:300]}")
    return found


def test_there_are_notebooks() -> None:
    assert NOTEBOOKS, f"no notebooks found in {NOTEBOOKS_DIR}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_clean(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=180,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS_DIR)}},
    )
    client.execute()  # raises CellExecutionError naming the failing cell
    warned = _warnings_in_outputs(nb)
    assert not warned, "the notebook printed warnings:\n" + "\n".join(warned)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_is_stored_clean(path: Path) -> None:
    """Notebooks are committed without outputs, so diffs stay readable and small."""
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code":
            assert not cell.get("outputs"), f"cell {index} of {path.name} has stored outputs"
            count = cell.get("execution_count")
            assert count is None, f"cell {index} of {path.name} has an execution count"
