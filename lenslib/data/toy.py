"""The toy world: synthetic referring-segmentation scenes a tiny model can learn on a laptop.

Each image shows a few coloured shapes (circle, square, triangle, diamond, cross) on a plain
background. One shape is the target; a referring expression names it, at one of three
difficulties that mirror the benchmarks LENS is evaluated on:

==============  ===========================================  ===========================
difficulty      example                                      mirrors
==============  ===========================================  ===========================
``referring``   "the blue triangle", "the large circle"      RefCOCO (attributes)
``relational``  "the square left of the red circle",         RefCOCO+/g (space, other
                "the leftmost circle"                        objects)
``reasoning``   "the largest shape that is not red",         ReasonSeg (comparison,
                "the only shape of its colour"               negation, counting)
==============  ===========================================  ===========================

Splits carry the benchmark names: ``train`` and ``val`` mix the three difficulties with
``ToyWorldConfig.difficulty_weights``; ``testA`` holds referring + relational expressions
(the "easy" benchmarks) and ``testB`` reasoning expressions only (the ReasonSeg-like test).

**Every expression is unambiguous.** An expression is built from a small semantic *spec*
(`Describe`, `Extreme`, `Relate`, `SameColour`, `OnlyOne`); `resolve(spec, shapes)` evaluates
it against the scene and the generator keeps a spec only when exactly the target matches.
Relations compare shape centres, and scenes are sampled so that all centres differ by at
least ``min_center_gap`` in x and in y, so "left of" or "leftmost" is never a near tie.
Sizes are three categories whose areas double from one to the next (all kinds of one
category have the same area), so "larger" is always visible.

**Determinism.** Sample ``i`` of split ``s`` is drawn from ``numpy.random.default_rng([seed,
split_id, i])``: the same on every call and machine, and any sample can be made on its own.

**Masks and boxes.** Shapes are drawn in order, later ones on top; a sample's mask holds
exactly the target's *visible* pixels, and its box is the tight box of that mask with
exclusive x2/y2 edges (see `lenslib.data.masks`).

**Rationale.** A short chain of thought that is true of the scene and uses a small fixed
vocabulary, e.g. "The blue triangle is at the top left. It is the target." It always says
where the target is (a 3x3 grid word of its box centre), so the reasoning carries the
position the answer box needs. ``rationale_style`` picks how much it says (see
`ToyWorldConfig`).

Why the defaults look as they do: a tiny MLLM trained from scratch learns the answer format in
a minute but learns *where* things are slowly (facts file, section 9). Large shapes, few of
them, saturated colours and a dark background with a faint colour ramp (red grows to the right,
blue downwards, so every pixel "knows" where it is) keep localisation learnable; every one of
these is a field of `ToyWorldConfig`, so the pretraining recipes can tune them.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np

from lenslib.data.masks import mask_to_box
from lenslib.data.sample import SegSample

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
KINDS = ("circle", "square", "triangle", "diamond", "cross")
SIZES = ("small", "medium", "large")  # ordered: each has twice the area of the one before
DIFFICULTIES = ("referring", "relational", "reasoning")
SPLITS = ("train", "val", "testA", "testB")
SPLIT_IDS = {name: i for i, name in enumerate(SPLITS)}
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
RATIONALE_STYLES = ("target", "anchor", "scene")


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
                         IoU rose from 0.15 to 0.59, see lenslib.pretrain_mllm).
    rationale_style:     "target" (only the target and where it is), "anchor" (also the
                         shape the expression compares with) or "scene" (every shape).
    max_tries:           scene resamplings before giving up on a crowded configuration.
    """

    image_size: int = 112
    min_shapes: int = 2
    max_shapes: int = 4
    kinds: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
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
    rationale_style: str = "target"
    max_tries: int = 500

    def __post_init__(self) -> None:
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


def _check_names(what: str, names: Sequence[str], allowed: Sequence[str]) -> None:
    unknown = [n for n in names if n not in allowed]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(f"{what}: {list(names)} must be distinct names from {list(allowed)}")


