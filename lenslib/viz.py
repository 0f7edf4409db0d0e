"""Pictures of what LENS does: masks on images, one GRPO group at a glance, training curves.

* `overlay`:              the image with the mask tinted and the box outlined, in numpy (an RGB
                          uint8 array, which is also what `lenslib.predict` writes as a PNG).
* `show_prediction`:      one prediction on a matplotlib Axes, with the ground-truth box dashed.
* `plot_group`:           the G rollouts of one prompt side by side (paper Fig. 2 / eq. 7): each
                          with its mask, box, reward components (eq. 11), advantage and reasoning.
* `plot_training_curves`: loss, validation cIoU / gIoU and rewards of both stages against step.
* `rationale_panel`:      a chain of thought wrapped into lines for a figure.
* `explorer`:             an ipywidgets slider that steps through figures (samples, rollouts),
                          with `static_figures` as the fallback where widgets do not render.
* `pipeline_figure`:      the LENS pipeline (paper Fig. 2): MLLM -> CoT + box -> context queries
                          -> connector -> SAM2 -> mask, coloured by what a stage trains.

Every plotting function returns its Figure and never calls `plt.show()`: a notebook shows the
figure it gets, a script saves it (`fig.savefig(...)`).

Boxes are (x1, y1, x2, y2) in pixels of the image with exclusive x2 / y2 edges (the
convention of `lenslib.data.masks`): the box of a mask spanning columns 3..7 is x1 = 3, x2 = 8.
Masks are (H, W) arrays or tensors; any non-zero pixel is foreground. A ground-truth mask with
the ignore label 255 should be passed as `sample.mask == 1`.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib import patheffects
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lenslib.answers import parse_answer
from lenslib.data.images import check_rgb_image

BoxLike = Sequence[float]
MaskLike = np.ndarray | torch.Tensor

# Prediction = white, ground truth = green. The toy world paints saturated shapes (red, green, blue,
# yellow, purple) on a dark background: white is the colour farthest from all of them, so a
# predicted mask shows as a pale, white-edged region on any shape (a pink tint on a red or purple
# shape was hard to tell from the shape). Every line gets a dark outline so it shows on any
# background.
MASK_COLOR = (255, 255, 255)  # the predicted mask's tint and contour
BOX_COLOR = (255, 255, 255)  # the predicted box
GT_BOX_COLOR = "#00e676"  # the ground-truth box (dashed)
OUTLINE_COLOR = (0, 0, 0)
CUT = " [...]"  # ends a rationale cut by `rationale_panel(max_lines=...)`


# ----------------------------------------------------------------------------------- numpy
def _as_mask(mask: MaskLike, shape: tuple[int, int], name: str = "mask") -> np.ndarray:
    """(H, W) bool array from a numpy array or a tensor; ValueError if the size differs."""
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {mask.shape}, the image is {shape}")
    return mask.astype(bool)


def mask_edge(mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the mask's pixels that touch a background pixel (4-neighbourhood) or the
    image border, i.e. its contour."""
    padded = np.pad(mask, 1, constant_values=False)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner


def _paint_frame(
    out: np.ndarray, corners: tuple[int, int, int, int], rgb: np.ndarray, t: int
) -> None:
    """Paint, in place, a frame `t` pixels wide just inside the inclusive pixel rectangle
    (left, top, right, bottom), clipped to the image."""
    left, top, right, bottom = corners
    height, width = out.shape[:2]
    x0, x1 = max(left, 0), min(right, width - 1) + 1  # clipped, end exclusive
    y0, y1 = max(top, 0), min(bottom, height - 1) + 1
    if x1 <= x0 or y1 <= y0:
        return
    out[max(top, 0) : max(min(top + t, y1), 0), x0:x1] = rgb  # top band
    out[max(bottom - t + 1, y0) : min(bottom + 1, height), x0:x1] = rgb  # bottom band
    out[y0:y1, max(left, 0) : max(min(left + t, x1), 0)] = rgb  # left band
    out[y0:y1, max(right - t + 1, x0) : min(right + 1, width)] = rgb  # right band


