"""The toy world's vocabulary, configuration and geometry: shapes, their masks, the image.

A scene shows a few coloured shapes (circle, square, triangle, diamond, cross; world v2 adds
the non-convex ring, frame and corner) on a plain background. Sizes are three categories whose areas double from one to the next (all kinds of
one category have the same area), so "larger" is always visible. Shapes are drawn in order,
later ones on top; `visible_masks` gives each shape's *visible* pixels, and boxes are the tight
boxes of those masks with exclusive x2/y2 edges (see `lenslib.data.masks`). `grid_word` names
where a box centre lies on a 3x3 grid ("top left", ..., "center", ...).

Why the defaults look as they do: a tiny MLLM trained from scratch learns the answer format in
a minute but learns *where* things are slowly. Large shapes, few of
them, saturated colours and a dark background with a faint colour ramp (red grows to the right,
blue downwards, so every pixel "knows" where it is) keep localisation learnable; every one of
these is a field of `ToyWorldConfig`, so the pretraining recipes can tune them.

**World v2** (`ToyWorldConfig(version=2)`, default 1 = the world above, unchanged) adds the
scenes where a box is NOT enough to say which object is meant (`SCENE_KINDS`): two shapes
sharing nearly the same box, one in front ("overlap"); a shape inside a ring or frame
("inside"); a shape half hidden by an occluder ("occluded"); beside "plain" scenes, with the
non-convex kinds in the vocabulary, an "ambiguous" split of those scenes only, and reasoning
rationales ("reason" style, `lenslib.toy.rationales`). See `lenslib.toy.generator`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 80, 240),
    "yellow": (245, 215, 30),
    "purple": (160, 50, 210),
    "orange": (250, 130, 20),
    "cyan": (30, 210, 220),
    "white": (245, 245, 245),
}
KINDS = ("circle", "square", "triangle", "diamond", "cross", "ring", "frame", "corner")
V1_KINDS = ("circle", "square", "triangle", "diamond")  # version 1's default vocabulary
V2_KINDS = V1_KINDS + ("cross", "ring", "frame", "corner")  # version 2's default vocabulary
CONTAINER_KINDS = ("ring", "frame")  # kinds with a hole another shape can sit in
NONCONVEX_KINDS = ("cross", "ring", "frame", "corner")
HOLE_RATIO = 0.6  # ring / frame: inner radius (half side) over the outer one
CORNER_ARM = 0.45  # corner (an L): arm width over the side of its bounding square
SIZES = ("small", "medium", "large")  # ordered: each has twice the area of the one before
DIFFICULTIES = ("referring", "relational", "reasoning")
SPLITS = ("train", "val", "testA", "testB")
V2_SPLITS = SPLITS + ("ambiguous",)  # world v2 only: box-ambiguous scenes and targets
SPLIT_IDS = {name: i for i, name in enumerate(V2_SPLITS)}
TEST_DIFFICULTIES = {"testA": ("referring", "relational"), "testB": ("reasoning",)}
GRID_WORDS = (
    ("top left", "top", "top right"),
    ("left", "center", "right"),
    ("bottom left", "bottom", "bottom right"),
)
SPATIAL_EXTREMES = ("leftmost", "rightmost", "topmost", "bottommost")
SIZE_EXTREMES = ("largest", "smallest")
SPATIAL_RELATIONS = ("left of", "right of", "above", "below")
SIZE_RELATIONS = ("larger than", "smaller than")
RATIONALE_STYLES = ("target", "anchor", "scene", "reason")
VERSIONS = (1, 2)
# World v2's scenes: "plain" as in v1; the others are the scenes where a box is not enough.
SCENE_KINDS = ("plain", "overlap", "inside", "occluded")
AMBIGUOUS_SCENE_KINDS = SCENE_KINDS[1:]
V2_SCENE_WEIGHTS = {"plain": 0.4, "overlap": 0.2, "inside": 0.2, "occluded": 0.2}


@dataclass(frozen=True)
class ToyWorldConfig:
    """Everything that shapes the toy world; later pretraining recipes tune these fields.

    image_size:          side of the square image in pixels (112 = 8x8 patches of 14 px for
                         the toy Qwen2.5-VL, i.e. 16 image tokens after its 2x2 merge).
    min_shapes/max_shapes: shapes per scene (inclusive).
    kinds, colours:      vocabulary of the scenes (names from KINDS and PALETTE).
    size_fractions:      size category -> side of the square of equal area, as a fraction of
                         image_size (every kind of one category has the same area).
    max_occlusion:       the largest fraction of any shape that shapes on top may hide
                         (0 = shapes never overlap).
    min_center_gap:      shape centres differ by at least this fraction of image_size in x
                         AND in y, so spatial words are never near ties.
    difficulty_weights:  how often train/val samples are of each difficulty.
    background:          RGB of the background (before the ramp).
    background_gradient: add a smooth left-right / top-bottom colour ramp to the background
                         (an absolute-position cue in the pixels: with it the toy MLLM's box
                         IoU rose from 0.15 to 0.59, see lenslib.toy.pretrain_mllm).
    rationale_style:     "target" (only the target and where it is), "anchor" (also the
                         shape the expression compares with), "scene" (every shape) or
                         "reason" (the candidates, the comparison that decides, the target).
                         None = the version's default: "target" (v1), "reason" (v2).
    max_tries:           scene resamplings before giving up on a crowded configuration.
    version:             1 = the original world (the default; committed v1 weights, notebooks
                         and tests use it); 2 = world v2 (see the module docstring).
    kinds:               None = the version's default (V1_KINDS, or V2_KINDS with the
                         non-convex ring, frame, corner and cross).
    scene_weights:       version 2: how often train/val/test scenes are of each SCENE_KINDS
                         (None = V2_SCENE_WEIGHTS); version 1 must leave it None.
    """

    image_size: int = 112
    min_shapes: int = 2
    max_shapes: int = 4
    kinds: tuple[str, ...] | None = None
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple")
    size_fractions: dict[str, float] = field(
        default_factory=lambda: {"small": 0.18, "medium": 0.25, "large": 0.35}
    )
    max_occlusion: float = 0.25
    min_center_gap: float = 0.08
    difficulty_weights: dict[str, float] = field(
        default_factory=lambda: {"referring": 0.4, "relational": 0.3, "reasoning": 0.3}
    )
    background: tuple[int, int, int] = (0, 0, 0)
    background_gradient: bool = True
    rationale_style: str | None = None
    max_tries: int = 500
    version: int = 1
    scene_weights: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {self.version}")
        v2 = self.version == 2
        # None = the version's default (frozen dataclass: set once, here)
        if self.kinds is None:
            object.__setattr__(self, "kinds", V2_KINDS if v2 else V1_KINDS)
        if self.rationale_style is None:
            object.__setattr__(self, "rationale_style", "reason" if v2 else "target")
        if v2 and self.scene_weights is None:
            object.__setattr__(self, "scene_weights", dict(V2_SCENE_WEIGHTS))
        if not v2 and self.scene_weights is not None:
            raise ValueError("scene_weights are a world v2 option: set version=2")
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {self.image_size}")
        if not 1 <= self.min_shapes <= self.max_shapes:
            raise ValueError(
                f"need 1 <= min_shapes <= max_shapes, got {self.min_shapes}, {self.max_shapes}"
            )
        _check_names("kinds", self.kinds, KINDS)
        _check_names("colours", self.colours, tuple(PALETTE))
        _check_names("size_fractions", tuple(self.size_fractions), SIZES)
        if not all(0 < f < 1 for f in self.size_fractions.values()):
            raise ValueError(f"size_fractions must lie in (0, 1), got {self.size_fractions}")
        _check_names("difficulty_weights", tuple(self.difficulty_weights), DIFFICULTIES)
        if any(w < 0 for w in self.difficulty_weights.values()) or not any(
            w > 0 for w in self.difficulty_weights.values()
        ):
            raise ValueError(f"difficulty_weights need a positive one: {self.difficulty_weights}")
        if not 0 <= self.max_occlusion < 1:
            raise ValueError(f"max_occlusion must lie in [0, 1), got {self.max_occlusion}")
        if self.rationale_style not in RATIONALE_STYLES:
            raise ValueError(f"rationale_style must be one of {RATIONALE_STYLES}")
        if v2:
            _check_names("scene_weights", tuple(self.scene_weights), SCENE_KINDS)
            if any(w < 0 for w in self.scene_weights.values()) or not any(
                w > 0 for w in self.scene_weights.values()
            ):
                raise ValueError(f"scene_weights need a positive one: {self.scene_weights}")
            if not any(k in self.kinds for k in CONTAINER_KINDS):
                raise ValueError(f"world v2 needs a container kind {CONTAINER_KINDS} in kinds")
            if len([k for k in self.kinds if k not in CONTAINER_KINDS]) < 2:
                raise ValueError("world v2 needs at least two kinds that are not containers")

    @property
    def splits(self) -> tuple[str, ...]:
        """The splits this world has: v1 SPLITS, v2 also "ambiguous"."""
        return V2_SPLITS if self.version == 2 else SPLITS


def _check_names(what: str, names: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [n for n in names if n not in allowed]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"{what}: {list(names)} must be distinct names from {list(allowed)}")


@dataclass(frozen=True)
class Shape:
    """One shape of a scene. (cx, cy) is its centre and `side` the side of the square of the
    same area, both in pixels."""

    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    side: float

    @property
    def size_rank(self) -> int:
        return SIZES.index(self.size)


def half_extent(kind: str, side: float) -> float:
    """Half of the shape's width (= height) for an area of side**2."""
    if kind == "circle":
        return side / np.sqrt(np.pi)  # radius r with pi r^2 = side^2
    if kind in ("triangle", "diamond"):
        return side * np.sqrt(2) / 2  # base and height b with b^2 / 2 = side^2
    if kind == "cross":
        return side * 3 / np.sqrt(5) / 2  # plus sign with arms one third wide: 5/9 L^2
    if kind == "ring":  # annulus: pi (R^2 - (k R)^2) = side^2
        return side / np.sqrt(np.pi * (1 - HOLE_RATIO**2))
    if kind == "frame":  # square outline: (2H)^2 (1 - k^2) = side^2
        return side / (2 * np.sqrt(1 - HOLE_RATIO**2))
    if kind == "corner":  # an L: (2H)^2 - (2H (1 - a))^2 = side^2
        return side / (2 * np.sqrt(1 - (1 - CORNER_ARM) ** 2))
    return side / 2  # square