# ------------------------------------------------------------------------------ scene geometry


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
    return side / 2  # square


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


# --------------------------------------------------------------------------- semantic specs


@dataclass(frozen=True)
class Filter:
    """A noun phrase: the shapes with these attributes ("large blue circle", "shape that is
    not red"). None means "any"."""

    kind: str | None = None
    colour: str | None = None
    size: str | None = None
    not_colour: str | None = None

    def matches(self, shape: Shape) -> bool:
        return (
            (self.kind is None or shape.kind == self.kind)
            and (self.colour is None or shape.colour == self.colour)
            and (self.size is None or shape.size == self.size)
            and (self.not_colour is None or shape.colour != self.not_colour)
        )

    def phrase(self, adjective: str | None = None) -> str:
        words = [w for w in (adjective, self.size, self.colour, self.kind or "shape") if w]
        text = " ".join(words)
        return f"{text} that is not {self.not_colour}" if self.not_colour else text


@dataclass(frozen=True)
class Describe:
    """ "the <filter>": the one shape with these attributes."""

    filter: Filter

    def text(self) -> str:
        return f"the {self.filter.phrase()}"


@dataclass(frozen=True)
class Extreme:
    """ "the <leftmost|...|largest|smallest> <filter>": the extreme one among the matches."""

    filter: Filter
    which: str

    def text(self) -> str:
        return f"the {self.filter.phrase(self.which)}"


@dataclass(frozen=True)
class Relate:
    """ "the <filter> <relation> the <anchor>": compared with one unique anchor shape."""

    filter: Filter
    relation: str
    anchor: Filter

    def text(self) -> str:
        return f"the {self.filter.phrase()} {self.relation} the {self.anchor.phrase()}"


@dataclass(frozen=True)
class SameColour:
    """ "the <filter> with the same colour as the <anchor>"."""

    filter: Filter
    anchor: Filter

    def text(self) -> str:
        return f"the {self.filter.phrase()} with the same colour as the {self.anchor.phrase()}"


@dataclass(frozen=True)
class OnlyOne:
    """ "the only shape of its <colour|kind>": the shape whose colour (kind) no other has."""

    attribute: str

    def text(self) -> str:
        return f"the only shape of its {self.attribute}"


Spec = Describe | Extreme | Relate | SameColour | OnlyOne


def _extreme_key(shape: Shape, which: str) -> float:
    """Bigger key = more extreme."""
    return {
        "leftmost": -shape.cx,
        "rightmost": shape.cx,
        "topmost": -shape.cy,
        "bottommost": shape.cy,
        "largest": shape.size_rank,
        "smallest": -shape.size_rank,
    }[which]


def _relation_holds(shape: Shape, anchor: Shape, relation: str) -> bool:
    """Spatial relations compare centres; size relations compare size categories."""
    return {
        "left of": shape.cx < anchor.cx,
        "right of": shape.cx > anchor.cx,
        "above": shape.cy < anchor.cy,
        "below": shape.cy > anchor.cy,
        "larger than": shape.size_rank > anchor.size_rank,
        "smaller than": shape.size_rank < anchor.size_rank,
    }[relation]


def resolve(spec: Spec, shapes: Sequence[Shape]) -> set[int]:
    """Indices of the shapes the expression can refer to; a valid expression gives exactly one.

    An anchor ("the red circle" in "the square left of the red circle") must itself be unique;
    if it is not, the expression resolves to nothing.
    """
    matching = [i for i, s in enumerate(shapes) if getattr(spec, "filter", Filter()).matches(s)]
    if isinstance(spec, Describe):
        return set(matching)
    if isinstance(spec, Extreme):
        if not matching:
            return set()
        best = max(_extreme_key(shapes[i], spec.which) for i in matching)
        return {i for i in matching if _extreme_key(shapes[i], spec.which) == best}
    if isinstance(spec, OnlyOne):
        counts = Counter(getattr(s, spec.attribute) for s in shapes)
        return {i for i, s in enumerate(shapes) if counts[getattr(s, spec.attribute)] == 1}
    anchors = [i for i, s in enumerate(shapes) if spec.anchor.matches(s)]
    if len(anchors) != 1:
        return set()
    a = anchors[0]
    if isinstance(spec, Relate):
        return {
            i for i in matching if i != a and _relation_holds(shapes[i], shapes[a], spec.relation)
        }
    if isinstance(spec, SameColour):
        return {i for i in matching if i != a and shapes[i].colour == shapes[a].colour}
    raise TypeError(f"unknown spec {spec!r}")


