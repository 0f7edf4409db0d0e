"""Tests of world v2 (lenslib.toy, ToyWorldConfig(version=2)): the scenes where a box is not
enough, the "ambiguous" split, the reasoning rationales (each claim checked with the resolver)
and that version 1 stays the default."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest

from lenslib.data.masks import mask_to_box
from lenslib.toy import (
    PALETTE,
    Describe,
    Extreme,
    Filter,
    OnlyOne,
    Relate,
    Shape,
    ToyWorld,
    ToyWorldConfig,
    grid_word,
    resolve,
    shape_mask,
    toy_corpus,
    visible_masks,
)
from lenslib.toy.generator import AMBIGUITY_MIN, box_ambiguity, box_iou
from lenslib.toy.rationales import group_header, plural
from lenslib.toy.world import (
    CONTAINER_KINDS,
    GRID_WORDS,
    SCENE_KINDS,
    SIZE_EXTREMES,
    SIZE_RELATIONS,
    SIZES,
    SPATIAL_EXTREMES,
    SPATIAL_RELATIONS,
    SPLITS,
    V1_KINDS,
    V2_KINDS,
    V2_SPLITS,
    hole_half_extent,
)

V2 = ToyWorldConfig(version=2)
SIZE = V2.image_size


@pytest.fixture(scope="module")
def v2_samples():
    """60 samples of every v2 split from two seeds."""
    out = {}
    for seed in (0, 1):
        world = ToyWorld(V2, seed=seed)
        for split in V2_SPLITS:
            out.setdefault(split, []).extend(world.split(split, 30))
    return out


# ------------------------------------------------------------------------------ the option


def test_version_1_stays_the_default():
    cfg = ToyWorldConfig()
    assert cfg.version == 1 and cfg.kinds == V1_KINDS and cfg.rationale_style == "target"
    assert cfg.scene_weights is None and cfg.splits == SPLITS
    with pytest.raises(ValueError, match="ambiguous"):
        ToyWorld(cfg).sample("ambiguous", 0)
    with pytest.raises(ValueError, match="version=2"):
        ToyWorldConfig(scene_weights={"plain": 1.0})
    assert not {"scene_kind", "key_shapes", "box_ambiguity"} & set(ToyWorld().sample("val", 0).meta)


def test_version_2_defaults_and_validation():
    assert V2.kinds == V2_KINDS and V2.rationale_style == "reason"
    assert set(V2.scene_weights) == set(SCENE_KINDS) and V2.splits == V2_SPLITS
    with pytest.raises(ValueError, match="version"):
        ToyWorldConfig(version=3)
    with pytest.raises(ValueError, match="container"):
        ToyWorldConfig(version=2, kinds=("circle", "square"))
    with pytest.raises(ValueError, match="scene_weights"):
        ToyWorldConfig(version=2, scene_weights={"plain": 0.0})


def test_v1_vocabulary_is_unchanged_and_v2_adds_to_it():
    v1_words = {w for line in toy_corpus() for w in line.split()}
    v2_words = {w for line in toy_corpus(V2) for w in line.split()}
    assert v1_words < v2_words
    assert not {"ring", "frame", "corner", "cross", "Not"} & v1_words
    assert {"ring", "frame", "corner", "cross", "Not", "Circles"} <= v2_words


def test_world_config_json_round_trip_keeps_the_version():
    from dataclasses import asdict

    from lenslib.toy.models import world_config_from_dict

    assert world_config_from_dict(asdict(V2)) == V2
    assert world_config_from_dict({}) == ToyWorldConfig()


# ----------------------------------------------------------------------- geometry of v2 kinds


@pytest.mark.parametrize("kind", CONTAINER_KINDS)
def test_containers_have_an_empty_hole(kind):
    shape = Shape(kind, "red", "large", 56.0, 56.0, 39.2)
    mask = shape_mask(shape, SIZE)
    hole = hole_half_extent(kind, shape.side)
    assert not mask[56 - int(hole) + 1 : 56 + int(hole) - 1, 56].any()
    assert mask[56, 56 + int(hole) + 2]  # the band just outside the hole


def test_corner_is_an_l():
    mask = shape_mask(Shape("corner", "red", "large", 56.0, 56.0, 39.2), SIZE)
    ys, xs = np.nonzero(mask)
    x1, y1, x2, y2 = xs.min(), ys.min(), xs.max(), ys.max()
    assert mask[y2, x1] and mask[y1, x1] and mask[y2, x2]  # three corners of its box
    assert not mask[y1, x2]  # the top right one is cut out


# ------------------------------------------------------------------------------ the scenes


def test_samples_are_deterministic():
    a = ToyWorld(V2, seed=4).sample("ambiguous", 3)
    b = ToyWorld(V2, seed=4).sample("ambiguous", 3)
    assert a.text == b.text and a.rationale == b.rationale
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)


def test_every_scene_kind_appears_and_ambiguous_has_no_plain_scene(v2_samples):
    kinds = Counter(s.meta["scene_kind"] for s in v2_samples["train"] + v2_samples["val"])
    assert set(kinds) == set(SCENE_KINDS)
    assert "plain" not in {s.meta["scene_kind"] for s in v2_samples["ambiguous"]}
    nonconvex = {
        shape.kind for split in v2_samples.values() for s in split for shape in s.meta["shapes"]
    }
    assert {"ring", "frame", "corner", "cross"} <= nonconvex


def test_mask_is_the_visible_target_and_box_its_tight_box(v2_samples):
    for split in v2_samples.values():
        for s in split:
            shapes, target = s.meta["shapes"], s.meta["target_index"]
            assert np.array_equal(s.mask == 1, visible_masks(shapes, SIZE)[target])
            assert s.box == mask_to_box(s.mask)
            colour = np.array(PALETTE[shapes[target].colour], dtype=np.uint8)
            assert np.all(s.image[s.mask == 1] == colour)
            assert len({(x.kind, x.colour, x.size) for x in shapes}) == len(shapes)


def test_key_pairs_are_what_their_scene_kind_says(v2_samples):
    for split in v2_samples.values():
        for s in split:
            shapes, kind = s.meta["shapes"], s.meta["scene_kind"]
            if kind == "plain":
                assert s.meta["key_shapes"] == ()
                continue
            a, b = (shapes[i] for i in s.meta["key_shapes"])  # b is drawn in front of a
            full_a, full_b = shape_mask(a, SIZE), shape_mask(b, SIZE)
            seen_a = full_a & ~full_b
            if kind == "overlap":
                assert a.colour != b.colour
                assert box_iou(mask_to_box(seen_a), mask_to_box(full_b)) >= 0.6
                assert seen_a.sum() >= 0.15 * full_a.sum()
            elif kind == "inside":
                assert a.kind in CONTAINER_KINDS and not (full_a & full_b).any()
                ax1, ay1, ax2, ay2 = mask_to_box(full_a)
                bx1, by1, bx2, by2 = mask_to_box(full_b)
                assert ax1 < bx1 and ay1 < by1 and bx2 < ax2 and by2 < ay2
            else:
                assert kind == "occluded"
                assert 0.3 <= (full_a & full_b).sum() / full_a.sum() <= 0.6
            # the other shapes never touch the key pair
            key = full_a | full_b
            for i, other in enumerate(shapes):
                if i not in s.meta["key_shapes"]:
                    assert not (shape_mask(other, SIZE) & key).any()


def test_ambiguous_targets_do_not_have_their_box_to_themselves(v2_samples):
    for s in v2_samples["ambiguous"]:
        assert s.meta["target_index"] in s.meta["key_shapes"]
        assert s.meta["box_ambiguity"] >= AMBIGUITY_MIN
    plain = [s.meta["box_ambiguity"] for s in v2_samples["val"] if s.meta["scene_kind"] == "plain"]
    ambiguous = [s.meta["box_ambiguity"] for s in v2_samples["ambiguous"]]
    assert np.mean(ambiguous) > 2 * np.mean(plain)


def test_box_ambiguity_counts_other_shapes_in_the_box():
    visible = [np.zeros((10, 10), bool), np.zeros((10, 10), bool)]
    visible[0][0:4, 0:4] = True
    visible[1][2:4, 2:4] = True
    visible[0][2:4, 2:4] = False
    assert box_ambiguity(visible, (0, 0, 4, 4), 0) == pytest.approx(4 / 16)
    assert box_ambiguity(visible, (2, 2, 4, 4), 1) == 0.0


def test_expressions_resolve_and_spatial_words_have_a_margin(v2_samples):
    gap = V2.min_center_gap * SIZE
    for split in v2_samples.values():
        for s in split:
            spec, shapes = s.meta["spec"], s.meta["shapes"]
            assert resolve(spec, shapes) == {s.meta["target_index"]}, s.text
            if isinstance(spec, Extreme) and spec.which in SPATIAL_EXTREMES:
                axis = "cx" if spec.which in ("leftmost", "rightmost") else "cy"
                values = sorted(getattr(x, axis) for x in shapes if spec.filter.matches(x))
                if spec.which in ("rightmost", "bottommost"):
                    values = values[::-1]
                assert abs(values[1] - values[0]) >= gap  # the winner is clear


def test_difficulties_of_the_splits(v2_samples):
    def difficulties(split):
        return {s.meta["difficulty"] for s in v2_samples[split]}

    assert difficulties("testA") == {"referring", "relational"}
    assert difficulties("testB") == {"reasoning"}
    assert len(difficulties("ambiguous")) == 3


# ------------------------------------------------------- rationales: every claim is true

NAME = re.compile(r"(?:(small|medium|large) )?(\w+) (\w+)")


def _shape_named(name: str, shapes) -> int:
    """The index of the ONE shape a rationale's name ("[size] colour kind") picks out."""
    size, colour, kind = NAME.fullmatch(name).groups()
    found = resolve(Describe(Filter(kind=kind, colour=colour, size=size)), shapes)
    assert len(found) == 1, name
    return found.pop()


