"""Keep the committed notebooks runnable, readable on GitHub, and free of volatile metadata.

    python -m lenslib.notebooks run notebooks/01_grpo_advantage_math.ipynb   # execute + clean
    python -m lenslib.notebooks clean notebooks/*.ipynb                        # clean only

Outputs (plots included) are committed so readers see them on GitHub; what changes from run to
run without meaning anything (timestamps, kernel versions, widget state) is removed, so that a
re-run shows up in `git diff` only where a result changed. `tests/test_notebooks_clean.py` checks.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import nbformat

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}
KEPT_CELL_METADATA = ("tags",)
KEPT_NOTEBOOK_METADATA = ("lenslib", "colab")


def clean(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """Strip volatile metadata in place; number executed cells 1, 2, 3, ... in order."""
    nb.metadata = nbformat.NotebookNode(
        {k: v for k, v in nb.metadata.items() if k in KEPT_NOTEBOOK_METADATA}
        | {"kernelspec": KERNELSPEC, "language_info": {"name": "python"}}
    )
    count = 0
    for cell in nb.cells:
        cell.metadata = nbformat.NotebookNode(
            {k: v for k, v in cell.metadata.items() if k in KEPT_CELL_METADATA}
        )
        cell.pop("id", None)
        if cell.cell_type == "code":
            count += 1
            cell.execution_count = count
            for output in cell.outputs:
                if "execution_count" in output:
                    output.execution_count = count
    nb.nbformat, nb.nbformat_minor = 4, 4
    return nb


def is_clean(nb: nbformat.NotebookNode) -> bool:
    """True if `clean` would change nothing."""
    before = nbformat.writes(nb)
    return nbformat.writes(clean(nbformat.reads(before, as_version=4))) == before


def run(path: Path, timeout: int = 900) -> None:
    """Execute a notebook top to bottom in its own folder, then clean and save it."""
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={
        "metadata": {"path": str(path.parent)}
    }).execute()  # fmt: skip
    nbformat.write(clean(nb), path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "clean"])
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per cell (run)")
    args = parser.parse_args(argv)
    for path in args.paths:
        if args.command == "run":
            run(path, args.timeout)
        else:
            nbformat.write(clean(nbformat.read(path, as_version=4)), path)
        print(f"{args.command}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