def draw_box(
    image: np.ndarray,
    box: BoxLike,
    color: tuple[int, int, int] = BOX_COLOR,
    thickness: int = 2,
    outline: bool = True,
) -> np.ndarray:
    """The box painted into a copy of `image` (H, W, 3) uint8: a frame `thickness` pixels wide
    just inside the box's edges, with a 1-pixel dark outline on both sides when `outline`.
    The parts outside the image are clipped away."""
    x1, y1, x2, y2 = (float(v) for v in box)
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        raise ValueError(f"box must hold 4 finite numbers, got {tuple(box)}")
    # pixel edges -> first and last pixel covered (x2, y2 exclusive)
    left, top = math.floor(min(x1, x2)), math.floor(min(y1, y2))
    right, bottom = math.ceil(max(x1, x2)) - 1, math.ceil(max(y1, y2)) - 1
    out = image.copy()
    if right < left or bottom < top:
        return out  # an empty box: nothing to draw
    t = max(int(thickness), 1)
    if outline:
        dark = np.asarray(OUTLINE_COLOR, dtype=np.uint8)
        _paint_frame(out, (left - 1, top - 1, right + 1, bottom + 1), dark, t + 2)
    _paint_frame(out, (left, top, right, bottom), np.asarray(color, dtype=np.uint8), t)
    return out


def overlay(
    image: np.ndarray,
    mask: MaskLike | None,
    box: BoxLike | None = None,
    color: tuple[int, int, int] = MASK_COLOR,
    alpha: float = 0.5,
    box_color: tuple[int, int, int] = BOX_COLOR,
    thickness: int = 2,
) -> np.ndarray:
    """The image (H, W, 3) uint8 with the mask tinted (`alpha` of `color` blended in, its
    contour in full `color`) and the box drawn (`draw_box`); returns a new (H, W, 3) uint8
    array. mask or box may be None."""
    image = check_rgb_image(image)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    out = image.copy()
    if mask is not None:
        fg = _as_mask(mask, image.shape[:2])
        tint = np.asarray(color, dtype=np.float32)
        blended = (1.0 - alpha) * image[fg].astype(np.float32) + alpha * tint  # (P, 3)
        out[fg] = np.clip(np.round(blended), 0, 255).astype(np.uint8)
        out[mask_edge(fg)] = np.asarray(color, dtype=np.uint8)
    if box is not None:
        out = draw_box(out, box, box_color, thickness)
    return out


# ------------------------------------------------------------------------------ matplotlib
def _box_patch(box: BoxLike, color: str, style: str, label: str) -> Rectangle:
    """A matplotlib rectangle for an (x1, y1, x2, y2) box in pixel-edge coordinates.

    imshow puts pixel i's centre at i, so pixel edges sit at i - 0.5."""
    x1, y1, x2, y2 = (float(v) for v in box)
    patch = Rectangle(
        (min(x1, x2) - 0.5, min(y1, y2) - 0.5), abs(x2 - x1), abs(y2 - y1),
        fill=False, edgecolor=color, linewidth=2, linestyle=style, label=label,
    )  # fmt: skip
    patch.set_path_effects([patheffects.withStroke(linewidth=3.5, foreground="black")])
    return patch


def show_prediction(
    ax: Axes,
    image: np.ndarray,
    mask: MaskLike | None,
    box: BoxLike | None = None,
    gt_box: BoxLike | None = None,
    title: str | None = None,
) -> Figure:
    """Draw one prediction on `ax`: the tinted mask, the predicted box (solid white) and the
    ground-truth box (dashed green). Returns the Axes' Figure."""
    ax.imshow(overlay(image, mask))
    if box is not None:
        ax.add_patch(_box_patch(box, np.array(BOX_COLOR) / 255, "-", "predicted box"))
    if gt_box is not None:
        ax.add_patch(_box_patch(gt_box, GT_BOX_COLOR, "--", "ground-truth box"))
    if title is not None:
        ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    return ax.figure