# ------------------------------------------------------------------------ candidate specs


def _attribute_filters(shape: Shape) -> list[Filter]:
    """Every non-empty combination of the shape's kind, colour and size."""
    filters = []
    for use_kind, use_colour, use_size in itertools.product((True, False), repeat=3):
        if use_kind or use_colour or use_size:
            filters.append(
                Filter(
                    kind=shape.kind if use_kind else None,
                    colour=shape.colour if use_colour else None,
                    size=shape.size if use_size else None,
                )
            )
    return filters


def _coarse_filters(shape: Shape) -> list[Filter]:
    """The looser noun phrases used with relations: "shape", kind, colour, colour + kind."""
    return [
        Filter(),
        Filter(kind=shape.kind),
        Filter(colour=shape.colour),
        Filter(kind=shape.kind, colour=shape.colour),
    ]


def _anchor_filter(shapes: Sequence[Shape], index: int) -> Filter | None:
    """The shortest description that picks out shape `index` alone (kind, colour, ...)."""
    shape = shapes[index]
    for candidate in (
        Filter(kind=shape.kind),
        Filter(colour=shape.colour),
        Filter(kind=shape.kind, colour=shape.colour),
        Filter(kind=shape.kind, colour=shape.colour, size=shape.size),
    ):
        if resolve(Describe(candidate), shapes) == {index}:
            return candidate
    return None


def candidate_specs(shapes: Sequence[Shape], target: int, difficulty: str) -> list[Spec]:
    """All expressions of one difficulty that could name `target` (not yet checked)."""
    shape = shapes[target]
    anchors = [(a, _anchor_filter(shapes, a)) for a in range(len(shapes)) if a != target]
    anchors = [(a, f) for a, f in anchors if f is not None]
    other_colours = sorted({s.colour for s in shapes} - {shape.colour})
    if difficulty == "referring":
        return [Describe(f) for f in _attribute_filters(shape)]
    if difficulty == "relational":
        specs: list[Spec] = [
            Extreme(f, w) for f in _coarse_filters(shape)[:3] for w in SPATIAL_EXTREMES
        ]
        specs += [
            Relate(f, rel, anchor)
            for f in _coarse_filters(shape)
            for rel in SPATIAL_RELATIONS
            for _, anchor in anchors
        ]
        return specs
    if difficulty == "reasoning":
        negated = [Filter(not_colour=c) for c in other_colours]
        negated += [Filter(kind=shape.kind, not_colour=c) for c in other_colours]
        specs = [Describe(f) for f in negated]
        specs += [
            Extreme(f, w) for f in _coarse_filters(shape)[:3] + negated for w in SIZE_EXTREMES
        ]
        specs += [
            Relate(f, rel, anchor)
            for f in _coarse_filters(shape)[:2]
            for rel in SIZE_RELATIONS
            for _, anchor in anchors
        ]
        specs += [
            SameColour(f, anchor) for f in _coarse_filters(shape)[:2] for _, anchor in anchors
        ]
        specs += [OnlyOne("colour"), OnlyOne("kind")]
        return specs
    raise ValueError(f"unknown difficulty {difficulty!r}; expected one of {DIFFICULTIES}")


def _compares_several(spec: Spec, shapes: Sequence[Shape]) -> bool:
    """A superlative needs at least two candidates ("the smallest circle" with one circle is
    true but misleading), so Extreme specs whose noun phrase matches one shape are dropped."""
    if not isinstance(spec, Extreme):
        return True
    return sum(spec.filter.matches(s) for s in shapes) >= 2


