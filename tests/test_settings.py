"""Settings declared once: dataclass fields -> command-line flags, and presets routing changes."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Literal

import pytest

from lenslib.align import AlignConfig
from lenslib.model import LensConfig
from lenslib.presets import Preset, add_setting_flags, preset_from_flags, setting_names
from lenslib.rl import GRPOConfig
from lenslib.settings import add_flags, changed, check_choices, flag_fields, setting


@dataclass
class Example:
    size: int = setting(3, "how big")
    mode: Literal["a", "b"] = setting("a", "which mode")
    rate: float | None = setting(None, "a rate")
    weights: tuple[float, ...] = setting((1.0, 2.0), "weights")
    on: bool = setting(True, "switch")
    blob: dict | None = None  # not a flag: no scalar type


def test_every_scalar_field_becomes_a_flag_with_its_type_choices_and_help():
    parser = argparse.ArgumentParser()
    names = add_flags(parser, Example, "example", {"size": "toy: 1"})
    assert names == ["size", "mode", "rate", "weights", "on"]
    args = parser.parse_args(["--size", "5", "--mode", "b", "--weights", "1", "0", "--no-on"])
    assert changed(args, names) == {"size": 5, "mode": "b", "weights": (1.0, 0.0), "on": False}
    assert changed(parser.parse_args([]), names) == {}  # flags default to None: "keep"
    with pytest.raises(SystemExit):
        parser.parse_args(["--mode", "c"])
    assert "how big [toy: 1]" in parser.format_help()


def test_check_choices_names_the_field_with_a_bad_value():
    check_choices(Example())
    with pytest.raises(ValueError, match=r"Example.mode = 'z'"):
        check_choices(Example(mode="z"))


def test_every_setting_of_every_part_has_help_text():
    for cls in (Preset, LensConfig, AlignConfig, GRPOConfig):
        for f, *_ in flag_fields(cls):
            assert f.name == "name" or f.metadata.get("help"), f"{cls.__name__}.{f.name}"


def test_a_stage_script_has_a_flag_for_every_setting_it_can_change():
    for stage, cls in (("align", AlignConfig), ("rl", GRPOConfig)):
        parser = argparse.ArgumentParser()
        parser.add_argument("--preset", default="toy")
        names = set(add_setting_flags(parser, stage))
        assert {f.name for f in fields(cls)} <= names
        assert names <= setting_names()
        args = parser.parse_args(["--lr", "0.5", "--num-queries", "3", "--data-root", "d"])
        preset = preset_from_flags(args, sorted(names), stage)
        assert getattr(preset, stage).lr == 0.5 and preset.lens.num_queries == 3
        other = "rl" if stage == "align" else "align"
        assert getattr(preset, other).lr != 0.5  # a stage's flags change only that stage
        assert preset.data_root == "d"