def _filter_from_header(header: str) -> Filter:
    """Inverse of group_header: "Large red circles not green" -> Filter(...)."""
    words = header[0].lower() + header[1:]
    not_colour = None
    if "not " in words:
        words, not_colour = (words.split("not ") + [""])[:2]
        words, not_colour = words.strip(), not_colour.strip()
    fields: dict[str, str] = {}
    for word in words.split():
        if word in SIZES:
            fields["size"] = word
        elif word in PALETTE:
            fields["colour"] = word
        elif word != "shapes":
            kinds = [k for k in V2_KINDS if plural(k) == word]
            assert kinds, header
            fields["kind"] = kinds[0]
    noun = Filter(not_colour=not_colour or None, **fields)
    assert group_header(noun) == header
    return noun


def _filter_from_phrase(phrase: str) -> Filter:
    """Inverse of Filter.phrase: "large red circle that is not green" (no adjective)."""
    not_colour = None
    if " that is not " in phrase:
        phrase, not_colour = phrase.split(" that is not ")
    fields: dict[str, str] = {}
    for word in phrase.split():
        if word in SIZES:
            fields["size"] = word
        elif word in PALETTE:
            fields["colour"] = word
        elif word != "shape":
            fields["kind"] = word
    return Filter(not_colour=not_colour, **fields)


