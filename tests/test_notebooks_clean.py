"""Committed notebooks: clean metadata, a Colab-only install cell first, and asserts that teach."""

from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from lenslib import notebooks

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = ROOT / "notebooks"
ALL = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SOLUTIONS = sorted((NOTEBOOK_DIR / "solutions").glob("*.ipynb"))
GLOSSARY_TERMS = (
    "gIoU", "cIoU", "Advantage", "k3 KL", "Clipping", "mRoPE", "Context query", "Connector",
    "Teacher forcing", "Group", "Rollout", "reference model",
)  # fmt: skip


def test_notebooks_exist_and_are_numbered():
    assert ALL
    for path in ALL:
        assert path.name[:2].isdigit() and path.name[2] == "_", path.name


@pytest.mark.parametrize("path", ALL + SOLUTIONS, ids=lambda p: p.name)
def test_notebook_is_clean_and_executed(path):
    nb = nbformat.read(path, as_version=4)
    assert notebooks.is_clean(nb), f"{path.name}: run `python -m lenslib.notebooks clean {path}`"
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code[1:] if c.source.strip()), (
        f"{path.name} has unexecuted cells: run `python -m lenslib.notebooks run {path}`"
    )
    assert not any(o.output_type == "error" for c in code for o in c.outputs)


@pytest.mark.parametrize("path", ALL + SOLUTIONS, ids=lambda p: p.name)
def test_first_cell_installs_on_colab_only_and_cells_assert(path):
    nb = nbformat.read(path, as_version=4)
    first = nb.cells[0]
    assert first.cell_type == "code" and "google.colab" in first.source
    assert "pip install" in first.source
    assert 'os.environ["SAM2_BUILD_CUDA"] = "0"' in first.source  # as the Makefile
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


@pytest.mark.parametrize("path", ALL, ids=lambda p: p.name)
def test_notebook_opens_like_a_course_unit(path):
    """Objectives, prerequisites, a time estimate and the glossary, in the opening cells."""
    nb = nbformat.read(path, as_version=4)
    opening = "\n".join(c.source for c in nb.cells[:4] if c.cell_type == "markdown")
    for heading in ("**You will be able to**", "**Prerequisites**", "**Time**"):
        assert heading in opening, f"{path.name}: no {heading} in the opening cells"
    assert "../docs/glossary.md" in opening, f"{path.name}: no link to the glossary"


@pytest.mark.parametrize("number", ["01", "02", "03", "04"])
def test_exercises_have_executed_solutions(number):
    (path,) = NOTEBOOK_DIR.glob(f"{number}_*.ipynb")
    text = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)
    assert "## Exercises" in text and f"solutions/{number}_solutions.ipynb" in text
    solution = NOTEBOOK_DIR / "solutions" / f"{number}_solutions.ipynb"
    cells = nbformat.read(solution, as_version=4).cells
    assert sum("assert " in c.source for c in cells if c.cell_type == "code") >= 2


def test_glossary_and_authors_differences_are_there():
    glossary = (ROOT / "docs" / "glossary.md").read_text()
    for term in GLOSSARY_TERMS:
        assert f"**{term}" in glossary or term in glossary, term
    differences = (ROOT / "docs" / "authors_differences.md").read_text()
    for option in ("std", "square_iou", "connector_output", "mrope", "loss_kind", "eps_low"):
        assert f"`{option}" in differences or option in differences, option


@pytest.mark.parametrize("path", ALL + SOLUTIONS, ids=lambda p: p.name)
def test_outputs_hold_no_progress_bars_or_deepspeed_notices(path):
    """A progress bar is stored as its first frame ("0%|"), which reads as stuck on GitHub."""
    nb = nbformat.read(path, as_version=4)
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            text = "".join(output.get("text", "")) + "".join(
                output.get("data", {}).get("text/plain", "")
            )
            assert "it/s]" not in text and "%|" not in text, (
                f"{path.name} cell {index}: {text[:80]}"
            )
            assert "[WARNING]" not in text, f"{path.name} cell {index}: {text[:80]}"
