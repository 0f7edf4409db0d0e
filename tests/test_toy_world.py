"""Tests of the toy world (lenslib.toy: world, expressions, rationales, generator)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from lenslib.data.masks import mask_to_box
from lenslib.toy import (
    DIFFICULTIES,
    GRID_WORDS,
    KINDS,
    PALETTE,
    SPLITS,
    Describe,
    Extreme,
    Filter,
    OnlyOne,
    Relate,
    SameColour,
    Shape,
    ToyDataset,
    ToyWorld,
    ToyWorldConfig,
    grid_word,
    resolve,
    shape_mask,
    toy_corpus,
    visible_masks,
)


@pytest.fixture(scope="module")
def data_samples():
    """120 samples of every split from the default world (seed 0)."""
    world = ToyWorld(seed=0)
    return {split: world.split(split, 120) for split in SPLITS}


def _digest(sample) -> str:
    h = hashlib.sha256()
    for part in (sample.image.tobytes(), sample.mask.tobytes(), sample.text, sample.rationale):
        h.update(part if isinstance(part, bytes) else part.encode())
    h.update(repr(sample.box).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------ determinism


def test_sample_is_deterministic_and_independent_of_call_order():
    world = ToyWorld(seed=3)
    late = [world.sample("train", i) for i in range(5)][4]
    fresh = ToyWorld(seed=3).sample("train", 4)
    assert _digest(late) == _digest(fresh)
    assert _digest(world.sample("train", 4)) == _digest(fresh)


def test_seed_split_and_index_change_the_sample():
    digests = {
        _digest(ToyWorld(seed=s).sample(split, i))
        for s in (0, 1)
        for split in ("train", "val")
        for i in (0, 1)
    }
    assert len(digests) == 8


def test_same_samples_in_a_fresh_interpreter_with_another_hash_seed():
    """No dependence on Python's string hashing (set order) or on process state."""
    code = (
        "import hashlib;from lenslib.toy import ToyWorld;w=ToyWorld(seed=5);"
        "print(','.join(hashlib.sha256(w.sample(s,i).image.tobytes()+w.sample(s,i).text.encode()"
        "+w.sample(s,i).rationale.encode()).hexdigest() for s in ('train','testB') for i in (0,7)))"
    )
    world = ToyWorld(seed=5)
    here = ",".join(
        hashlib.sha256(
            world.sample(s, i).image.tobytes()
            + world.sample(s, i).text.encode()
            + world.sample(s, i).rationale.encode()
        ).hexdigest()
        for s in ("train", "testB")
        for i in (0, 7)
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


def test_bad_split_index_and_seed():
    world = ToyWorld()
    with pytest.raises(ValueError, match="unknown toy split"):
        world.sample("test", 0)
    with pytest.raises(IndexError):
        world.sample("train", -1)
    with pytest.raises(ValueError, match="seed"):
        ToyWorld(seed=-1)


# ------------------------------------------------------------------- samples are correct


def test_every_expression_resolves_to_exactly_its_target(data_samples):
    for samples in data_samples.values():
        for s in samples:
            spec, shapes = s.meta["spec"], s.meta["shapes"]
            assert spec.text() == s.text
            assert resolve(spec, shapes) == {s.meta["target_index"]}, s.text


def test_mask_is_the_visible_target_and_box_its_tight_box(data_samples):
    for s in data_samples["train"] + data_samples["testB"]:
        shapes, target = s.meta["shapes"], s.meta["target_index"]
        assert s.mask.dtype == np.uint8 and set(np.unique(s.mask)) == {0, 1}
        expected = visible_masks(shapes, 112)[target]
        assert np.array_equal(s.mask == 1, expected)
        # the image shows the target's colour on every target pixel
        colour = np.array(PALETTE[shapes[target].colour], dtype=np.uint8)
        assert np.all(s.image[s.mask == 1] == colour)
        assert s.box == mask_to_box(s.mask)
        x1, y1, x2, y2 = s.box
        assert s.mask[int(y1), :].any() and s.mask[int(y2) - 1, :].any()
        assert s.mask[:, int(x1)].any() and s.mask[:, int(x2) - 1].any()
        assert s.source == "toy" and s.sample_id.startswith(f"toy/{s.meta['split']}/")


def test_occlusion_is_bounded_and_centres_are_apart(data_samples):
    cfg = ToyWorldConfig()
    gap = cfg.min_center_gap * cfg.image_size
    for s in data_samples["val"]:
        shapes = s.meta["shapes"]
        assert cfg.min_shapes <= len(shapes) <= cfg.max_shapes
        for shape, visible in zip(shapes, visible_masks(shapes, 112)):
            assert visible.sum() >= (1 - cfg.max_occlusion) * shape_mask(shape, 112).sum()
        for a in shapes:
            for b in shapes:
                if a is not b:
                    assert abs(a.cx - b.cx) >= gap and abs(a.cy - b.cy) >= gap


def test_splits_have_the_documented_difficulties(data_samples):
    def difficulties(split):
        return Counter(s.meta["difficulty"] for s in data_samples[split])

    assert set(difficulties("testA")) == {"referring", "relational"}
    assert set(difficulties("testB")) == {"reasoning"}
    assert set(difficulties("train")) == set(DIFFICULTIES)
    templates = Counter(s.meta["template"].split(":")[0] for s in data_samples["testB"])
    assert {"Describe", "Extreme", "Relate", "SameColour"} <= set(templates)


def test_relational_expressions_mostly_need_the_relation(data_samples):
    needed = [
        resolve(Describe(s.meta["spec"].filter), s.meta["shapes"]) != {s.meta["target_index"]}
        for split in ("train", "testA")
        for s in data_samples[split]
        if s.meta["difficulty"] == "relational"
    ]
    assert len(needed) > 30 and np.mean(needed) > 0.8


def test_superlatives_compare_at_least_two_shapes(data_samples):
    for samples in data_samples.values():
        for s in samples:
            spec = s.meta["spec"]
            if isinstance(spec, Extreme):
                assert sum(spec.filter.matches(x) for x in s.meta["shapes"]) >= 2, s.text


def test_difficulty_weights_select_the_mix():
    world = ToyWorld(ToyWorldConfig(difficulty_weights={"referring": 1.0, "reasoning": 0.0}))
    assert {world.sample("val", i).meta["difficulty"] for i in range(20)} == {"referring"}


# ------------------------------------------------------------------------------ rationale


def test_rationale_names_target_and_its_grid_cell(data_samples):
    for s in data_samples["train"]:
        target = s.meta["shapes"][s.meta["target_index"]]
        word = grid_word(s.box, 112)
        assert s.rationale.endswith(f"is at the {word}. It is the target.")
        assert f"{target.colour} {target.kind} is at the {word}." in s.rationale
        assert s.meta["position"] == word


def test_rationale_styles():
    spec_world = ToyWorld(ToyWorldConfig(rationale_style="anchor"), seed=2)
    anchors = 0
    for i in range(40):
        s = spec_world.sample("train", i)
        if isinstance(s.meta["spec"], Relate | SameColour):
            anchors += 1
            assert s.rationale.count(" is at the ") == 2
    assert anchors > 0
    scene = ToyWorld(ToyWorldConfig(rationale_style="scene"), seed=2).sample("train", 0)
    assert scene.rationale.count(" is at the ") == len(scene.meta["shapes"])
    assert scene.rationale.endswith("is the target.")


def test_corpus_covers_every_word_the_world_writes(data_samples):
    corpus_words = {w for line in toy_corpus() for w in line.split()}
    for samples in data_samples.values():
        for s in samples:
            assert set(s.text.split()) <= corpus_words, s.text
            assert set(s.rationale.split()) <= corpus_words, s.rationale
    assert len(corpus_words) < 80  # a small vocabulary a tiny model can learn
    assert list(toy_corpus()) == list(toy_corpus())


# ----------------------------------------------------------------------- geometry + resolver


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_of_a_size_has_the_same_area(kind):
    shape = Shape(kind, "red", "large", 100.0, 100.0, 60.0)
    assert shape_mask(shape, 200).sum() == pytest.approx(60.0**2, rel=0.04)


def test_later_shapes_cover_earlier_ones():
    below = Shape("square", "red", "large", 20.0, 20.0, 20.0)
    above = Shape("square", "blue", "large", 30.0, 20.0, 20.0)
    vis = visible_masks([below, above], 48)
    assert not (vis[0] & vis[1]).any()
    assert vis[1].sum() == shape_mask(above, 48).sum()
    assert vis[0].sum() == shape_mask(below, 48).sum() // 2


def test_grid_word():
    assert grid_word((0, 0, 10, 10), 90) == "top left"
    assert grid_word((40, 40, 50, 50), 90) == "center"
    assert grid_word((80, 80, 90, 90), 90) == "bottom right"
    assert grid_word((40, 80, 50, 90), 90) == "bottom"
    assert {w for row in GRID_WORDS for w in row} >= {"left", "right", "top"}


def _scene() -> list[Shape]:
    """Hand-built: red circle (small, left), blue circle (large, right), red square (medium)."""
    return [
        Shape("circle", "red", "small", 10.0, 50.0, 10.0),
        Shape("circle", "blue", "large", 90.0, 60.0, 30.0),
        Shape("square", "red", "medium", 50.0, 20.0, 20.0),
    ]


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (Describe(Filter(kind="circle")), {0, 1}),
        (Describe(Filter(kind="circle", colour="blue")), {1}),
        (Describe(Filter(not_colour="red")), {1}),
        (Describe(Filter(kind="circle", not_colour="blue")), {0}),
        (Extreme(Filter(kind="circle"), "leftmost"), {0}),
        (Extreme(Filter(), "topmost"), {2}),
        (Extreme(Filter(colour="red"), "largest"), {2}),
        (Extreme(Filter(), "smallest"), {0}),
        (Relate(Filter(kind="circle"), "left of", Filter(kind="square")), {0}),
        (Relate(Filter(), "below", Filter(kind="square")), {0, 1}),
        (Relate(Filter(), "larger than", Filter(colour="blue")), set()),
        (Relate(Filter(), "smaller than", Filter(kind="square")), {0}),
        (Relate(Filter(), "left of", Filter(kind="circle")), set()),  # anchor not unique
        (SameColour(Filter(kind="circle"), Filter(kind="square")), {0}),
        (SameColour(Filter(), Filter(colour="red")), set()),  # anchor not unique
        (OnlyOne("colour"), {1}),
        (OnlyOne("kind"), {2}),
    ],
)
def test_resolver_on_a_hand_built_scene(spec, expected):
    assert resolve(spec, _scene()) == expected


