"""Committed notebooks: clean metadata, a Colab-only install cell first, and asserts that teach."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from lenslib import notebooks

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
ALL = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def test_notebooks_exist_and_are_numbered():
    assert ALL
    for path in ALL:
        assert path.name[:2].isdigit() and path.name[2] == "_", path.name


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_notebook_is_clean_and_executed(path):
    nb = nbformat.read(path, as_version=4)
    assert notebooks.is_clean(nb), f"{path.name}: run `python -m lenslib.notebooks clean {path}`"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code[1:] if c.source.strip()), (
        f"{path.name} has unexecuted cells: run `python -m lenslib.notebooks run {path}`"
    )
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_first_cell_installs_on_colab_only_and_cells_assert(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code" and "google.colab" in first.source
    assert "pip install" in first.source
    assert sum("assert " in c.source for c in nb.cells if c.cell_type == "code") >= 3


def test_clean_removes_volatile_metadata():
    nb = nbformat.v4.new_notebook()
    nb.metadata["vscode"] = {"interpreter": {"hash": "abc"}}
    cell = nbformat.v4.new_code_cell(
        "1", metadata={"execution": {"iopub.status.busy": "2026-01-01T00:00:00Z"}, "tags": ["x"]}
    )
    cell.execution_count = 7
    cell.outputs = [
        nbformat.v4.new_output("execute_result", {"text/plain": "1"}, execution_count=7)
    ]
    nb.cells = [cell]
    assert not notebooks.is_clean(nb)
    notebooks.clean(nb)
    assert notebooks.is_clean(nb)
    assert "vscode" not in nb.metadata and nb.cells[0].metadata == {"tags": ["x"]}
    assert nb.cells[0].execution_count == 1
