"""Rationales of the toy world: a short chain of thought that is true of the scene.

It uses a small fixed vocabulary, e.g. "The blue triangle is at the top left. It is the
target.", and always says where the target is (the 3x3 grid word of its box centre), so the
reasoning carries the position the answer box needs. ``ToyWorldConfig.rationale_style`` picks
how much it says: only the target, also the expression's anchor shape, or every shape.
"""

from __future__ import annotations

from collections.abc import Sequence

from lenslib.toy.expressions import Describe, Filter, Spec, resolve
from lenslib.toy.world import Shape, ToyWorldConfig, grid_word


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