def hole_half_extent(kind: str, side: float) -> float:
    """Inner radius (ring) or inner half side (frame) of a container's hole; 0 otherwise."""
    if kind in CONTAINER_KINDS:
        return HOLE_RATIO * half_extent(kind, side)
    return 0.0


def shape_mask(shape: Shape, image_size: int) -> np.ndarray:
    """(S, S) bool: the pixels whose centres lie inside the shape."""
    y, x = np.mgrid[0:image_size, 0:image_size] + 0.5
    dx, dy = x - shape.cx, y - shape.cy
    r = half_extent(shape.kind, shape.side)
    if shape.kind == "circle":
        return dx**2 + dy**2 <= r**2
    if shape.kind == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape.kind == "diamond":
        return np.abs(dx) + np.abs(dy) <= r
    if shape.kind == "triangle":  # apex up; half-width grows from 0 at the top to r at the base
        return (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    if shape.kind == "cross":
        arm = r / 3
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        return inside & ((np.abs(dx) <= arm) | (np.abs(dy) <= arm))
    if shape.kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 > (HOLE_RATIO * r) ** 2)
    if shape.kind == "frame":
        outer = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        return outer & ~((np.abs(dx) <= HOLE_RATIO * r) & (np.abs(dy) <= HOLE_RATIO * r))
    if shape.kind == "corner":  # an L: left arm and bottom arm of the bounding square
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
        arm = 2 * r * CORNER_ARM
        return inside & ((dx <= -r + arm) | (dy >= r - arm))
    raise ValueError(f"unknown shape kind {shape.kind!r}")


