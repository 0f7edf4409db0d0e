"""Reading an answer of the paper's format: `<think>...</think><answer>[{"bbox_2d": [...], "label": ...}]</answer>`.

`parse_answer` is tolerant (real models emit markdown fences, a bare dict instead of a list,
or a plain `[x1, y1, x2, y2]`), never raises on any string, and returns `box=None` when there
is no usable box. `lenslib.prompts.format_answer` writes the same format.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from lenslib.prompts import FORMAT_PATTERN

Box = tuple[float, float, float, float]  # (x1, y1, x2, y2) in pixels

_FORMAT_RE = re.compile(FORMAT_PATTERN, re.DOTALL)
_THINK_RE = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = r"-?\d{1,12}(?:\.\d{1,12})?"
# "bbox_2d": [x1, y1, x2, y2] anywhere, even inside broken JSON
_BBOX_KEY_RE = re.compile(r'"?bbox_2d"?\s*:\s*\[\s*(' + ",\\s*".join([_NUMBER] * 4) + r")\s*\]")
# a bare list of four numbers: the last-resort fallback
_LIST4_RE = re.compile(r"\[\s*(" + ",\\s*".join([_NUMBER] * 4) + r")\s*\]")
_LABEL_RE = re.compile(r'"label"\s*:\s*"((?:[^"\\]|\\.)*)"')


@dataclass(frozen=True)
class ParsedAnswer:
    """What `parse_answer` found in one completion."""

    format_ok: bool  # the paper's <think>..</think><answer>..</answer> structure is present
    think: str | None  # the chain of thought, if a <think> block exists
    box: Box | None  # (x1, y1, x2, y2), ordered and (if an image size was given) clamped
    label: str | None  # the "label" field of the answer JSON, if any


def _finite_box(values: Sequence[object]) -> Box | None:
    """Four finite floats, or None (rejects NaN, inf, bools, strings, wrong lengths)."""
    if len(values) != 4:
        return None
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            return None
        try:
            f = float(v)
        except (ValueError, OverflowError):
            return None
        if not math.isfinite(f):
            return None
        out.append(f)
    return (out[0], out[1], out[2], out[3])


def _box_from_json(text: str) -> tuple[Box | None, str | None]:
    """Box and label from a JSON answer: a list of dicts, a dict, or a plain list of 4 numbers."""
    cleaned = re.sub(r"```(?:json)?", "", text).strip()
    try:
        data = json.loads(cleaned)
    except (ValueError, RecursionError):
        return None, None
    if isinstance(data, dict):
        data = [data]
    if isinstance(data, list) and len(data) == 4 and not any(isinstance(v, dict) for v in data):
        return _finite_box(data), None
    if isinstance(data, list):
        for item in data:
            if isinstance(item, dict) and isinstance(item.get("bbox_2d"), list):
                box = _finite_box(item["bbox_2d"])
                label = item.get("label")
                if box is not None:
                    return box, label if isinstance(label, str) else None
    return None, None


def _box_from_regex(text: str) -> Box | None:
    """Box from `"bbox_2d": [..]` or, failing that, the first bare `[a, b, c, d]`."""
    for pattern in (_BBOX_KEY_RE, _LIST4_RE):
        match = pattern.search(text)
        if match:
            return _finite_box(match.group(1).split(","))
    return None


def order_and_clamp(box: Box, image_size: tuple[int, int] | None = None) -> Box:
    """Swap inverted corners so x1 <= x2, y1 <= y2; clamp to [0, W] x [0, H] if a size is given.

    image_size is (width, height) of the image the box refers to (the MLLM's input image).
    """
    x1, x2 = sorted((box[0], box[2]))
    y1, y2 = sorted((box[1], box[3]))
    if image_size is not None:
        width, height = image_size
        x1, x2 = min(max(x1, 0.0), width), min(max(x2, 0.0), width)
        y1, y2 = min(max(y1, 0.0), height), min(max(y2, 0.0), height)
    return (x1, y1, x2, y2)


def parse_answer(text: str, image_size: tuple[int, int] | None = None) -> ParsedAnswer:
    """Parse one completion of the paper's answer format. Never raises on a string input.

    Looks for the box in the <answer> block first (JSON, then regex fallbacks), then anywhere in
    the text, so a model that forgot the tags still gets its box read (it will score 0 on
    R_format instead).
    """
    if not isinstance(text, str):
        return ParsedAnswer(False, None, None, None)
    think_match = _THINK_RE.search(text)
    answer_match = _ANSWER_RE.search(text)
    answer = answer_match.group(1) if answer_match else text
    box, label = _box_from_json(answer)
    if box is None:
        box = _box_from_regex(answer) or (_box_from_regex(text) if answer_match else None)
    if label is None:
        label_match = _LABEL_RE.search(answer)
        label = label_match.group(1) if label_match else None
    if box is not None:
        box = order_and_clamp(box, image_size)
    return ParsedAnswer(
        format_ok=_FORMAT_RE.search(text) is not None,
        think=think_match.group(1).strip() if think_match else None,
        box=box,
        label=label,
    )
