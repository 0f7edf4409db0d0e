"""Unit and property tests of lenslib.rewards (paper eq. 11)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lenslib import answers, rewards
from lenslib.prompts import format_answer

GOOD = format_answer("The blue triangle is at the top left.", (10, 20, 50, 60), "blue triangle")


def test_parses_the_paper_format():
    parsed = answers.parse_answer(GOOD)
    assert parsed.format_ok
    assert parsed.box == (10, 20, 50, 60)
    assert parsed.label == "blue triangle"
    assert parsed.think == "The blue triangle is at the top left."


@pytest.mark.parametrize(
    "text, box",
    [
        (
            '<think>x</think><answer>```json\n[{"bbox_2d": [1, 2, 3, 4], "label": "a"}]\n```</answer>',
            (1, 2, 3, 4),
        ),
        ('<think>x</think><answer>{"bbox_2d": [1, 2, 3, 4]}</answer>', (1, 2, 3, 4)),
        ("<think>x</think><answer>[1, 2, 3, 4]</answer>", (1, 2, 3, 4)),
        (
            '<think>x</think><answer>[{"bbox_2d": [1.5, 2, 3, 4], "label": "a"</answer>',
            (1.5, 2, 3, 4),
        ),
        ("the box is [5, 6, 7, 8]", (5, 6, 7, 8)),
        ('<answer>[{"bbox_2d": [9, 8, 1, 2]}]</answer>', (1, 2, 9, 8)),  # inverted corners ordered
    ],
)
def test_tolerant_fallbacks(text, box):
    assert answers.parse_answer(text).box == box


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<think>no answer</think>",
        '<answer>[{"bbox_2d": [NaN, 1, 2, 3]}]</answer>',
        '<answer>[{"bbox_2d": [Infinity, 1, 2, 3]}]</answer>',
        '<answer>[{"bbox_2d": [1, 2, 3]}]</answer>',
        '<answer>[{"bbox_2d": [true, 1, 2, 3]}]</answer>',
        "<answer>[1e999, 1, 2, 3]</answer>",
    ],
)
def test_no_box_when_there_is_none(text):
    assert answers.parse_answer(text).box is None


def test_clamps_to_the_image():
    parsed = answers.parse_answer("<answer>[-5, 10, 500, 90]</answer>", image_size=(112, 80))
    assert parsed.box == (0, 10, 112, 80)


def test_format_reward_needs_both_blocks_in_order():
    assert rewards.format_reward(GOOD) == 1.0
    assert rewards.format_reward("<think>a</think>\n\n<answer>b</answer>") == 1.0
    assert rewards.format_reward("<answer>b</answer><think>a</think>") == 0.0
    assert rewards.format_reward("<think>a</think>") == 0.0
    assert rewards.format_reward("<think>a\nb</think><answer>c\nd</answer>") == 1.0  # DOTALL


def test_box_reward_values_and_square_option():
    assert rewards.box_reward((0, 0, 10, 10), (0, 0, 10, 10)) == pytest.approx(1.0)
    assert rewards.box_reward((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert rewards.box_reward((0, 0, 10, 10), (5, 0, 15, 10), square=True) == pytest.approx(
        (1 / 3) ** 2
    )
    assert rewards.box_reward(None, (0, 0, 10, 10)) == 0.0
    assert rewards.box_reward((3, 3, 3, 3), (3, 3, 3, 3)) == 0.0  # zero union: 0, not NaN


def test_seg_reward_ignores_255_and_squares():
    target = torch.tensor([[1, 1, 0, 255]], dtype=torch.uint8)
    pred = torch.tensor([[1, 0, 0, 1]], dtype=torch.bool)
    assert rewards.seg_reward(pred, target).item() == pytest.approx(0.5, abs=1e-5)
    assert rewards.seg_reward(pred, target, square=True).item() == pytest.approx(0.25, abs=1e-5)
    batch = rewards.seg_reward(torch.stack([pred, ~pred]), torch.stack([target, target]))
    assert batch.shape == (2,)


def test_unified_reward_is_the_weighted_sum():
    out = rewards.unified_reward(
        torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.2]), torch.tensor([0.25, 0.1]),
        rewards.RewardWeights(format=1.0, box=2.0, seg=4.0),
    )  # fmt: skip
    assert torch.allclose(out, torch.tensor([1 + 1 + 1, 0 + 0.4 + 0.4]))


# ---------------------------------------------------------------- property tests
@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parser_never_raises_on_any_text(text):
    parsed = answers.parse_answer(text)
    assert parsed.format_ok in (True, False)
    if parsed.box is not None:
        assert all(math.isfinite(v) for v in parsed.box)
        assert parsed.box[0] <= parsed.box[2] and parsed.box[1] <= parsed.box[3]


_coord = st.floats(min_value=-1e4, max_value=1e4, allow_nan=False)
_anything = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True), st.integers(), st.text(max_size=5), st.none()
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_coord, min_size=4, max_size=4), st.integers(1, 2000), st.integers(1, 2000))
def test_any_finite_box_is_ordered_and_clamped(coords, width, height):
    parsed = answers.parse_answer(f'<answer>[{{"bbox_2d": {coords}}}]</answer>', (width, height))
    assert parsed.box is not None
    x1, y1, x2, y2 = parsed.box
    assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height


@settings(max_examples=200, deadline=None)
@given(st.lists(_anything, min_size=0, max_size=6))
def test_arbitrary_json_values_never_give_a_non_finite_box(values):
    import json

    try:
        payload = json.dumps([{"bbox_2d": values}])
    except (ValueError, TypeError):
        return
    box = answers.parse_answer(f"<answer>{payload}</answer>").box
    assert box is None or all(math.isfinite(v) for v in box)


@settings(max_examples=300, deadline=None)
@given(st.lists(_coord, min_size=4, max_size=4), st.lists(_coord, min_size=4, max_size=4))
def test_box_reward_is_a_symmetric_iou_in_unit_interval(a, b):
    a = answers.order_and_clamp(tuple(a))
    b = answers.order_and_clamp(tuple(b))
    r = rewards.box_reward(a, b)
    assert 0.0 <= r <= 1.0 + 1e-9
    assert r == pytest.approx(rewards.box_reward(b, a))
    assert rewards.box_reward(a, b, square=True) == pytest.approx(r * r)
    if (a[2] - a[0]) * (a[3] - a[1]) > 0:
        assert rewards.box_reward(a, a) == pytest.approx(1.0)