def _needs_context(spec: Spec, shapes: Sequence[Shape], target: int) -> bool:
    """True if the spec's noun phrase alone would NOT pick out the target (so the relation or
    the superlative does real work). Used to prefer such specs for the relational level."""
    noun = getattr(spec, "filter", None)
    return noun is None or resolve(Describe(noun), shapes) != {target}


def valid_specs(shapes: Sequence[Shape], target: int, difficulty: str) -> list[Spec]:
    """The candidates that resolve to exactly the target (relational: those that need the
    relation, when there are any)."""
    valid = [
        s
        for s in candidate_specs(shapes, target, difficulty)
        if resolve(s, shapes) == {target} and _compares_several(s, shapes)
    ]
    if difficulty == "relational":
        needed = [s for s in valid if _needs_context(s, shapes, target)]
        return needed or valid
    return valid


def _template(spec: Spec) -> str:
    """A spec's template name, e.g. "Relate:left of", "Extreme:largest"."""
    detail = getattr(spec, "relation", None) or getattr(spec, "which", None)
    if isinstance(spec, Describe) and spec.filter.not_colour:
        detail = "not"
    return type(spec).__name__ + (f":{detail}" if detail else "")


def choose_spec(specs: Sequence[Spec], rng: np.random.Generator) -> Spec:
    """Pick a template uniformly, then a spec of it, so rare templates are not drowned."""
    by_template: dict[str, list[Spec]] = {}
    for spec in specs:
        by_template.setdefault(type(spec).__name__, []).append(spec)
    names = sorted(by_template)
    group = by_template[names[rng.integers(len(names))]]
    return group[rng.integers(len(group))]


# -------------------------------------------------------------------------------- rationale


def describe_for_rationale(shapes: Sequence[Shape], index: int) -> str:
    """ "blue triangle", or "large blue triangle" when colour + kind is not unique."""
    shape = shapes[index]
    short = Filter(kind=shape.kind, colour=shape.colour)
    if resolve(Describe(short), shapes) == {index}:
        return short.phrase()
    return Filter(kind=shape.kind, colour=shape.colour, size=shape.size).phrase()


def rationale(
    shapes: Sequence[Shape],
    boxes: Sequence[Sequence[float]],
    target: int,
    spec: Spec,
    config: ToyWorldConfig,
) -> str:
    """A short chain of thought that is true of the scene (see ToyWorldConfig.rationale_style).

    target: "The blue triangle is at the top left. It is the target."
    anchor: "The red circle is at the center. The blue triangle is at the top left. It is the
             target." (the anchor sentence only when the expression has an anchor)
    scene:  one sentence per shape, left to right, then "The blue triangle is the target."
    """
    size = config.image_size

    def where(i: int) -> str:
        return f"The {describe_for_rationale(shapes, i)} is at the {grid_word(boxes[i], size)}."

    if config.rationale_style == "scene":
        order = sorted(range(len(shapes)), key=lambda i: shapes[i].cx)
        sentences = [where(i) for i in order]
        sentences.append(f"The {describe_for_rationale(shapes, target)} is the target.")
        return " ".join(sentences)
    sentences = [where(target), "It is the target."]
    anchor = getattr(spec, "anchor", None)
    if config.rationale_style == "anchor" and anchor is not None:
        (a,) = resolve(Describe(anchor), shapes)
        sentences.insert(0, where(a))
    return " ".join(sentences)


# ------------------------------------------------------------------------------- the world


@dataclass
class Scene:
    """A sampled scene: shapes in drawing order, their visible masks and boxes, the image."""

    shapes: list[Shape]
    visible: list[np.ndarray]  # (S, S) bool each
    boxes: list[tuple[float, float, float, float]]
    image: np.ndarray  # (S, S, 3) uint8