GRID = "|".join(w for row in GRID_WORDS for w in row)
WHERE = re.compile(rf"The ([a-z ]+?) is at the ({GRID})\.")
IS_ATTR = re.compile(r"The ([a-z ]+?) is (small|medium|large|\w+)\.")
LISTING = re.compile(r"([A-Z][a-z ]*): (.+?)\.")
ITEM = re.compile(r"the ([a-z ]+?)(?: \(([a-z ]+)\))?")
DECIDE = re.compile(rf"(.+?) is the ([a-z ]+), at the ({GRID})\.")


def _check_rationale(sample) -> None:
    """Parse a "reason" rationale back and check every claim against the scene."""
    shapes, boxes = sample.meta["shapes"], None
    boxes = [mask_to_box(v) for v in visible_masks(shapes, SIZE)]
    target, spec = sample.meta["target_index"], sample.meta["spec"]
    text = sample.rationale
    sentences = re.findall(r"[^.]+\.", text)
    assert " ".join(s.strip() for s in sentences) == text

    anchor = None
    noun = None
    for sentence in (s.strip() for s in sentences):
        if m := WHERE.fullmatch(sentence):  # "The red circle is at the top left."
            i = _shape_named(m.group(1), shapes)
            assert grid_word(boxes[i], SIZE) == m.group(2), sentence
            if i != target:
                anchor = i
            else:  # the Describe ending: the target, named as the question names it
                assert resolve(spec, shapes) == {i}
            continue
        if (m := LISTING.fullmatch(sentence)) and not DECIDE.fullmatch(sentence):
            noun = _filter_from_header(m.group(1))
            listed = []
            for item in m.group(2).split(", "):
                part = ITEM.fullmatch(item)
                assert part, item
                i = _shape_named(part.group(1), shapes)
                note = part.group(2)
                if note in SIZES:
                    assert shapes[i].size == note, sentence
                elif note is not None:
                    assert grid_word(boxes[i], SIZE) == note, sentence
                listed.append(i)
            matching = {i for i, x in enumerate(shapes) if noun.matches(x)}
            assert set(listed) == matching - {anchor}, sentence  # all candidates, no others
            assert target in listed
            continue
        if m := DECIDE.fullmatch(sentence):
            chosen = _shape_named(m.group(2), shapes)
            assert chosen == target and grid_word(boxes[chosen], SIZE) == m.group(3)
            opening = m.group(1)
            if opening.startswith("The only "):
                value = opening.removeprefix("The only ").removesuffix(" one")
                attribute = "colour" if value in PALETTE else "kind"
                assert resolve(OnlyOne(attribute), shapes) == {chosen}
                assert getattr(shapes[chosen], attribute) == value
            elif opening.startswith("Also "):
                colour = opening.removeprefix("Also ")
                assert (
                    anchor is not None and shapes[anchor].colour == colour == shapes[chosen].colour
                )
                others = {i for i, x in enumerate(shapes) if noun.matches(x) and i != anchor}
                assert {i for i in others if shapes[i].colour == colour} == {chosen}
            elif opening.endswith(" it"):
                relation = opening.removesuffix(" it").lower()
                assert relation in SPATIAL_RELATIONS + SIZE_RELATIONS and anchor is not None
                found = resolve(Relate(noun, relation, _anchor_filter(shapes, anchor)), shapes)
                assert found == {chosen}, sentence
            elif opening.removeprefix("The ") in SPATIAL_EXTREMES + SIZE_EXTREMES:
                which = opening.removeprefix("The ")
                assert resolve(Extreme(noun, which), shapes) == {chosen}, sentence
            else:  # "The large shape is the red circle, ..."
                phrase = _filter_from_phrase(opening.removeprefix("The "))
                assert resolve(Describe(phrase), shapes) == {chosen}, sentence
            continue
        if m := IS_ATTR.fullmatch(sentence):  # "The red circle is large." / "... is red."
            anchor = _shape_named(m.group(1), shapes)
            value = m.group(2)
            assert value in (shapes[anchor].size, shapes[anchor].colour), sentence
            continue
        raise AssertionError(f"unparsed sentence {sentence!r} in {text!r}")
    # the last sentence names the target and where it is
    assert sentences[-1].strip().endswith(f"at the {grid_word(boxes[target], SIZE)}.")