def rationale_panel(text: str, width: int = 40, max_lines: int | None = None) -> str:
    """`text` wrapped to lines of at most `width` characters; its own line breaks are kept.
    With `max_lines`, longer text is cut to that many lines and ends in " [...]"."""
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    lines = [
        line
        for paragraph in text.strip().splitlines()
        for line in (textwrap.wrap(paragraph, width=width, break_long_words=True) or [""])
    ]
    if max_lines is not None and len(lines) > max_lines:
        lines = lines[: max(max_lines, 1)]
        lines[-1] = lines[-1][: max(width - len(CUT), 0)].rstrip() + CUT
    return "\n".join(lines)


def _reasoning(text: str) -> str:
    """The <think> part of a completion, or the whole completion when it has none."""
    think = parse_answer(text).think
    return think if think is not None else f"(no <think> block) {text}"


def plot_group(
    image: np.ndarray,
    rollout_texts: Sequence[str],
    masks: Sequence[MaskLike | None],
    boxes: Sequence[BoxLike | None],
    rewards: Mapping[str, Sequence[float]],
    advantages: Sequence[float],
    gt_box: BoxLike | None = None,
    prompt: str | None = None,
    width: int = 34,
    max_lines: int = 14,
) -> Figure:
    """One GRPO group seen whole: G panels side by side, one per rollout of the same prompt.

    Each panel shows the rollout's mask and box (and the dashed ground-truth box if given);
    its title gives the advantage A_i (eq. 7; green when above the group mean, red when below)
    and the reward components (eq. 11, e.g. rewards = {"format": [...], "box": [...],
    "seg": [...]}); under it, the rollout's reasoning, wrapped (`width` characters, at most
    `max_lines` lines). The rollout with the highest advantage gets a frame. `prompt`, the
    referring expression, goes into the figure's title. 2 x G axes (image row, text row).
    """
    g = len(rollout_texts)
    if g == 0:
        raise ValueError("plot_group needs at least one rollout, got none")
    lengths = {"masks": len(masks), "boxes": len(boxes), "advantages": len(advantages)}
    lengths |= {f"rewards[{name!r}]": len(values) for name, values in rewards.items()}
    for name, n in lengths.items():
        if n != g:
            raise ValueError(f"{name} has {n} entries, expected one per rollout ({g})")
    panels = [rationale_panel(_reasoning(text), width, max_lines) for text in rollout_texts]
    text_height = 0.15 * max(p.count("\n") + 1 for p in panels) + 0.1  # inches at fontsize 7.5
    fig, axes = plt.subplots(
        2, g, figsize=(2.7 * g, 3.3 + text_height), squeeze=False,
        gridspec_kw={"height_ratios": [2.6, text_height]},
    )  # fmt: skip
    best = int(np.argmax(advantages))
    for i in range(g):
        rewards_line = "  ".join(f"{k} {float(v[i]):.2f}" for k, v in rewards.items())
        title = f"rollout {i + 1}   A = {float(advantages[i]):+.2f}\n{rewards_line}"
        show_prediction(axes[0, i], image, masks[i], boxes[i], gt_box, title)
        sign_color = "#1b7f3b" if advantages[i] > 0 else "#b71c1c" if advantages[i] < 0 else "k"
        axes[0, i].title.set_color(sign_color)
        if i == best:
            for spine in axes[0, i].spines.values():
                spine.set_edgecolor(sign_color)
                spine.set_linewidth(3)
        text_ax = axes[1, i]
        text_ax.axis("off")
        text_ax.text(0.0, 1.0, panels[i], va="top", ha="left", fontsize=7.5, family="monospace",
                     transform=text_ax.transAxes)  # fmt: skip
    heading = f"one GRPO group: G = {g} rollouts of " + (repr(prompt) if prompt else "one prompt")
    fig.suptitle(
        heading + "\nwhite: the rollout's mask and box    dashed green: the ground-truth box",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def _series(history: Sequence[Mapping] | None, key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that hold a finite `key` and a 'step'."""
    steps, values = [], []
    for record in history or []:
        value, step = record.get(key), record.get("step")
        if value is None or step is None:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            steps.append(float(step))
            values.append(float(value))
    return steps, values


def plot_training_curves(
    history_stage1: Sequence[Mapping] | None, history_stage2: Sequence[Mapping] | None
) -> Figure:
    """Loss, validation cIoU / gIoU and mean rewards against the optimiser step, three panels.

    The histories are the lists of dicts the training loops return (keys 'step', 'loss',
    'val_ciou', 'val_giou', 'reward', 'reward_format', 'reward_box', 'reward_seg'; validation
    keys only on evaluation steps). Stage 2 continues the step axis after stage 1 (a dotted line
    marks the change). Missing keys or empty histories leave their curves out.
    """
    offset = max(_series(history_stage1, "step")[1], default=0.0)  # stage 1's last step

    def curve(ax: Axes, history, key: str, label: str, shift: float, **style) -> bool:
        steps, values = _series(history, key)
        if steps:
            ax.plot([s + shift for s in steps], values, label=label, **style)
        return bool(steps)

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    loss_ax, val_ax, reward_ax = axes
    drawn = [False, False, False]
    drawn[0] |= curve(loss_ax, history_stage1, "loss", "stage 1: seg loss (eq. 5)", 0, color="C0")
    drawn[0] |= curve(
        loss_ax, history_stage2, "loss", "stage 2: GRPO + seg loss (eq. 12)", offset, color="C1"
    )
    for stage, (history, shift) in enumerate(((history_stage1, 0), (history_stage2, offset)), 1):
        for key, marker in (("val_ciou", "o"), ("val_giou", "s")):
            label = f"stage {stage}: {key[4:].replace('iou', 'IoU')}"
            color = "C0" if stage == 1 else "C1"
            style = "-" if key == "val_ciou" else "--"
            drawn[1] |= curve(val_ax, history, key, label, shift, color=color, marker=marker,
                              linestyle=style, markersize=4)  # fmt: skip
    reward_keys = (
        ("reward", "unified R (eq. 11)", "k"),
        ("reward_format", "R_format", "C2"),
        ("reward_box", "R_box", "C3"),
        ("reward_seg", "R_seg", "C4"),
    )
    for key, label, color in reward_keys:
        drawn[2] |= curve(reward_ax, history_stage2, key, label, offset, color=color)
    titles = ("training loss", "validation mask IoU", "stage 2: mean reward per step")
    ylabels = ("loss", "IoU", "reward")
    for ax, title, ylabel, has_data in zip(axes, titles, ylabels, drawn):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimiser step")
        ax.set_ylabel(ylabel)
        if has_data:
            ax.legend(fontsize=7)
            if offset and history_stage2:
                ax.axvline(offset + 0.5, color="grey", linestyle=":", linewidth=1)
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes,
                    color="grey")  # fmt: skip
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


__all__ = [
    "draw_box",
    "overlay",
    "pipeline_figure",
    "plot_group",
    "plot_training_curves",
    "rationale_panel",
    "show_prediction",
]


# ------------------------------------------------------------------------------- explorer
def explorer(count: int, draw: Callable[[int], Figure], description: str = "item"):
    """An ipywidgets slider over `draw(0) .. draw(count - 1)`: moving it redraws the figure.

    Returns the widget (display it as a cell's last value), or None where ipywidgets is not
    installed. Widgets need a live Jupyter front end: on GitHub, under nbval or in a script
    they show as text, so pair the explorer with `static_figures` of the same `draw`.
    """
    if count < 1:
        raise ValueError(f"explorer needs at least one item, got count={count}")
    try:
        import ipywidgets as widgets
    except ImportError:
        return None
    slider = widgets.IntSlider(value=0, min=0, max=count - 1, description=description)
    output = widgets.Output()

    def show(index: int) -> None:
        output.clear_output(wait=True)
        with output:
            figure = draw(index)
            plt.show()
            plt.close(figure)

    slider.observe(lambda change: show(change["new"]), names="value")
    show(0)
    return widgets.VBox([slider, output])


def static_figures(count: int, draw: Callable[[int], Figure], limit: int = 3) -> list[Figure]:
    """The first `limit` of the explorer's figures, drawn once: its static fallback."""
    return [draw(index) for index in range(min(count, limit))]


# ------------------------------------------------------------------------------- pipeline
# The parts of LENS that have weights, in the order of paper Fig. 2, and what each stage trains
# (`LensModel.set_stage`): stage 1 (alignment, eq. 5) only the context module; stage 2 (GRPO,
# eq. 12) everything but SAM2's image encoder (the MLLM's vision tower too, unless
# `train_vision_tower=False`).
PIPELINE_PARTS = ("mllm", "queries", "connector", "sam_encoder", "sam_decoder")
STAGE_TRAINS = {
    "align": frozenset({"queries", "connector"}),
    "rl": frozenset({"mllm", "queries", "connector", "sam_decoder"}),
}
TRAINS_COLOR = "#ff8a50"  # warm: the part learns in this stage
FROZEN_COLOR = "#b3e5fc"  # icy: the part is frozen
PART_COLOR = "#e8eaf6"  # stage=None: a module, whatever the stage
DATA_COLOR = "#ffffff"  # inputs and outputs (no weights)


def trained_parts(stage: str | None) -> frozenset[str]:
    """The parts of `PIPELINE_PARTS` that learn in `stage` ("align" or "rl"); None: none."""
    if stage is None:
        return frozenset()
    if stage not in STAGE_TRAINS:
        raise ValueError(f"stage must be None, 'align' or 'rl', got {stage!r}")
    return STAGE_TRAINS[stage]


def pipeline_figure(stage: str | None = None) -> Figure:
    """LENS as a block diagram (paper Fig. 2): image + question -> Qwen2.5-VL -> chain of thought
    + box; M context queries read the MLLM's state -> connector -> SAM2 -> mask.

    stage=None labels every module with what it does in both stages; stage="align" (stage 1,
    eq. 5) or "rl" (stage 2, eqs. 6-12) colours each module warm if it trains in that stage and
    icy (hatched) if it is frozen, and names the losses / rewards of the stage. Matplotlib only;
    returns the Figure (`fig.savefig("docs/pipeline.png")`).
    """
    trains = trained_parts(stage)
    fig, ax = plt.subplots(figsize=(12.5, 4.6))
    ax.set_xlim(0, 12.5)
    ax.set_ylim(-0.5, 4.5)
    ax.axis("off")

    def block(key, x, y, w, h, text, part=None):
        if part is None:
            color, hatch, note = DATA_COLOR, None, None
        elif stage is None:
            color, hatch = PART_COLOR, None
            note = "align: " + ("trains" if part in STAGE_TRAINS["align"] else "frozen")
            note += " | RL: " + ("trains" if part in STAGE_TRAINS["rl"] else "frozen")
        else:
            color = TRAINS_COLOR if part in trains else FROZEN_COLOR
            hatch = None if part in trains else "///"
            note = "TRAINS" if part in trains else "frozen"
        patch = plt.Rectangle((x, y), w, h, facecolor=color, edgecolor="#37474f", linewidth=1.4,
                              hatch=hatch, linestyle="-" if part else "--", gid=key)  # fmt: skip
        ax.add_patch(patch)
        ax.text(
            x + w / 2, y + h / 2 + (0.1 if note else 0.0), text, ha="center", va="center",
            fontsize=9, gid=key,
            bbox={"facecolor": color, "edgecolor": "none", "pad": 1} if hatch else None,
        )  # fmt: skip
        if note:
            weight = "bold" if note == "TRAINS" else "normal"
            ax.text(
                x + w / 2, y + 0.07, note, ha="center", va="bottom", fontsize=7.5, weight=weight,
                color="#bf360c" if note == "TRAINS" else "#37474f", gid=f"{key}:note",
                bbox={"facecolor": color, "edgecolor": "none", "pad": 0.5} if hatch else None,
            )  # fmt: skip
        return x, y, w, h

    def arrow(start, end, label=None, offset=(0.0, 0.12)):
        ax.annotate("", xy=end, xytext=start,
                    arrowprops={"arrowstyle": "-|>", "color": "#37474f", "lw": 1.3})  # fmt: skip
        if label:
            mid = ((start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1])
            ax.text(*mid, label, ha="center", va="bottom", fontsize=8, color="#263238")

    block("input", 0.1, 1.7, 1.5, 1.1, "image\n+ question")
    block("mllm", 2.2, 1.5, 2.0, 1.5, "Qwen2.5-VL\n(MLLM)\nreasons: eq. 1", "mllm")
    block(
        "cot",
        4.7,
        3.2,
        3.4,
        1.0,
        "chain of thought + box\n<think>...</think>\n<answer>[x1, y1, x2, y2]</answer>",
    )
    block(
        "queries",
        2.2,
        -0.35,
        2.0,
        1.15,
        "M context queries\n(appended after the answer)",
        "queries",
    )
    block("connector", 5.0, 1.5, 1.7, 1.4, "connector\n(4 transformer\nblocks): eq. 3", "connector")
    block(
        "sam_decoder",
        7.6,
        1.5,
        2.2,
        1.4,
        "SAM2 prompt encoder\n+ mask decoder: eq. 4",
        "sam_decoder",
    )
    block("sam_encoder", 7.6, -0.35, 2.2, 1.15, "SAM2 image encoder", "sam_encoder")
    block("mask", 10.6, 1.7, 1.6, 1.0, "mask")

    arrow((1.6, 2.25), (2.2, 2.25))
    arrow((4.2, 2.9), (4.7, 3.55), "generate", offset=(-0.25, 0.05))
    arrow((3.2, 0.8), (3.2, 1.5), "one more\nforward", offset=(0.55, -0.3))
    arrow((4.2, 2.2), (5.0, 2.2), "Q\u2032: eq. 2")
    arrow((6.7, 2.2), (7.6, 2.2), "Q_seg")
    arrow((8.7, 0.8), (8.7, 1.5), "features", offset=(0.45, -0.25))
    arrow((9.8, 2.2), (10.6, 2.2))
    ax.text(7.45, 0.22, "image \u2192", ha="right", va="center", fontsize=8, color="#263238")

    if stage == "align":
        title = "Stage 1, alignment (eq. 5): only the context module learns"
        ax.text(4.7 + 1.7, 4.3, "teacher forced: the MLLM reads the ground-truth answer",
                ha="center", fontsize=8, style="italic")  # fmt: skip
        ax.text(11.4, 1.6, "L_seg = dice + BCE\nvs the ground-truth mask", ha="center", va="top",
                fontsize=8, color="#bf360c")  # fmt: skip
    elif stage == "rl":
        title = (
            "Stage 2, GRPO with unified rewards (eqs. 6-12): all but SAM2's image encoder learns"
        )
        ax.text(8.25, 3.15, "R_format, R_box", ha="left", va="top", fontsize=8, color="#bf360c")
        ax.text(11.4, 1.6, "R_seg (eq. 11)\n+ \u03b1 L_seg (eq. 12)", ha="center", va="top",
                fontsize=8, color="#bf360c")  # fmt: skip
        ax.text(4.7 + 1.7, 4.3, "G sampled answers per question, each with its own mask",
                ha="center", fontsize=8, style="italic")  # fmt: skip
    else:
        title = "LENS (paper Fig. 2): reason, read the reasoning out, segment"
    ax.set_title(title, fontsize=11, loc="left")
    if stage is not None:
        handles = [
            plt.Rectangle((0, 0), 1, 1, facecolor=TRAINS_COLOR, edgecolor="#37474f"),
            plt.Rectangle((0, 0), 1, 1, facecolor=FROZEN_COLOR, edgecolor="#37474f", hatch="///"),
        ]
        ax.legend(handles, ["trains in this stage", "frozen"], loc="lower right", fontsize=8,
                  frameon=False)  # fmt: skip
    fig.tight_layout()
    return fig


FIDELITY_LABELS = {
    "seg_zero_style": "Seg-Zero-style\n(box -> SAM)",
    "lens_stage1": "LENS\nstage 1",
    "lens_no_rseg": "LENS 1+2\nwithout R_seg",
    "lens": "LENS\nstage 1+2",
    "control": "stage 1\ncontinued",
}


def fidelity_figure(merged: Mapping) -> Figure:
    """The world-v2 experiments (`lenslib.fidelity.merge`'s output) in three panels: cIoU per
    model and split (mean over seeds, bars = std, dots = seeds); the misguided box (Fig. A4:
    cIoU against the box's shift, box -> SAM vs LENS); stage 2 against the same-compute
    control, one line per seed."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4), gridspec_kw={"width_ratios": [5, 3, 3]})
    splits = list(merged["splits"])
    models = [m for m in FIDELITY_LABELS if m in merged["model_seeds"]]
    width = 0.8 / max(len(splits), 1)
    for k, split in enumerate(splits):
        x = np.arange(len(models)) + (k - (len(splits) - 1) / 2) * width
        values = [merged[split][m] for m in models]
        means, stds = (
            [np.mean(v) for v in values],
            [np.std(v, ddof=1) if len(v) > 1 else 0 for v in values],
        )
        axes[0].bar(x, means, width, yerr=stds, capsize=3, label=split, alpha=0.8)
        for xi, v in zip(x, values):
            axes[0].plot([xi] * len(v), v, "k.", markersize=4)
    axes[0].set_xticks(range(len(models)), [FIDELITY_LABELS[m] for m in models], fontsize=8)
    axes[0].set_ylabel("cIoU")
    axes[0].set_title(f"cIoU per model (up to {len(merged['seeds'])} seeds, mean ± std)")
    axes[0].legend()
    if "misguided_box" in merged:
        box = merged["misguided_box"]
        axes[1].plot(box["shift"], box["seg_zero_style"], "o-", label="box -> SAM")
        axes[1].plot(box["shift"], box["lens"], "s-", label="LENS (answer with that box)")
        axes[1].set_xlabel("box shifted by (box sizes)")
        axes[1].set_ylabel("cIoU")
        axes[1].set_title("Misguided box (Fig. A4)")
        axes[1].legend()
    if "stage2" in merged:
        stage2 = merged["stage2"]
        for seed, before, after, control in zip(
            stage2["seeds"], stage2["before"], stage2["after"], stage2["control"]
        ):
            line = axes[2].plot([0, 1], [before, after], "o-", label=f"seed {seed}: stage 2")[0]
            axes[2].plot([0, 1], [before, control], "x--", color=line.get_color(), label="control")
        axes[2].set_xticks([0, 1], ["after stage 1", "after the same\nnumber of steps"])
        axes[2].set_ylabel("val cIoU")
        axes[2].set_title("Stage 2 (solid) vs stage 1 continued (dashed)")
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    return fig
