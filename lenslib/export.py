"""Export scripts from notebooks: the notebook is the source, `scripts/` is generated.

A notebook opts in with notebook metadata `{"lenslib": {"script": "name.py", "launch": "..."}}`
and two cell tags:

- `parameters`: ONE cell of plain assignments, `name = literal  # help text`. In the notebook
  it just sets the values; in the script every assignment becomes a command-line flag
  (`group_size = 8` -> `--group-size 8`) whose default is the notebook's value. Write
  `# help text (choices: toy, full)` to restrict a string flag to a few values, and
  `lr: float | None = None  # help` for a flag whose default None means "the preset's value".
- `export`: cells copied, in order, into the script's body.

One parameter is special: `settings = {}  # help`. In the notebook it is a dict of settings
changed from the preset's (`{"lr": 1e-4}`); in the script every setting of the stage named by
the notebook metadata `"settings": "align" | "rl" | "none"` becomes a flag (`--lr 1e-4`), derived
from the settings' dataclasses by `lenslib.presets.add_setting_flags`, and `settings` holds the
flags that were given. So a hyperparameter is declared once, in its dataclass.

Usage:
    python -m lenslib.export            # (re)write every script from its notebook
    python -m lenslib.export --check    # exit 1 if a committed script is out of date
`tests/test_export.py` runs the check, so a script that drifts from its notebook fails CI.
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parent.parent
_CHOICES_RE = re.compile(r"\(choices:\s*([^)]*)\)")
SETTINGS = "settings"  # the parameter that stands for every setting of a stage


class ExportError(ValueError):
    """A notebook's tagged cells cannot be turned into a script (names the notebook and cell)."""


def _parameter_lines(source: str, where: str) -> list[tuple[str, str]]:
    """(name, argparse line) for each `name = literal  # help` assignment of a parameters cell."""
    lines = []
    for lineno, line in enumerate(source.splitlines(), start=1):
        code, _, comment = line.partition("#")
        if not code.strip():
            continue
        try:
            node = ast.parse(code.strip()).body[0]
        except SyntaxError as err:
            raise ExportError(
                f"{where}, line {lineno}: not a one-line assignment: {line!r}"
            ) from err
        annotation = None
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
            name, annotation = node.target.id, ast.unparse(node.annotation)
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            raise ExportError(f"{where}, line {lineno}: expected `name = literal`, got {line!r}")
        try:
            value = ast.literal_eval(node.value)
        except ValueError as err:
            raise ExportError(f"{where}, line {lineno}: {name} must be a literal") from err
        if name == SETTINGS:
            if value != {}:
                raise ExportError(f"{where}, line {lineno}: `{SETTINGS}` must be an empty dict")
            lines.append((name, ""))
            continue
        try:
            lines.append((name, _add_argument(name, value, comment.strip(), annotation)))
        except ExportError as err:
            raise ExportError(f"{where}, line {lineno}: {err}") from err
    return lines


def _add_argument(name: str, value: object, help_text: str, annotation: str | None = None) -> str:
    """One `parser.add_argument(...)` line for a parameter with the notebook's default."""
    flag = "--" + name.replace("_", "-")
    choices = _CHOICES_RE.search(help_text)
    extra = ""
    if choices:
        extra = f", choices={[c.strip() for c in choices.group(1).split(',')]!r}"
    if isinstance(value, bool):
        kind = "action=argparse.BooleanOptionalAction"
    elif isinstance(value, (list, tuple)):
        elem = type(value[0]).__name__ if value else "str"
        kind = f'nargs="+", type={elem}'
    elif value is None:
        base = (annotation or "str").replace("| None", "").replace("None |", "").strip()
        if base not in ("int", "float", "str"):
            raise ExportError(f"parameter {name}: a None default needs `: int|float|str | None`")
        kind = f"type={base}"
    else:
        kind = f"type={type(value).__name__}"
    return f"parser.add_argument({flag!r}, {kind}, default={value!r}{extra}, help={help_text!r})"


def export_source(notebook_path: Path) -> tuple[str, str]:
    """(script file name, script text) generated from one notebook's tagged cells."""
    nb = nbformat.read(notebook_path, as_version=4)
    meta = nb.metadata.get("lenslib", {})
    if "script" not in meta:
        raise ExportError(f"{notebook_path.name}: notebook metadata has no lenslib.script")
    rel = notebook_path.resolve().relative_to(ROOT)
    doc = meta.get("description", "").strip()
    launch = meta.get("launch", f"python scripts/{meta['script']}")
    out = [
        '"""' + doc,
        "",
        f"Exported from {rel.as_posix()} by `python -m lenslib.export`: edit the notebook,",
        "not this file (tests/test_export.py fails when the two disagree).",
        "",
        f"Launch: {launch}",
        '"""',
        "",
        "import argparse",
        "",
    ]
    params = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    if len(params) > 1:
        raise ExportError(f"{notebook_path.name}: more than one cell is tagged 'parameters'")
    out.append(
        "parser = argparse.ArgumentParser(description=__doc__, "
        "formatter_class=argparse.RawDescriptionHelpFormatter)"
    )
    parameters = (
        _parameter_lines(params[0].source, f"{notebook_path.name}, parameters cell")
        if params
        else []
    )
    out += [line for _, line in parameters if line]
    names = [name for name, _ in parameters]
    if SETTINGS in names:
        stage = meta.get("settings", "none")
        if stage not in ("align", "rl", "none"):
            raise ExportError(
                f"{notebook_path.name}: metadata lenslib.settings must be align, rl or none"
            )
        out[out.index("import argparse") + 1 : out.index("import argparse") + 1] = [
            "",
            "from lenslib.presets import add_setting_flags",
            "from lenslib.settings import changed",
        ]
        out.append(
            f"setting_names = add_setting_flags(parser, {None if stage == 'none' else stage!r})"
        )
    out.append("args = parser.parse_args()")
    out += [
        f"{name} = changed(args, setting_names)" if name == SETTINGS else f"{name} = args.{name}"
        for name in names
    ]
    for index, cell in enumerate(nb.cells):
        if cell.cell_type == "code" and "export" in cell.metadata.get("tags", []):
            if cell.source.lstrip().startswith(("%", "!")):
                raise ExportError(f"{notebook_path.name}, cell {index}: magics cannot be exported")
            out += ["", f"# --- notebook cell {index} ---", cell.source.rstrip()]
    return meta["script"], "\n".join(out) + "\n"


def exported_notebooks(root: Path = ROOT) -> list[Path]:
    """Notebooks under notebooks/ that declare a script."""
    paths = sorted((root / "notebooks").glob("*.ipynb"))
    return [
        p for p in paths if "script" in nbformat.read(p, as_version=4).metadata.get("lenslib", {})
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export scripts/ from the notebooks.")
    parser.add_argument("--check", action="store_true", help="only report out-of-date scripts")
    args = parser.parse_args(argv)
    stale = []
    for notebook in exported_notebooks():
        name, text = export_source(notebook)
        target = ROOT / "scripts" / name
        current = target.read_text() if target.exists() else None
        if current != text:
            stale.append(f"scripts/{name} (from notebooks/{notebook.name})")
            if not args.check:
                target.write_text(text)
    verb = "out of date" if args.check else "rewritten"
    for item in stale:
        print(f"{verb}: {item}")
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
