"""Tests for lenslib.toy.pretrain_sam and the saved toy SAM2 (save_sam / load_sam / load_toy_sam)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lenslib.sam import SamSegmenter
from lenslib.sam_io import INFO_FILE, WEIGHTS_FILE, load_sam, save_sam
from lenslib.toy import ToyWorld, ToyWorldConfig
from lenslib.toy.models import TOY_SAM_DIR, load_toy_sam, toy_sam_config
from lenslib.toy.pretrain_sam import (
    PretrainConfig,
    decoder_parameters,
    encoder_parameters,
    evaluate_sam_with_boxes,
    evaluate_sam_with_click,
    jitter_box,
    main,
    make_batch,
    make_optimizer,
    mask_box,
    mask_losses,
    scene_objects,
    set_trainable,
    training_step,
)
from lenslib.toy.schedule import warmup_cosine as learning_rate_factor

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


@pytest.fixture(scope="module")
def world() -> ToyWorld:
    return ToyWorld(ToyWorldConfig(), seed=0)


@pytest.fixture(scope="module")
def toy_sam() -> SamSegmenter:
    return load_toy_sam()


# ---- data ------------------------------------------------------------------------------------
def test_scene_objects_hold_every_shape_and_the_target(world) -> None:
    for i in range(5):
        sample = world.sample("train", i)
        objects = scene_objects(sample)
        assert len(objects) == len(sample.meta["shapes"])
        assert any(np.array_equal(m, sample.mask) for m in objects)
        assert np.array_equal(mask_box(sample.mask), np.array(sample.box, dtype=np.float32))
        covered = np.sum(objects, axis=0)
        assert covered.max() == 1  # visible masks never overlap


def test_make_batch_prompts(world) -> None:
    cfg = PretrainConfig(batch_images=6, point_fraction=0.5, max_points=3, box_noise=0.0)
    batch = make_batch(world, 3, cfg)
    samples = [world.sample("train", 18 + i) for i in range(6)]  # step 3 -> images 18..23
    assert all(np.array_equal(a, s.image) for a, s in zip(batch.images, samples))
    n_objects = sum(len(s.meta["shapes"]) for s in samples)
    assert sum(len(g) for g in batch.groups) == n_objects
    boxes, clicks = batch.groups
    for index, box, target in zip(boxes.image_index, boxes.boxes, boxes.targets):
        assert np.array_equal(box.numpy(), mask_box(target.numpy()))  # no noise: tight box
        assert any(np.array_equal(target.numpy(), m) for m in scene_objects(samples[index]))
    coords, labels = clicks.points
    assert coords.shape == (len(clicks), 3, 2) and set(labels.unique().tolist()) <= {-1, 1}
    assert (labels[:, 0] == 1).all()  # at least one click, padding after the clicks
    for xy, lab, target in zip(coords, labels, clicks.targets):
        for (x, y), label in zip(xy.long().tolist(), lab.tolist()):
            if label == 1:
                assert target[y, x] == 1  # every click lies on the object


def test_make_batch_is_deterministic_per_step(world) -> None:
    cfg = PretrainConfig(batch_images=3, point_fraction=0.5)
    a, b, c = make_batch(world, 7, cfg), make_batch(world, 7, cfg), make_batch(world, 8, cfg)
    for ga, gb in zip(a.groups, b.groups):
        assert torch.equal(ga.targets, gb.targets) and torch.equal(ga.image_index, gb.image_index)
        if ga.boxes is not None:
            assert torch.equal(ga.boxes, gb.boxes)
    assert not np.array_equal(a.images[0], c.images[0])


def test_jitter_box_stays_in_the_image() -> None:
    rng = np.random.default_rng(0)
    box = np.array([10.0, 20.0, 40.0, 60.0], dtype=np.float32)
    assert np.array_equal(jitter_box(box, 0.0, 112, rng), box)
    moved = np.stack([jitter_box(box, 0.5, 112, rng) for _ in range(200)])
    assert (moved >= 0).all() and (moved <= 112).all()
    assert (moved[:, 2] > moved[:, 0]).all() and (moved[:, 3] > moved[:, 1]).all()
    assert np.abs(moved - box).mean() > 1


# ---- loss and schedule -----------------------------------------------------------------------
def test_mask_losses_pick_the_best_multimask_output() -> None:
    targets = torch.zeros(2, 16, 16, dtype=torch.uint8)
    targets[:, 4:12, 4:12] = 1
    good = torch.where(targets.bool(), 20.0, -20.0)  # (2, 16, 16) confident and right
    logits = torch.stack([good, -good, -good, -good], dim=1)  # token 0 right, 1-3 wrong
    logits[1, 2] = good[1]  # object 1: token 2 is right too
    iou_pred = torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 0.0, 1.0, 0.0]])
    losses = mask_losses(logits, iou_pred, targets, PretrainConfig())
    assert losses["single"] < 1e-3
    assert losses["iou"] < 1e-6  # the predicted IoUs are exactly the actual ones
    wrong_only = mask_losses(logits[:1], iou_pred[:1], targets[:1], PretrainConfig())
    assert losses["multi"].item() == pytest.approx(wrong_only["multi"].item() / 2, rel=1e-4)
    assert wrong_only["multi"] > 1


def test_learning_rate_factor() -> None:
    assert learning_rate_factor(0, 10, 100) == pytest.approx(0.1)
    assert learning_rate_factor(9, 10, 100) == pytest.approx(1.0)
    assert learning_rate_factor(55, 10, 100) == pytest.approx(0.5)
    assert learning_rate_factor(100, 10, 100) == pytest.approx(0.0)


# ---- training --------------------------------------------------------------------------------
def test_training_steps_decrease_the_loss(world) -> None:
    torch.manual_seed(0)
    seg = SamSegmenter(toy_sam_config())
    set_trainable(seg, decoder=True, encoder=True)
    seg.train()
    cfg = PretrainConfig(batch_images=2, point_fraction=0.5)
    batch = make_batch(world, 0, cfg)
    assert len(batch.groups) == 2  # the tiny batch has box AND click prompts
    encoder_before = seg.sam.image_encoder.trunk.pos_embed.detach().clone()
    optimizer = torch.optim.AdamW(decoder_parameters(seg) + encoder_parameters(seg), lr=2e-3)
    losses = [training_step(seg, optimizer, batch, cfg)["loss"] for _ in range(6)]
    assert losses[-1] < 0.8 * losses[0]
    assert not torch.equal(encoder_before, seg.sam.image_encoder.trunk.pos_embed)


def test_phases_freeze_then_train_the_image_side(world) -> None:
    torch.manual_seed(0)
    seg = SamSegmenter(toy_sam_config())
    cfg = PretrainConfig(steps=10, decoder_first_steps=4, warmup_steps=2, batch_images=1)
    optimizer, scheduler = make_optimizer(seg, cfg)
    factors = []
    for _ in range(cfg.steps):
        factors.append([group["lr"] / cfg.lr for group in optimizer.param_groups])
        optimizer.step()
        scheduler.step()
    assert [f[1] for f in factors[:4]] == [0.0] * 4  # image side: no learning in phase 1
    assert factors[4][1] == pytest.approx(0.5) and factors[5][1] == pytest.approx(1.0)
    assert factors[0][0] == pytest.approx(0.5) and factors[1][0] == pytest.approx(1.0)

    set_trainable(seg, decoder=True, encoder=False)  # phase 1: no gradient reaches the encoder
    seg.train()
    trunk = seg.sam.image_encoder.trunk.pos_embed
    conv = seg.sam.sam_mask_decoder.conv_s0.weight
    before = (trunk.detach().clone(), conv.detach().clone())
    training_step(seg, optimizer, make_batch(world, 0, cfg), cfg)
    assert trunk.grad is None and conv.grad is None
    assert torch.equal(before[0], trunk) and torch.equal(before[1], conv)
    assert seg.sam.sam_mask_decoder.iou_token.weight.grad is not None
    set_trainable(seg, decoder=False, encoder=False)
    seg.set_decoder_trainable(True)  # LENS's freezing, as `pretrain` leaves the model
    assert not any(p.requires_grad for p in encoder_parameters(seg))
    assert seg.sam.sam_mask_decoder.iou_token.weight.requires_grad


def test_cli_writes_weights_that_load_back_identically(tmp_path) -> None:
    out = tmp_path / "sam"
    argv = ["--out", str(out), "--steps", "2", "--batch-images", "2", "--eval-samples", "4"]
    info = main(argv)
    record = json.loads((out / INFO_FILE).read_text())
    assert record["steps"] == 2 and record["weights_dtype"] == "float16"
    assert record["val_gt_box"]["count"] == 4 and 0 <= record["val_gt_box"]["giou"] <= 1
    assert record["val_gt_box"] == info["val_gt_box"]
    assert record["sam_config"]["overrides"] == list(toy_sam_config().overrides)
    saved = load_file(str(out / WEIGHTS_FILE))
    assert all(t.dtype == torch.float16 for t in saved.values())
    loaded = load_sam(out)
    state = loaded.sam.state_dict()
    assert set(state) == set(saved)
    assert all(torch.equal(state[name], saved[name].float()) for name in saved)
    assert load_toy_sam(directory=out).cfg == toy_sam_config()
    # the script reproduces its weights
    main([*argv[:1], str(tmp_path / "again"), *argv[2:]])
    again = load_file(str(tmp_path / "again" / WEIGHTS_FILE))
    assert all(torch.equal(again[name], saved[name]) for name in saved)


# ---- saving and loading ----------------------------------------------------------------------
def test_save_and_load_round_trip_in_float16(tmp_path) -> None:
    torch.manual_seed(3)
    seg = SamSegmenter(toy_sam_config())
    save_sam(seg, tmp_path, {"note": "random"})
    loaded = load_sam(tmp_path, cache_size=3)
    assert loaded.cfg.cache_size == 3
    for name, tensor in seg.sam.state_dict().items():
        assert torch.equal(loaded.sam.state_dict()[name], tensor.half().float())
    assert not any(p.requires_grad for p in loaded.sam.image_encoder.parameters())
    with pytest.raises(ValueError, match="architecture"):
        load_sam(tmp_path, image_size=256)


def test_missing_asset_gives_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model.safetensors.*lenslib.toy.pretrain_sam"):
        load_toy_sam(directory=tmp_path / "nowhere")


def test_asset_for_another_architecture_is_rejected(tmp_path) -> None:
    torch.manual_seed(0)
    save_sam(SamSegmenter(toy_sam_config(image_size=64)), tmp_path, {})
    with pytest.raises(ValueError, match="rerun"):
        load_toy_sam(directory=tmp_path)


# ---- the committed toy SAM2 ------------------------------------------------------------------
def test_committed_toy_sam_segments_val_with_gt_boxes(toy_sam, world) -> None:
    assert (TOY_SAM_DIR / WEIGHTS_FILE).stat().st_size < 8e6
    result = evaluate_sam_with_boxes(toy_sam, world, "val", 32)
    assert result["count"] == 32
    assert result["mean_iou"] >= 0.85 and result["ciou"] >= 0.85


def test_committed_toy_sam_understands_clicks(toy_sam, world) -> None:
    """One positive click in the target: the prompt space is more than box corners."""
    assert evaluate_sam_with_click(toy_sam, world, "val", 16)["mean_iou"] > 0.7
