"""Plotting helpers: overlay pixels, figure layouts, robustness to empty or partial logs."""

from __future__ import annotations

import matplotlib

matplotlib.use(
    "Agg"
)  # no windows; set here, not via MPLBACKEND, which would leak into nbval kernels

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib.figure import Figure

from lenslib import viz
from lenslib.prompts import format_answer

H, W = 40, 60


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


@pytest.fixture
def image():
    return np.full((H, W, 3), 100, dtype=np.uint8)


def test_backend_is_agg():
    assert plt.get_backend().lower() == "agg"


def test_overlay_tints_only_the_mask(image):
    mask = np.zeros((H, W), bool)
    mask[10:20, 10:30] = True
    out = viz.overlay(image, mask, color=(200, 0, 0), alpha=0.5)
    assert out.shape == (H, W, 3) and out.dtype == np.uint8
    assert out[15, 20].tolist() == [150, 50, 50]  # inside: half image, half colour
    assert out[10, 10].tolist() == [200, 0, 0]  # the contour: full colour
    assert np.array_equal(out[~mask], image[~mask])  # outside untouched
    assert np.array_equal(image, np.full((H, W, 3), 100))  # the input is not modified


def test_overlay_accepts_tensor_and_uint8_masks(image):
    mask = np.zeros((H, W), np.uint8)
    mask[5:9, 5:9] = 1
    from_numpy = viz.overlay(image, mask)
    from_tensor = viz.overlay(image, torch.from_numpy(mask) > 0)
    assert np.array_equal(from_numpy, from_tensor)
    assert not np.array_equal(from_numpy, image)


def test_overlay_alpha_extremes(image):
    mask = np.ones((H, W), bool)
    assert np.array_equal(viz.overlay(image, mask, alpha=0.0)[1:-1, 1:-1], image[1:-1, 1:-1])
    full = viz.overlay(image, mask, color=(1, 2, 3), alpha=1.0)
    assert (full == np.array([1, 2, 3], np.uint8)).all()


def test_overlay_draws_the_box_outline(image):
    box = (10, 5, 30, 25)  # x2, y2 exclusive: pixels x 10..29, y 5..24
    out = viz.overlay(image, None, box, box_color=(0, 255, 0))
    green = (out == np.array([0, 255, 0], np.uint8)).all(-1)
    assert green[5, 10] and green[5, 29] and green[24, 10] and green[24, 29]  # corners
    assert green[15, 10] and green[15, 11] and not green[15, 12]  # 2 px wide, inside the box
    assert (out[15, 9] == 0).all() and (out[15, 12] == 0).all()  # dark outline on both sides
    assert not green[:, :9].any() and not green[26:].any()
    assert np.array_equal(out[15, 15], image[15, 15])  # the interior is untouched


def test_box_partly_outside_is_clipped_and_outside_is_skipped(image):
    out = viz.overlay(image, None, (-20.0, -20.0, 10.5, 10.5), box_color=(0, 255, 0))
    green = (out == np.array([0, 255, 0], np.uint8)).all(-1)
    assert green[0, 10] and green[10, 0] and not green[0, 0]
    far = viz.overlay(image, None, (500, 500, 600, 600))
    assert np.array_equal(far, image)


def test_overlay_rejects_bad_input(image):
    with pytest.raises(ValueError, match="mask has shape"):
        viz.overlay(image, np.zeros((H + 1, W), bool))
    with pytest.raises(ValueError, match="image must be"):
        viz.overlay(image.astype(np.float32), None)
    with pytest.raises(ValueError, match="alpha"):
        viz.overlay(image, None, alpha=2.0)
    with pytest.raises(ValueError, match="finite"):
        viz.overlay(image, None, (0, 0, float("nan"), 4))


def test_mask_edge_is_the_contour():
    mask = np.zeros((7, 7), bool)
    mask[1:6, 1:6] = True
    edge = viz.mask_edge(mask)
    assert edge.sum() == 16 and not edge[3, 3] and edge[1, 3]


def test_show_prediction_draws_image_and_both_boxes(image):
    fig, ax = plt.subplots()
    mask = np.zeros((H, W), bool)
    out = viz.show_prediction(ax, image, mask, box=(1, 2, 10, 12), gt_box=(0, 0, 5, 5), title="t")
    assert out is fig
    assert len(ax.images) == 1 and len(ax.patches) == 2 and ax.get_title() == "t"