def test_spec_texts():
    assert Describe(Filter(kind="triangle", colour="blue")).text() == "the blue triangle"
    assert Extreme(Filter(kind="circle"), "leftmost").text() == "the leftmost circle"
    assert (
        Extreme(Filter(not_colour="red"), "largest").text() == "the largest shape that is not red"
    )
    assert (
        Relate(Filter(kind="square"), "left of", Filter(kind="circle", colour="red")).text()
        == "the square left of the red circle"
    )
    assert OnlyOne("colour").text() == "the only shape of its colour"


# ---------------------------------------------------------------------- config + dataset


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kinds": ("circle", "hexagon")},
        {"colours": ("red", "red")},
        {"min_shapes": 3, "max_shapes": 2},
        {"size_fractions": {"huge": 0.5}},
        {"difficulty_weights": {"referring": 0.0}},
        {"max_occlusion": 1.0},
        {"rationale_style": "verbose"},
    ],
)
def test_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ToyWorldConfig(**kwargs)


def test_config_knobs_take_effect():
    cfg = ToyWorldConfig(
        image_size=64,
        min_shapes=3,
        max_shapes=3,
        kinds=("cross", "diamond"),
        max_occlusion=0.0,
        background=(10, 20, 30),
        background_gradient=True,
    )
    s = ToyWorld(cfg, seed=1).sample("train", 0)
    assert s.image.shape == (64, 64, 3) and len(s.meta["shapes"]) == 3
    assert {x.kind for x in s.meta["shapes"]} <= {"cross", "diamond"}
    for shape, vis in zip(s.meta["shapes"], visible_masks(s.meta["shapes"], 64)):
        assert np.array_equal(vis, shape_mask(shape, 64))  # no occlusion at all
    plain = ~np.any([shape_mask(x, 64) for x in s.meta["shapes"]], axis=0)
    assert s.image[plain][:, 0].min() >= 10 and s.image[plain][:, 0].max() > 60  # ramp


def test_impossible_config_fails_with_a_clear_error():
    cfg = ToyWorldConfig(
        min_shapes=4, max_shapes=4, size_fractions={"large": 0.5}, max_occlusion=0.0, max_tries=5
    )
    with pytest.raises(RuntimeError, match="could not place"):
        ToyWorld(cfg).sample("train", 0)


def test_toy_dataset_is_lazy_and_indexable():
    world = ToyWorld(seed=4)
    data = ToyDataset(world, "val", 5)
    assert len(data) == 5
    assert data[2].text == world.sample("val", 2).text
    assert data[-1].sample_id == world.sample("val", 4).sample_id
    with pytest.raises(IndexError):
        data[5]
    with pytest.raises(ValueError):
        ToyDataset(world, "dev", 3)
