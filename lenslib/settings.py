"""Settings declared once: a dataclass field with its help text becomes a command-line flag.

Every hyperparameter of lenslib is a field of a dataclass (`LensConfig`, `AlignConfig`,
`GRPOConfig`, `Preset`), declared with `setting(default, "help text")`. The exported scripts
and the notebooks' parameter cells do not repeat them: `add_flags` turns the fields into
argparse flags (as TRL derives its command line from `GRPOConfig`), with the type, the choices
of a `Literal` and the help text taken from the field. So adding a hyperparameter is one
field plus its use.

Flags default to None, meaning "the preset's value"; `changed` returns only the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal

SCALARS = (int, float, str, bool)


def setting(default: Any = dataclasses.MISSING, help: str = "", **kwargs: Any) -> Any:
    """A dataclass field with help text (shown by `--help` and in notebooks)."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("mutable defaults: use a tuple")
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def _scalar_type(annotation: Any) -> tuple[type | None, tuple | None, bool]:
    """(base type, choices or None, is a tuple) of a field's annotation; None if not a flag."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _scalar_type(args[0]) if len(args) == 1 else (None, None, False)
    if origin is Literal:
        choices = typing.get_args(annotation)
        return type(choices[0]), choices, False
    if origin is tuple:
        inner = _scalar_type(typing.get_args(annotation)[0])
        return inner[0], inner[1], True
    if annotation in SCALARS:
        return annotation, None, False
    return None, None, False


def flag_fields(cls: type) -> list[tuple[dataclasses.Field, type, tuple | None, bool]]:
    """The fields of dataclass `cls` that can be flags: scalars, Literals, tuples of scalars."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        base, choices, is_tuple = _scalar_type(hints[f.name])
        if base is not None and f.init:
            out.append((f, base, choices, is_tuple))
    return out


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    title: str,
    defaults: dict[str, str] | None = None,
    skip: tuple[str, ...] = (),
) -> list[str]:
    """Add a `--name` flag (default None) for every flag field of `cls` that is not in `skip`
    and that the parser does not have yet; `defaults` maps a name to text describing its
    preset values. Returns the names added."""
    group = parser.add_argument_group(title)
    known = {a.dest for a in parser._actions} | set(skip)
    added = []
    for f, base, choices, is_tuple in flag_fields(cls):
        if f.name in known:
            continue
        help_text = f.metadata.get("help", "")
        if defaults and f.name in defaults:
            help_text = f"{help_text} [{defaults[f.name]}]" if help_text else defaults[f.name]
        kwargs: dict[str, Any] = {"default": None, "help": help_text}
        if base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = base
            if choices:
                kwargs["choices"] = list(choices)
            if is_tuple:
                kwargs["nargs"] = "+"
        group.add_argument("--" + f.name.replace("_", "-"), **kwargs)
        added.append(f.name)
    return added


def changed(args: argparse.Namespace, names: list[str]) -> dict[str, Any]:
    """{name: value} of the flags among `names` that were given (tuples for nargs flags)."""
    values = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}


def check_choices(obj: Any) -> None:
    """Raise ValueError naming the field if a `Literal` field of dataclass `obj` holds a value
    outside its choices (dataclasses do not check types)."""
    for f, _, choices, is_tuple in flag_fields(type(obj)):
        value = getattr(obj, f.name)
        if choices and not is_tuple and value is not None and value not in choices:
            raise ValueError(
                f"{type(obj).__name__}.{f.name} = {value!r}; choose one of {list(choices)}"
            )