def test_rationale_panel_wraps_and_cuts():
    text = "The small purple square is at the bottom right. It is the target. " * 3
    lines = viz.rationale_panel(text, width=20).splitlines()
    assert all(len(line) <= 20 for line in lines) and len(lines) > 3
    assert " ".join(lines).split() == text.split()  # no word lost
    cut = viz.rationale_panel(text, width=20, max_lines=2).splitlines()
    assert len(cut) == 2 and cut[-1].endswith("[...]") and len(cut[-1]) <= 20
    assert viz.rationale_panel("line one\nline two", width=40) == "line one\nline two"
    with pytest.raises(ValueError):
        viz.rationale_panel("x", width=0)


def group_inputs(g: int = 3):
    image = np.zeros((H, W, 3), np.uint8)
    texts = [
        format_answer(f"reasoning number {i}.", (5, 5, 20, 20), "the square") for i in range(g)
    ]
    texts[-1] = "no tags here"
    masks = [np.zeros((H, W), bool), torch.ones(H, W, dtype=torch.bool), None][:g]
    boxes = [(5, 5, 20, 20), None, (0, 0, 10, 10)][:g]
    rewards = {"format": [1.0, 1.0, 0.0][:g], "box": [0.5, 0.0, 0.1][:g], "seg": [0.4, 0.2, 0][:g]}
    advantages = [1.1, -0.2, -0.9][:g]
    return image, texts, masks, boxes, rewards, advantages


def test_plot_group_has_an_image_and_a_text_panel_per_rollout():
    image, texts, masks, boxes, rewards, advantages = group_inputs(3)
    fig = viz.plot_group(image, texts, masks, boxes, rewards, advantages, gt_box=(4, 4, 21, 21))
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    top = fig.axes[:3]
    assert "A = +1.10" in top[0].get_title() and "box 0.50" in top[0].get_title()
    shown = [t.get_text() for ax in fig.axes[3:] for t in ax.texts]
    assert "reasoning number 0." in shown[0]
    assert "(no <think> block) no tags here" in shown[2]
    fig.canvas.draw()  # renders without error


def test_plot_group_names_a_length_mismatch():
    image, texts, masks, boxes, rewards, advantages = group_inputs(3)
    with pytest.raises(ValueError, match="advantages has 2 entries"):
        viz.plot_group(image, texts, masks, boxes, rewards, advantages[:2])
    with pytest.raises(ValueError, match="rewards\\['box'\\]"):
        viz.plot_group(image, texts, masks, boxes, rewards | {"box": [0.0]}, advantages)
    with pytest.raises(ValueError, match="at least one rollout"):
        viz.plot_group(image, [], [], [], {}, [])


def histories():
    stage1 = [{"step": i, "loss": 1.0 / i} for i in range(1, 6)]
    stage1[-1] |= {"val_ciou": 0.3, "val_giou": 0.25}
    stage2 = [
        {"step": i, "loss": 0.2, "reward": 2.0, "reward_format": 1.0, "reward_box": 0.5,
         "reward_seg": 0.5}
        for i in range(1, 4)
    ]  # fmt: skip
    stage2[-1] |= {"val_ciou": 0.5, "val_giou": 0.45}
    return stage1, stage2


def lines_of(fig):
    return [[line.get_label() for line in ax.get_lines()] for ax in fig.axes]


def test_training_curves_three_panels_with_stage2_after_stage1():
    fig = viz.plot_training_curves(*histories())
    assert len(fig.axes) == 3
    loss, val, reward = lines_of(fig)
    assert sum(label.startswith("stage") for label in loss) == 2
    assert sum(label.startswith("stage") for label in val) == 4
    assert sum(not label.startswith("_") for label in reward) == 4
    stage2_loss = fig.axes[0].get_lines()[1]
    assert stage2_loss.get_xdata().tolist() == [6.0, 7.0, 8.0]  # continues after step 5


@pytest.mark.parametrize(
    "stage1, stage2",
    [([], []), (None, None), ([{"step": 1, "lr": 0.1}], []), ([], [{"step": 1, "reward": 1.0}])],
)
def test_training_curves_survive_empty_and_partial_logs(stage1, stage2):
    fig = viz.plot_training_curves(stage1, stage2)
    assert len(fig.axes) == 3
    fig.canvas.draw()


def test_training_curves_skip_missing_and_nan_values():
    stage1 = [{"step": 1, "loss": float("nan")}, {"step": 2, "loss": 0.5}, {"loss": 0.1}]
    fig = viz.plot_training_curves(stage1, [])
    (line,) = fig.axes[0].get_lines()
    assert line.get_xdata().tolist() == [2.0] and line.get_ydata().tolist() == [0.5]
    assert fig.axes[1].get_lines() == [] and fig.axes[2].get_lines() == []


