"""Rationales of the toy world: a short chain of thought that is true of the scene.

It uses a small fixed vocabulary, e.g. "The blue triangle is at the top left. It is the
target.", and always says where the target is (the 3x3 grid word of its box centre), so the
reasoning carries the position the answer box needs. ``ToyWorldConfig.rationale_style`` picks
how much it says: only the target, also the expression's anchor shape, or every shape.

The "reason" style (world v2's default) reasons as the paper's prompt asks ("analyse all
objects, compare candidates, select"): it names the candidates the question is about, with the
attribute the comparison needs, then the comparison that decides and where the target is:

    "Not green: the purple circle (large), the yellow square (small). The largest is the
     purple circle, at the top left."

`reason_corpus` lists every word it can write (for the tokenizer). `named_shape` reads back
which shape an answer's rationale settles on (its last naming: "... is the purple circle, at
the top left."), so an evaluation can count answers that name the wrong shape.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator, Sequence

from lenslib.toy.expressions import (
    Describe,
    Extreme,
    Filter,
    OnlyOne,
    Relate,
    SameColour,
    Spec,
    resolve,
)
from lenslib.toy.world import (
    GRID_WORDS,
    SIZE_EXTREMES,
    SIZE_RELATIONS,
    SIZES,
    SPATIAL_EXTREMES,
    SPATIAL_RELATIONS,
    Shape,
    ToyWorldConfig,
    grid_word,
)


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
    if config.rationale_style == "reason":
        return reasoned_rationale(shapes, boxes, target, spec, size)

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


# ------------------------------------------------------------------------- "reason" style


def plural(kind: str) -> str:
    """ "circle" -> "circles", "cross" -> "crosses"."""
    return kind + ("es" if kind.endswith("s") else "s")


def group_header(noun: Filter) -> str:
    """The name of a group of candidates: "Circles", "Large red shapes", "Not green",
    "Circles not green" (capitalised, as it opens a sentence)."""
    words = [w for w in (noun.size, noun.colour) if w]
    if noun.kind or words or not noun.not_colour:
        words.append(plural(noun.kind) if noun.kind else "shapes")
    if noun.not_colour:
        words += ["not", noun.not_colour]
    text = " ".join(words)
    return text[0].upper() + text[1:]


def relation_opening(relation: str) -> str:
    """ "left of" -> "Left of" (the opening of the deciding sentence of a relation)."""
    return relation[0].upper() + relation[1:]


def reasoned_rationale(
    shapes: Sequence[Shape],
    boxes: Sequence[Sequence[float]],
    target: int,
    spec: Spec,
    image_size: int,
) -> str:
    """Candidates, the comparison that decides, the target and where it is (see the module
    docstring). Every sentence is true of the scene (tests check each claim with `resolve`).

    Describe:   "Shapes: the red circle (large), ... The large shape is the red circle, at
                 the top left." ("The red circle is at the top left." when the phrase is
                 the target's name)
    Extreme:    "<Group>: <candidates (size | grid word)>. The largest is the ..., at ..."
    Relate:     "The <anchor> is at the <grid word> | is <size>. <Group>: <candidates but
                 the anchor>. Left of it is the ..., at ..."
    SameColour: "The <anchor> is red. <Group>: <candidates but the anchor>. Also red is the
                 ..., at ..."
    OnlyOne:    "Shapes: <all>. The only blue one | The only circle is the ..., at ..."
    """

    def name(i: int) -> str:
        return describe_for_rationale(shapes, i)

    def where(i: int) -> str:
        return grid_word(boxes[i], image_size)

    def listing(noun: Filter, note, skip: int | None = None) -> str:
        members = [i for i, s in enumerate(shapes) if noun.matches(s) and i != skip]
        items = [f"the {name(i)}" + (f" ({note(i)})" if note else "") for i in members]
        return f"{group_header(noun)}: {', '.join(items)}."

    def size_of(i: int) -> str:
        return shapes[i].size

    ending = f"the {name(target)}, at the {where(target)}."
    if isinstance(spec, Describe):
        noun = spec.filter
        first = listing(Filter(), size_of if noun.size else None)
        if noun.phrase() == name(target):
            return f"{first} The {name(target)} is at the {where(target)}."
        return f"{first} The {noun.phrase()} is {ending}"
    if isinstance(spec, Extreme):
        note = size_of if spec.which in SIZE_EXTREMES else where
        return f"{listing(spec.filter, note)} The {spec.which} is {ending}"
    if isinstance(spec, Relate | SameColour):
        (a,) = resolve(Describe(spec.anchor), shapes)
        if isinstance(spec, SameColour):
            colour = shapes[a].colour
            about = f"The {name(a)} is {colour}."
            return f"{about} {listing(spec.filter, None, skip=a)} Also {colour} is {ending}"
        by_size = spec.relation in SIZE_RELATIONS
        if by_size:
            about = f"The {name(a)} is {shapes[a].size}."
        else:
            about = f"The {name(a)} is at the {where(a)}."
        note = size_of if by_size else where
        opening = relation_opening(spec.relation)
        return f"{about} {listing(spec.filter, note, skip=a)} {opening} it is {ending}"
    if isinstance(spec, OnlyOne):
        value = getattr(shapes[target], spec.attribute)
        only = f"The only {value} one" if spec.attribute == "colour" else f"The only {value}"
        return f"{listing(Filter(), None)} {only} is {ending}"
    raise TypeError(f"unknown spec {spec!r}")


def reason_corpus(config: ToyWorldConfig) -> Iterator[str]:
    """Sentences with every word and symbol the "reason" style can write for `config`."""
    sizes = tuple(config.size_fractions)
    kinds, colours = config.kinds, config.colours
    nouns = [Filter()] + [Filter(kind=k) for k in kinds]
    nouns += [Filter(colour=c) for c in colours] + [Filter(size=s) for s in sizes]
    nouns += [Filter(kind=k, not_colour=c) for k in (*kinds, None) for c in colours]
    nouns += [Filter(kind=k, colour=c) for k, c in itertools.product(kinds, colours)]
    names = [
        Filter(kind=k, colour=c, size=s).phrase()
        for k, c, s in itertools.product(kinds, colours, sizes)
    ]
    notes = [*sizes, *(w for row in GRID_WORDS for w in row)]
    for noun in nouns:
        items = ", ".join(f"the {n} ({note})" for n, note in zip(names, itertools.cycle(notes)))
        yield f"{group_header(noun)}: {items}."
        yield f"The {noun.phrase()} is the {names[0]}, at the {GRID_WORDS[0][0]}."
    for n, row in itertools.product(names, GRID_WORDS):
        for word in row:
            yield f"The {n} is at the {word}. The largest is the {n}, at the {word}."
    for which in SPATIAL_EXTREMES + SIZE_EXTREMES:
        yield f"The {which} is the {names[0]}, at the {GRID_WORDS[1][1]}."
    for relation in SPATIAL_RELATIONS + SIZE_RELATIONS:
        yield f"{relation_opening(relation)} it is the {names[0]}, at the {GRID_WORDS[1][1]}."
    for c in colours:
        yield f"The {names[0]} is {c}. Also {c} is the {names[0]}. The only {c} one is."
    for value in (*sizes, *kinds):
        yield f"The {names[0]} is {value}. The only {value} is the {names[0]}."


def named_shape(answer: str, config: ToyWorldConfig) -> tuple[str | None, str, str] | None:
    """(size or None, colour, kind) of the LAST shape an answer's rationale names (the target
    the reasoning settles on, in every rationale style), or None if it names none."""
    think = answer.split("</think>")[0]
    sizes, colours = "|".join(SIZES), "|".join(config.colours)
    kinds = "|".join(config.kinds)
    found = re.findall(rf"\b(?:({sizes}) )?({colours}) ({kinds})\b", think)
    if not found:
        return None
    size, colour, kind = found[-1]
    return size or None, colour, kind


def names_target(answer: str, shapes: Sequence[Shape], target: int, config: ToyWorldConfig) -> bool:
    """Whether the shape an answer's rationale settles on (`named_shape`) is `shapes[target]`
    (its size is compared only when the answer gives one)."""
    named = named_shape(answer, config)
    if named is None:
        return False
    size, colour, kind = named
    shape = shapes[target]
    return (colour, kind) == (shape.colour, shape.kind) and size in (None, shape.size)