def visible_masks(shapes: Sequence[Shape], image_size: int) -> list[np.ndarray]:
    """Visible pixels of each shape, drawn in order (later shapes cover earlier ones)."""
    full = [shape_mask(s, image_size) for s in shapes]
    visible = []
    for i, mask in enumerate(full):
        covered = np.zeros_like(mask)
        for above in full[i + 1 :]:
            covered |= above
        visible.append(mask & ~covered)
    return visible


def render(shapes: Sequence[Shape], config: ToyWorldConfig) -> np.ndarray:
    """(S, S, 3) uint8 RGB image of the scene."""
    size = config.image_size
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = config.background
    if config.background_gradient:
        ramp = np.linspace(0.0, 64.0, size)
        image[:, :, 0] += ramp[None, :]  # red grows to the right
        image[:, :, 2] += ramp[:, None]  # blue grows downwards
    image = np.clip(image, 0, 255).astype(np.uint8)
    for shape in shapes:
        image[shape_mask(shape, size)] = PALETTE[shape.colour]
    return image


def grid_word(box: Sequence[float], image_size: int) -> str:
    """Coarse position of a box centre on a 3x3 grid: "top left", ..., "center", ..."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    col = min(int(3 * cx / image_size), 2)
    row = min(int(3 * cy / image_size), 2)
    return GRID_WORDS[row][col]