coord = st.floats(-100, 200, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(box=st.tuples(coord, coord, coord, coord), thickness=st.integers(1, 5))
def test_draw_box_changes_only_pixels_near_the_box(box, thickness):
    image = np.full((H, W, 3), 100, dtype=np.uint8)
    out = viz.draw_box(image, box, thickness=thickness)
    assert out.shape == image.shape and out.dtype == np.uint8
    changed = (out != image).any(-1)
    x1, x2 = sorted(box[0::2])
    y1, y2 = sorted(box[1::2])
    ys, xs = np.nonzero(changed)
    if len(xs):  # every changed pixel lies within one pixel of the box
        assert xs.min() >= np.floor(x1) - 1 and xs.max() <= np.ceil(x2)
        assert ys.min() >= np.floor(y1) - 1 and ys.max() <= np.ceil(y2)


def test_explorer_redraws_when_the_slider_moves_and_static_figures_draw_the_first_few():
    drawn = []

    def draw(index):
        drawn.append(index)
        fig, ax = plt.subplots()
        ax.set_title(f"item {index}")
        return fig

    widget = viz.explorer(5, draw, description="sample")
    slider = widget.children[0]
    assert (slider.min, slider.max, slider.value) == (0, 4, 0) and drawn == [0]
    slider.value = 3
    assert drawn == [0, 3]
    figures = viz.static_figures(5, draw, limit=2)
    assert [f.axes[0].get_title() for f in figures] == ["item 0", "item 1"]
    with pytest.raises(ValueError, match="at least one"):
        viz.explorer(0, draw)


def test_mask_colour_stands_apart_from_every_toy_shape_colour():
    from lenslib.toy.world import PALETTE, ToyWorldConfig

    for name in ToyWorldConfig().colours:  # the colours the toy world paints by default
        distance = np.linalg.norm(np.subtract(viz.MASK_COLOR, PALETTE[name]))
        assert distance > 200, (name, distance)


@pytest.mark.parametrize("stage", [None, "align", "rl"])
def test_pipeline_figure_marks_what_each_stage_trains(stage):
    fig = viz.pipeline_figure(stage)
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    notes = {t.get_gid().split(":")[0]: t.get_text() for t in fig.axes[0].texts
             if (t.get_gid() or "").endswith(":note")}  # fmt: skip
    assert set(notes) == set(viz.PIPELINE_PARTS)
    if stage is None:  # both stages, written out under every module
        assert notes["connector"] == "align: trains | RL: trains"
        assert notes["mllm"] == "align: frozen | RL: trains"
        assert notes["sam_encoder"] == "align: frozen | RL: frozen"
    else:
        for part, note in notes.items():
            assert (note == "TRAINS") == (part in viz.trained_parts(stage)), (stage, part)
    fig.canvas.draw()


def test_pipeline_stages_match_what_the_model_freezes():
    assert viz.trained_parts("align") == {"queries", "connector"}
    assert viz.trained_parts("rl") == set(viz.PIPELINE_PARTS) - {"sam_encoder"}
    with pytest.raises(ValueError, match="stage must be"):
        viz.pipeline_figure("sft")


def test_committed_pipeline_png_exists():
    from pathlib import Path

    png = Path(__file__).resolve().parent.parent / "docs" / "pipeline.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fidelity_figure_draws_every_model_split_and_seed():
    from lenslib.fidelity import MODELS, merge

    def seed(s, c):
        models = {m: {"val": {"ciou": c + i / 10}, "ambiguous": {"ciou": c}}
                  for i, m in enumerate(MODELS)}  # fmt: skip
        box = {"shift": [0, 0.5, 1], "seg_zero_style": [c, c / 2, 0.0], "lens": [c, c, c]}
        return {"seed": s, "config": {"samples": 4}, "models": models, "misguided_box": box}

    merged = merge([seed(0, 0.2), seed(1, 0.3), seed(2, 0.25)])
    fig = viz.fidelity_figure(merged)
    bars, curves, stage2 = fig.axes
    assert len(bars.patches) == len(MODELS) * 2  # one bar per model and split
    heights = sorted(p.get_height() for p in bars.patches)
    assert heights[0] == pytest.approx(0.25)  # the mean over seeds
    assert [tuple(line.get_ydata()) for line in curves.lines[:1]] == [(0.25, 0.125, 0.0)]
    assert len(stage2.lines) == 2 * 3  # stage 2 and its control, per seed
    plt.close(fig)