class ToyWorld:
    """Deterministic generator of toy samples: ``ToyWorld(config, seed).sample("train", 7)``."""

    def __init__(self, config: ToyWorldConfig | None = None, seed: int = 0) -> None:
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.config = config or ToyWorldConfig()
        self.seed = int(seed)

    def rng(self, split: str, index: int) -> np.random.Generator:
        """The generator of sample `index` of `split`, independent of every other sample."""
        if split not in SPLIT_IDS:
            raise ValueError(f"unknown toy split {split!r}; expected one of {SPLITS}")
        if index < 0:
            raise IndexError(f"sample index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, SPLIT_IDS[split], int(index)])

    def difficulties(self, split: str) -> tuple[tuple[str, ...], np.ndarray]:
        """The difficulties a split draws from, with their probabilities."""
        if split in TEST_DIFFICULTIES:
            names = TEST_DIFFICULTIES[split]
            return names, np.full(len(names), 1 / len(names))
        names = tuple(d for d in DIFFICULTIES if self.config.difficulty_weights.get(d, 0) > 0)
        weights = np.array([self.config.difficulty_weights[d] for d in names], dtype=np.float64)
        return names, weights / weights.sum()

    def sample_scene(self, rng: np.random.Generator) -> Scene:
        """Draw shapes and place them (centres apart, occlusion bounded); render the image."""
        cfg = self.config
        for _ in range(cfg.max_tries):
            n = int(rng.integers(cfg.min_shapes, cfg.max_shapes + 1))
            shapes = self._place(
                [
                    (
                        cfg.kinds[rng.integers(len(cfg.kinds))],
                        cfg.colours[rng.integers(len(cfg.colours))],
                        tuple(cfg.size_fractions)[rng.integers(len(cfg.size_fractions))],
                    )
                    for _ in range(n)
                ],
                rng,
            )
            if shapes is not None:
                visible = visible_masks(shapes, cfg.image_size)
                boxes = [mask_to_box(v) for v in visible]
                return Scene(shapes, visible, boxes, render(shapes, cfg))
        raise RuntimeError(
            f"could not place {cfg.min_shapes}-{cfg.max_shapes} shapes in {cfg.max_tries} tries; "
            "use fewer or smaller shapes, a larger image, a smaller min_center_gap or more "
            "max_occlusion"
        )

    def _place(
        self, attributes: list[tuple[str, str, str]], rng: np.random.Generator
    ) -> list[Shape] | None:
        """Random centres that keep every shape inside the image, centres `min_center_gap`
        apart in x and y, and at most `max_occlusion` of each shape hidden; None on failure."""
        cfg = self.config
        size, gap = cfg.image_size, cfg.min_center_gap * cfg.image_size
        shapes: list[Shape] = []
        full: list[np.ndarray] = []
        for kind, colour, size_name in attributes:
            side = cfg.size_fractions[size_name] * size
            r = half_extent(kind, side)
            if 2 * r >= size:
                return None
            for _ in range(30):
                cx, cy = rng.uniform(r, size - r, 2)
                if any(abs(cx - s.cx) < gap or abs(cy - s.cy) < gap for s in shapes):
                    continue
                shape = Shape(kind, colour, size_name, float(cx), float(cy), float(side))
                mask = shape_mask(shape, size)
                if self._occlusion_ok(full + [mask]):
                    shapes.append(shape)
                    full.append(mask)
                    break
            else:
                return None
        return shapes

    def _occlusion_ok(self, full: list[np.ndarray]) -> bool:
        covered = np.zeros_like(full[0])
        for mask in reversed(full):  # from the top shape down
            area = mask.sum()
            if area == 0 or (mask & ~covered).sum() < (1 - self.config.max_occlusion) * area:
                return False
            covered |= mask
        return True

    def scene_and_spec(self, split: str, index: int) -> tuple[Scene, int, Spec, str]:
        """The scene, target index, expression spec and difficulty of one sample."""
        rng = self.rng(split, index)
        names, probs = self.difficulties(split)
        difficulty = names[rng.choice(len(names), p=probs)]
        for _ in range(self.config.max_tries):
            scene = self.sample_scene(rng)
            targets = rng.permutation(len(scene.shapes))
            for target in targets:
                specs = valid_specs(scene.shapes, int(target), difficulty)
                if specs:
                    return scene, int(target), choose_spec(specs, rng), difficulty
        raise RuntimeError(f"no {difficulty} expression found in {self.config.max_tries} scenes")

    def sample(self, split: str, index: int) -> SegSample:
        """Sample `index` of `split`: the same on every call and machine."""
        scene, target, spec, difficulty = self.scene_and_spec(split, index)
        box = scene.boxes[target]
        return SegSample(
            image=scene.image,
            text=spec.text(),
            mask=scene.visible[target].astype(np.uint8),
            box=box,
            rationale=rationale(scene.shapes, scene.boxes, target, spec, self.config),
            sample_id=f"toy/{split}/{index:07d}",
            source="toy",
            meta={
                "difficulty": difficulty,
                "split": split,
                "template": _template(spec),
                "position": grid_word(box, self.config.image_size),
                "target_index": target,
                "shapes": list(scene.shapes),
                "spec": spec,
                "category": scene.shapes[target].kind,
            },
        )

    def split(self, split: str, n: int, start: int = 0) -> list[SegSample]:
        """Samples start .. start + n - 1 of a split, as a list."""
        return [self.sample(split, i) for i in range(start, start + n)]


class ToyDataset:
    """A map-style dataset (``__len__`` + ``__getitem__``, what torch's DataLoader needs) of
    the first `length` samples of a toy split; samples are generated on access."""

    def __init__(self, world: ToyWorld, split: str, length: int) -> None:
        world.rng(split, 0)  # validates the split name
        self.world, self.split_name, self.length = world, split, int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> SegSample:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} samples")
        return self.world.sample(self.split_name, index % self.length)


