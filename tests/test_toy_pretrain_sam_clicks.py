"""Tests of the toy SAM2's click recipe (lenslib.toy.pretrain_sam): negative clicks on other
objects, error-region clicks of iterative refinement, and that the defaults are unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lenslib.sam import SamSegmenter
from lenslib.toy import ToyWorld, ToyWorldConfig
from lenslib.toy.models import toy_sam_config
from lenslib.toy.pretrain_sam import (
    PretrainConfig,
    append_clicks,
    error_clicks,
    make_batch,
    make_optimizer,
    parse_args,
    scene_objects,
    set_trainable,
    training_step,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")

V2_CLICKS = dict(point_fraction=0.5, negative_points=2, refine_rounds=1)


@pytest.fixture(scope="module")
def world_v2() -> ToyWorld:
    return ToyWorld(ToyWorldConfig(version=2), seed=0)


def test_defaults_are_the_v1_recipe() -> None:
    cfg = PretrainConfig()
    assert cfg.negative_points == 0 and cfg.refine_rounds == 0
    assert cfg.world == ToyWorldConfig()
    args = parse_args([])
    assert args.negative_points == 0 and args.refine_rounds == 0 and args.world_version == 1
    with pytest.raises(ValueError, match="refine_rounds"):
        PretrainConfig(refine_rounds=-1)


def test_default_batches_have_no_negative_clicks() -> None:
    batch = make_batch(ToyWorld(seed=0), 0, PretrainConfig(batch_images=4, point_fraction=1.0))
    (group,) = batch.groups
    assert group.points[1].shape[1] == PretrainConfig.max_points
    assert set(group.points[1].unique().tolist()) <= {-1, 1}


def test_error_clicks_pick_false_negatives_as_positive_and_false_positives_as_negative() -> None:
    rng = np.random.default_rng(0)
    target = np.zeros((2, 20, 20), dtype=bool)
    predicted = np.zeros((2, 20, 20), dtype=bool)
    target[0, 5:10, 5:10] = True  # object 0: nothing predicted -> all error is missed target
    predicted[1, 0:4, 0:4] = True  # object 1: predicted where nothing is -> false positive
    for _ in range(50):
        xy, labels = error_clicks(predicted, target, rng)
        x, y = xy[0].astype(int)
        assert labels[0] == 1 and target[0, y, x]
        x, y = xy[1].astype(int)
        assert labels[1] == 0 and predicted[1, y, x] and not target[1, y, x]


def test_error_clicks_label_each_pixel_by_the_side_of_the_error() -> None:
    rng = np.random.default_rng(1)
    target = np.zeros((1, 30, 30), dtype=bool)
    predicted = np.zeros((1, 30, 30), dtype=bool)
    target[0, 10:20, 10:20] = True
    predicted[0, 10:20, 15:25] = True  # half right, half shifted out
    seen = set()
    for _ in range(200):
        xy, labels = error_clicks(predicted, target, rng)
        x, y = xy[0].astype(int)
        missed = target[0, y, x] and not predicted[0, y, x]
        extra = predicted[0, y, x] and not target[0, y, x]
        assert missed or extra  # never a pixel the prediction got right
        assert labels[0] == int(missed)
        seen.add(int(labels[0]))
    assert seen == {0, 1}
    # a perfect prediction: a positive click on the object
    xy, labels = error_clicks(target.copy(), target, rng)
    assert labels[0] == 1 and target[0, int(xy[0, 1]), int(xy[0, 0])]


def test_append_clicks_starts_or_extends_a_prompt() -> None:
    xy, labels = torch.tensor([[1.0, 2.0]]), torch.tensor([0])
    coords, lab = append_clicks(None, xy, labels)
    assert coords.shape == (1, 1, 2) and lab.tolist() == [[0]]
    coords, lab = append_clicks((coords, lab), xy, torch.tensor([1]))
    assert coords.shape == (1, 2, 2) and lab.tolist() == [[0, 1]]


def test_negative_clicks_land_on_other_objects(world_v2) -> None:
    cfg = PretrainConfig(
        batch_images=6, point_fraction=1.0, negative_points=2, world=world_v2.config
    )
    batch = make_batch(world_v2, 3, cfg)
    (group,) = batch.groups
    assert group.points[0].shape[1] == cfg.max_points + cfg.negative_points
    negatives = 0
    for i in range(len(group)):
        image_masks = scene_objects(world_v2.sample("train", 3 * 6 + int(group.image_index[i])))
        target = group.targets[i].numpy().astype(bool)
        others = np.zeros_like(target)
        for m in image_masks:
            if not np.array_equal(m.astype(bool), target):
                others |= m.astype(bool)
        for (x, y), label in zip(group.points[0][i].int().tolist(), group.points[1][i].tolist()):
            if label == 1:
                assert target[y, x]
            elif label == 0:
                negatives += 1
                assert others[y, x] and not target[y, x]
    assert negatives > 0


def test_a_few_steps_with_clicks_and_refinement_run_and_learn(world_v2) -> None:
    torch.manual_seed(0)
    seg = SamSegmenter(toy_sam_config())
    set_trainable(seg, decoder=True, encoder=True)
    seg.train()
    cfg = PretrainConfig(batch_images=2, world=world_v2.config, **V2_CLICKS)
    batch = make_batch(world_v2, 0, cfg)
    assert len(batch.groups) == 2 and batch.step == 0
    optimizer, _ = make_optimizer(seg, PretrainConfig(decoder_first_steps=0, warmup_steps=1))
    losses = [training_step(seg, optimizer, batch, cfg)["loss"] for _ in range(5)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_refinement_changes_nothing_of_the_first_round(world_v2) -> None:
    """With refine_rounds, the first round's prompts are those of the plain recipe."""
    cfg = PretrainConfig(batch_images=3, world=world_v2.config, point_fraction=0.5)
    plain = make_batch(world_v2, 2, cfg)
    refined = make_batch(world_v2, 2, PretrainConfig(**{**cfg.__dict__, "refine_rounds": 2}))
    for a, b in zip(plain.groups, refined.groups, strict=True):
        assert torch.equal(a.targets, b.targets)
        assert (a.boxes is None) == (b.boxes is None)
        if a.boxes is not None:
            assert torch.equal(a.boxes, b.boxes)