def _anchor_filter(shapes, index: int) -> Filter:
    shape = shapes[index]
    return Filter(kind=shape.kind, colour=shape.colour, size=shape.size)


def test_reasoning_rationales_are_true_of_their_scenes():
    """Property test: 400 samples over seeds, splits and difficulties."""
    templates = Counter()
    for seed in range(4):
        world = ToyWorld(V2, seed=seed)
        for split in V2_SPLITS:
            for index in range(20):
                sample = world.sample(split, index)
                _check_rationale(sample)
                templates[type(sample.meta["spec"]).__name__] += 1
    assert set(templates) == {"Describe", "Extreme", "Relate", "SameColour", "OnlyOne"}


def test_rationale_names_the_candidates_and_the_deciding_comparison():
    shapes = [
        Shape("circle", "purple", "large", 25.0, 25.0, 39.2),
        Shape("square", "yellow", "small", 80.0, 80.0, 20.16),
        Shape("circle", "green", "medium", 80.0, 30.0, 28.0),
    ]
    world = ToyWorld(V2)
    boxes = [mask_to_box(v) for v in visible_masks(shapes, SIZE)]
    from lenslib.toy.rationales import rationale

    spec = Extreme(Filter(not_colour="green"), "largest")
    text = rationale(shapes, boxes, 0, spec, world.config)
    assert text == (
        "Not green: the purple circle (large), the yellow square (small). "
        "The largest is the purple circle, at the top left."
    )
    relate = rationale(shapes, boxes, 1, Relate(Filter(), "below", Filter(colour="green")), V2)
    assert relate.startswith("The green circle is at the top right. Shapes: ")
    assert relate.endswith("Below it is the yellow square, at the bottom right.")


def test_every_word_of_v2_is_known_to_its_tokenizer(v2_samples):
    from lenslib.toy.tokenizer import build_toy_tokenizer

    tokenizer = build_toy_tokenizer(toy_corpus(V2))
    for split in v2_samples.values():
        for s in split:
            for text in (s.text, s.rationale):
                ids = tokenizer(text)["input_ids"]
                assert tokenizer.unk_token_id not in ids, text
                assert tokenizer.decode(ids) == text
