"""Referring expressions of the toy world: semantic specs, the resolver and spec choice.

An expression is built from a small semantic *spec* (`Describe`, `Extreme`, `Relate`,
`SameColour`, `OnlyOne`, each over a `Filter` noun phrase); `spec.text()` writes it and
`resolve(spec, shapes)` evaluates it against a scene. `candidate_specs` lists the expressions of
one difficulty that could name a target, `valid_specs` keeps those that resolve to exactly the
target, and `choose_spec` picks one. So **every expression is unambiguous**. Relations compare
shape centres (the generator keeps centres apart, so "left of" is never a near tie) or size
categories.

==============  ===========================================  ===========================
difficulty      example                                      mirrors
==============  ===========================================  ===========================
``referring``   "the blue triangle", "the large circle"      RefCOCO (attributes)
``relational``  "the square left of the red circle",         RefCOCO+/g (space, other
                "the leftmost circle"                        objects)
``reasoning``   "the largest shape that is not red",         ReasonSeg (comparison,
                "the only shape of its colour"               negation, counting)
==============  ===========================================  ===========================
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lenslib.toy.world import (
    DIFFICULTIES,
    SIZE_EXTREMES,
    SIZE_RELATIONS,
    SPATIAL_EXTREMES,
    SPATIAL_RELATIONS,
    Shape,
)


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


def clear_margin(spec: Spec, shapes: Sequence[Shape], gap: float) -> bool:
    """True unless a spatial word would compare shapes closer than `gap` pixels on its axis.

    World v2 puts shapes on (nearly) the same centre (one in front of or inside another), so
    "left of" or "the topmost" between them would be a near tie: such specs are not used.
    (World v1 keeps all centres `gap` apart, so there it is always True.)
    """
    if gap <= 0:
        return True
    if isinstance(spec, Extreme) and spec.which in SPATIAL_EXTREMES:
        keys = sorted(
            (_extreme_key(s, spec.which) for s in shapes if spec.filter.matches(s)), reverse=True
        )
        return len(keys) < 2 or keys[0] - keys[1] >= gap
    if isinstance(spec, Relate) and spec.relation in SPATIAL_RELATIONS:
        anchors = [i for i, s in enumerate(shapes) if spec.anchor.matches(s)]
        if len(anchors) != 1:
            return True  # resolves to nothing anyway
        axis = "cx" if spec.relation in ("left of", "right of") else "cy"
        at = getattr(shapes[anchors[0]], axis)
        return all(
            abs(getattr(s, axis) - at) >= gap
            for i, s in enumerate(shapes)
            if i != anchors[0] and spec.filter.matches(s)
        )
    return True


def valid_specs(
    shapes: Sequence[Shape], target: int, difficulty: str, min_gap: float = 0.0
) -> list[Spec]:
    """The candidates that resolve to exactly the target (relational: those that need the
    relation, when there are any); with `min_gap` > 0 (world v2) only spatial words whose
    comparisons have that margin (`clear_margin`)."""
    valid = [
        s
        for s in candidate_specs(shapes, target, difficulty)
        if resolve(s, shapes) == {target}
        and _compares_several(s, shapes)
        and clear_margin(s, shapes, min_gap)
    ]
    if difficulty == "relational":
        needed = [s for s in valid if _needs_context(s, shapes, target)]
        return needed or valid
    return valid


def spec_template(spec: Spec) -> str:
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
