"""scripts/ are generated from the notebooks' tagged cells and must stay in sync with them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from lenslib import export

ROOT = Path(__file__).resolve().parent.parent

NOTEBOOKS = export.exported_notebooks()


def test_at_least_one_notebook_exports_a_script():
    assert NOTEBOOKS, "no notebook declares metadata lenslib.script"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_script_is_in_sync_with_its_notebook(notebook):
    name, text = export.export_source(notebook)
    script = export.ROOT / "scripts" / name
    assert script.exists(), f"scripts/{name} missing: run `python -m lenslib.export`"
    assert script.read_text() == text, (
        f"scripts/{name} is out of sync with notebooks/{notebook.name}: run `python -m lenslib.export`"
    )


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_script_passes_help(notebook):
    name, _ = export.export_source(notebook)
    result = subprocess.run(
        [sys.executable, str(export.ROOT / "scripts" / name), "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "usage:" in result.stdout


def _notebook(tmp_path, params_source, export_source="print(group_size)"):
    root = tmp_path
    (root / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook()
    nb.metadata["lenslib"] = {"script": "demo.py", "description": "A demo."}
    nb.cells = [
        nbformat.v4.new_code_cell(params_source, metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell(export_source, metadata={"tags": ["export"]}),
        nbformat.v4.new_code_cell("print('notebook only')"),
    ]
    path = root / "notebooks" / "x.ipynb"
    nbformat.write(nb, path)
    return path


def test_parameters_become_flags_with_notebook_defaults(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ROOT", tmp_path)
    params = (
        "group_size = 8  # rollouts per prompt\n"
        "preset = 'toy'  # model size (choices: toy, full)\n"
        "use_box = True  # also prompt SAM with the box\n"
        "lrs = [0.1, 0.2]  # learning rates\n"
        "lr: float | None = None  # None: the preset's value\n"
    )
    path = _notebook(tmp_path, params, "print(group_size, preset, use_box, lrs, lr)")
    name, text = export.export_source(path)
    assert name == "demo.py" and "notebook only" not in text
    script = tmp_path / name
    script.write_text(text)
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, str(script), *a], capture_output=True, text=True, timeout=60
    )
    assert run().stdout.strip() == "8 toy True [0.1, 0.2] None"
    out = run(
        "--group-size", "4", "--preset", "full", "--no-use-box", "--lrs", "1", "2", "--lr", "3"
    )
    assert out.stdout.strip() == "4 full False [1.0, 2.0] 3.0"
    assert run("--preset", "huge").returncode != 0


@pytest.mark.parametrize(
    "bad", ["x = compute()  # not a literal", "x += 1", "import os", "x: list | None = None"]
)
def test_bad_parameters_cell_names_the_notebook(tmp_path, monkeypatch, bad):
    monkeypatch.setattr(export, "ROOT", tmp_path)
    path = _notebook(tmp_path, bad)
    with pytest.raises(export.ExportError, match="x.ipynb"):
        export.export_source(path)


def test_the_settings_parameter_becomes_every_setting_of_the_stage(tmp_path, monkeypatch):
    """`settings = {}` in the notebook; in the script, a flag per stage-2 setting, derived from
    the settings' dataclasses (help text and choices included), and `settings` holds the
    flags that were given."""
    monkeypatch.setattr(export, "ROOT", tmp_path)
    path = _notebook(tmp_path, "settings = {}  # changes to the preset", "print(settings)")
    nb = nbformat.read(path, as_version=4)
    nb.metadata["lenslib"]["settings"] = "rl"
    nbformat.write(nb, path)
    name, text = export.export_source(path)
    script = tmp_path / name
    script.write_text(text + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, str(script), *a], capture_output=True, text=True, timeout=120, env=env
    )
    assert run().stdout.strip() == "{}"
    given = run("--lr", "1e-4", "--reward-weights", "0", "1", "0", "--no-square-iou")
    assert (
        given.stdout.strip()
        == "{'lr': 0.0001, 'reward_weights': (0.0, 1.0, 0.0), 'square_iou': False}"
    )
    helped = run("--help").stdout
    assert "KL weight of eq. 10" in helped and "toy: 3e-05" in helped  # help and preset values
    assert run("--aggregation", "mean").returncode != 0  # a Literal's choices are enforced


def test_a_settings_parameter_must_start_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(export, "ROOT", tmp_path)
    path = _notebook(tmp_path, "settings = {'lr': 1.0}  # changes")
    with pytest.raises(export.ExportError, match="empty dict"):
        export.export_source(path)