# ---------------------------------------------------------------------------------- corpus


def toy_corpus(config: ToyWorldConfig | None = None) -> Iterator[str]:
    """Every word the world can write, in sentences of its templates (for a tokenizer).

    Not every possible expression (there are too many combinations), but every template with
    every value in every slot, so each word and each word-pair a template makes appears. The
    expressions double as the answer's "label".
    """
    cfg = config or ToyWorldConfig()
    sizes = tuple(cfg.size_fractions)
    filters = [Filter(kind=k) for k in cfg.kinds] + [Filter(colour=c) for c in cfg.colours]
    filters += [Filter(size=s) for s in sizes] + [Filter()]
    full = [
        Filter(kind=k, colour=c, size=s)
        for k, c, s in itertools.product(cfg.kinds + (None,), cfg.colours, sizes)
    ]
    negated = [Filter(kind=k, not_colour=c) for k in cfg.kinds + (None,) for c in cfg.colours]
    for f in filters + full + negated:
        yield Describe(f).text()
    for f, which in itertools.product(filters + negated, SPATIAL_EXTREMES + SIZE_EXTREMES):
        yield Extreme(f, which).text()
    for f, rel in itertools.product(filters, SPATIAL_RELATIONS + SIZE_RELATIONS):
        for anchor in filters + full:
            yield Relate(f, rel, anchor).text()
    for f, anchor in itertools.product(filters, filters + full):
        yield SameColour(f, anchor).text()
    yield OnlyOne("colour").text()
    yield OnlyOne("kind").text()
    for f, row in itertools.product(full, GRID_WORDS):
        for word in row:
            yield f"The {f.phrase()} is at the {word}. It is the target."
            yield f"The {f.phrase()} is the target."


__all__ = [
    "DIFFICULTIES",
    "KINDS",
    "PALETTE",
    "SIZES",
    "SPLITS",
    "TEST_DIFFICULTIES",
    "Describe",
    "Extreme",
    "Filter",
    "OnlyOne",
    "Relate",
    "SameColour",
    "Scene",
    "Shape",
    "Spec",
    "ToyDataset",
    "ToyWorld",
    "ToyWorldConfig",
    "candidate_specs",
    "grid_word",
    "rationale",
    "render",
    "resolve",
    "shape_mask",
    "toy_corpus",
    "valid_specs",
    "visible_masks",
]
