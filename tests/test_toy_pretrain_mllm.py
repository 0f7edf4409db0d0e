"""Tests for lenslib.toy.pretrain_mllm: targets, one training step, the CLI and the saved toy MLLM."""

from __future__ import annotations

import json
import math
from dataclasses import asdict

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lenslib.answers import parse_answer
from lenslib.presets import get_preset
from lenslib.toy import ToyWorld, ToyWorldConfig, grid_word, toy_corpus
from lenslib.toy.models import (
    INFO_FILE,
    build_toy_mllm,
    load_toy_mllm,
    toy_mllm_world,
    world_config_from_dict,
)
from lenslib.toy.pretrain_mllm import (
    CELL,
    LABEL_MARKER,
    DenseHead,
    DenseTargets,
    MllmPretrainConfig,
    RecallHead,
    box_iou_given_rationale,
    cell_targets,
    dense_loss,
    evaluate_mllm,
    learning_rate_factor,
    locate_positions,
    main,
    make_batch,
    quantise_box,
    recall_positions,
    save_toy_mllm,
    target_kind,
    target_text,
    training_step,
)
from lenslib.toy.tokenizer import build_toy_tokenizer

S = 112
WORLD = ToyWorld(ToyWorldConfig(), seed=0)
TINY = {"num_layers": 1, "hidden_size": 64, "vision_hidden_size": 32, "vision_depth": 1}


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer(toy_corpus(), max_coordinate=S)


coordinate = st.floats(min_value=0, max_value=S, allow_nan=False)


@settings(max_examples=200, deadline=None)
@given(coordinate, coordinate, coordinate, coordinate, st.sampled_from([1, 2, 4, 8, 14]))
def test_quantise_box_is_on_the_grid_inside_and_non_empty(x1, y1, w, h, quantum):
    box = [x1, y1, min(x1 + w, S), min(y1 + h, S)]
    q = quantise_box(box, quantum, S)
    assert all(v % quantum == 0 and 0 <= v <= S for v in q)
    assert q[2] > q[0] and q[3] > q[1]
    if box[2] - box[0] >= quantum and box[3] - box[1] >= quantum:  # wide boxes: rounded only
        assert all(abs(a - b) <= quantum / 2 for a, b in zip(q, box))


def test_target_text_keeps_the_answer_format_with_a_quantised_box():
    sample = WORLD.sample("train", 3)
    parsed = parse_answer(target_text(sample, 4, S))
    assert parsed.format_ok and parsed.label == sample.text
    assert parsed.think == sample.rationale
    assert list(parsed.box) == quantise_box(sample.box, 4, S)
    assert list(parse_answer(target_text(sample, 1, S)).box) == [round(v) for v in sample.box]


def test_cell_targets_mark_the_target_cell_and_leave_background_empty():
    cfg = ToyWorldConfig()
    for index in range(5):
        sample = WORLD.sample("train", index)
        targets = cell_targets(sample, cfg, min_cover=0.15)
        assert targets.colour.shape == targets.kind.shape == (16,)
        assert targets.box.shape == (16, 4)
        # The cell holding the (visible) target's mask centre of mass belongs to the target.
        ys, xs = sample.mask.nonzero()
        cell = int(ys.mean()) // CELL * (S // CELL) + int(xs.mean()) // CELL
        shape = sample.meta["shapes"][sample.meta["target_index"]]
        if sample.mask.reshape(4, CELL, 4, CELL)[cell // 4, :, cell % 4].mean() >= 0.15:
            assert targets.colour[cell] == cfg.colours.index(shape.colour) + 1
            assert targets.kind[cell] == cfg.kinds.index(shape.kind) + 1
            assert torch.allclose(targets.box[cell] * CELL, torch.tensor(sample.box).float())
        background = targets.colour == 0
        assert (targets.kind[background] == 0).all() and (targets.box[background] == 0).all()
        assert (targets.colour > 0).any()


def test_dense_loss_ignores_box_outputs_on_background_cells():
    torch.manual_seed(0)
    head = DenseHead(8, 5, 4)
    hidden = torch.randn(6, 8)
    targets = DenseTargets(
        colour=torch.tensor([0, 1, 0, 2, 0, 0]),
        kind=torch.tensor([0, 3, 0, 1, 0, 0]),
        box=torch.rand(6, 4),
    )
    base = dense_loss(head, hidden, targets)
    targets.box[0] += 100.0  # a background cell's box is never looked at
    assert torch.allclose(dense_loss(head, hidden, targets), base)
    targets.box[1] += 100.0  # a shape cell's box is
    assert dense_loss(head, hidden, targets) > base + 10


def test_dense_loss_with_bins_classifies_each_coordinate_into_its_bin():
    head = DenseHead(8, 5, 4, box_bins=29)  # 29 bins over [0, 112]: one per 4 pixels
    for layer in (head.colour, head.kind, head.box):
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    targets = DenseTargets(
        colour=torch.tensor([1]), kind=torch.tensor([1]), box=torch.tensor([[1.0, 1.0, 2.0, 2.0]])
    )
    hidden = torch.zeros(1, 8)
    uniform = dense_loss(head, hidden, targets, image_size=112).item()
    assert uniform == pytest.approx(math.log(6) + math.log(5) + math.log(29), rel=1e-5)
    with torch.no_grad():  # 28 px -> bin 7, 56 px -> bin 14, for x1, y1, x2, y2
        head.box.bias.view(4, 29)[[0, 1, 2, 3], [7, 7, 14, 14]] = 30.0
    assert dense_loss(head, hidden, targets, image_size=112).item() == pytest.approx(
        math.log(6) + math.log(5), rel=1e-5
    )


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = MllmPretrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [learning_rate_factor(s, cfg) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))
    assert learning_rate_factor(100, cfg) == pytest.approx(0.1)


def test_config_rejects_a_quantum_that_does_not_divide_the_image():
    with pytest.raises(ValueError, match="box_quantum"):
        MllmPretrainConfig(box_quantum=5)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tokenizer):
    cfg = MllmPretrainConfig(
        steps=10,
        lr=3e-3,
        warmup_steps=1,
        dense_layer=1,
        recall_weight=0.0,
        locate_weight=0.0,
        model=TINY,
    )
    model, processor = build_toy_mllm(tokenizer, **TINY)
    head = DenseHead(TINY["hidden_size"], len(cfg.world.colours), len(cfg.world.kinds))
    batch, targets = make_batch(WORLD.split("train", 4), processor, cfg)
    assert batch["labels"].shape == batch["input_ids"].shape
    assert (batch["input_ids"] == model.config.image_token_id).sum() == len(targets.colour)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=cfg.lr)
    losses = [training_step(model, head, batch, targets, optimizer, cfg) for _ in range(8)]
    assert losses[-1]["lm"] < losses[0]["lm"] - 0.5
    assert losses[-1]["dense"] < losses[0]["dense"]


def test_recall_positions_are_the_answer_tokens_from_the_label_marker_on(tokenizer):
    cfg = MllmPretrainConfig(model=TINY)
    _, processor = build_toy_mllm(tokenizer, **TINY)
    batch, targets = make_batch(WORLD.split("train", 3), processor, cfg)
    marker = tokenizer.convert_tokens_to_ids(LABEL_MARKER)
    where = recall_positions(batch["input_ids"], batch["labels"], marker)
    for row in range(3):
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][row][where[row]])
        assert tokens[0] == LABEL_MARKER and "</answer>" in tokens
        assert not any(t.isdigit() for t in tokens[:2])  # the box lies before the marker
    sample = WORLD.split("train", 1)[0]
    expected = quantise_box(sample.box, cfg.box_quantum, S)
    assert targets.answer_box[0].tolist() == pytest.approx([v / CELL for v in expected])


def test_locate_positions_start_where_the_answer_names_the_target(tokenizer):
    _, processor = build_toy_mllm(tokenizer, **TINY)
    samples = WORLD.split("train", 3)
    batch, targets = make_batch(samples, processor, MllmPretrainConfig(model=TINY))
    where = locate_positions(batch["input_ids"], batch["labels"], targets.name_ids)
    for row, sample in enumerate(samples):
        tokens = tokenizer.convert_ids_to_tokens(batch["input_ids"][row][where[row]])
        kind = sample.meta["shapes"][sample.meta["target_index"]].kind
        assert tokens[0] == target_kind(sample) == " " + kind and tokens[1] == " is"
        assert tokens[-1] == "<|im_end|>"  # up to the end of the answer
    assert (targets.name_ids != tokenizer.unk_token_id).all()


def _steps_on_a_fixed_batch(tokenizer, cfg, use_recall: bool, use_locate: bool):
    """8 training steps of a fresh TINY model on one batch, with a read-out head for the
    recall and/or the locate loss; returns (losses, everything needed for another step)."""
    model, processor = build_toy_mllm(tokenizer, **TINY)
    head = DenseHead(TINY["hidden_size"], len(cfg.world.colours), len(cfg.world.kinds))
    marker = tokenizer.convert_tokens_to_ids(LABEL_MARKER)
    recall = RecallHead(TINY["hidden_size"], marker) if use_recall else None
    locate = RecallHead(TINY["hidden_size"], marker) if use_locate else None
    extra = [p for h in (recall, locate) if h is not None for p in h.parameters()]
    batch, targets = make_batch(WORLD.split("train", 4), processor, cfg)
    optimizer = torch.optim.AdamW([*model.parameters(), *extra], lr=cfg.lr)
    step = (model, head, batch, targets, optimizer)
    losses = [training_step(*step, cfg, recall, locate) for _ in range(8)]
    return losses, step


def test_recall_loss_trains_the_states_after_the_box_to_hold_the_box(tokenizer):
    cfg = MllmPretrainConfig(
        lr=3e-3, dense_weight=0.0, recall_weight=1.0, locate_weight=0.0, model=TINY
    )
    losses, step = _steps_on_a_fixed_batch(tokenizer, cfg, use_recall=True, use_locate=False)
    assert losses[0]["recall"] > 0 and losses[-1]["recall"] < losses[0]["recall"]
    assert "recall" not in training_step(
        *step,
        MllmPretrainConfig(dense_weight=0.0, recall_weight=0.0, locate_weight=0.0, model=TINY),
    )


def test_locate_loss_trains_the_states_from_the_name_on_to_hold_the_box(tokenizer):
    cfg = MllmPretrainConfig(
        lr=3e-3, dense_weight=0.0, recall_weight=0.0, locate_weight=1.0, model=TINY
    )
    losses, _ = _steps_on_a_fixed_batch(tokenizer, cfg, use_recall=False, use_locate=True)
    assert "recall" not in losses[0]
    assert losses[0]["locate"] > 0 and losses[-1]["locate"] < losses[0]["locate"]


def test_save_then_load_gives_back_the_same_model(tokenizer, tmp_path):
    model, processor = build_toy_mllm(tokenizer, **TINY)
    save_toy_mllm(model, processor, tmp_path, {"steps": 0})
    loaded, loaded_processor = load_toy_mllm(directory=tmp_path)
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    assert loaded_processor.tokenizer.get_vocab() == tokenizer.get_vocab()
    assert loaded_processor.tokenizer.padding_side == "left"


def test_cli_with_two_steps_writes_a_loadable_asset(tmp_path):
    out = tmp_path / "mllm"
    argv = ["--out", str(out), "--steps", "2", "--batch-size", "2", "--eval-samples", "2"]
    with pytest.raises(ValueError, match="dense_layer 2 must lie in 0..1"):
        main([*argv, "--model", json.dumps(TINY)])
    info = main([*argv, "--dense-layer", "1", "--model", json.dumps(TINY)])
    saved = json.loads((out / INFO_FILE).read_text())
    assert saved["steps"] == 2 and saved["config"]["model"] == TINY
    assert set(saved["val"]) >= {"format_rate", "mean_box_iou", "frac_iou_gt_0.5"}
    assert saved["val"] == info["val"]
    model, processor = load_toy_mllm(directory=out)
    assert model.config.text_config.num_hidden_layers == 1
    assert next(model.parameters()).dtype == torch.float32
    # --init-from goes on training the saved model (here into the same directory).
    main([*argv[:3], "1", *argv[4:], "--dense-layer", "1", "--init-from", str(out)])
    again = json.loads((out / INFO_FILE).read_text())
    assert again["steps"] == 1 and again["total_steps"] == 3 and again["total_samples"] == 6
    assert again["config"]["sample_offset"] == 4  # it trained on new samples
    trained, _ = load_toy_mllm(directory=out)
    changed = [not torch.equal(a, b) for a, b in zip(model.parameters(), trained.parameters())]
    assert any(changed)


def test_world_config_survives_json():
    cfg = ToyWorldConfig(kinds=("circle", "square"), background=(9, 9, 9), max_shapes=3)
    assert world_config_from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg


def test_missing_asset_gives_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no pretrained toy MLLM.*pretrain_mllm"):
        load_toy_mllm(directory=tmp_path / "nowhere")


def test_committed_toy_mllm_answers_in_the_paper_format():
    model, processor = load_toy_mllm("cpu")
    world = toy_mllm_world()
    metrics = evaluate_mllm(model, processor, world, "val", n=16, batch_size=16)
    assert metrics["format_rate"] >= 0.95
    # The bar for a base MLLM that RL can start from: mean box IoU >= 0.3 (0.59 on 200 val samples, 0.63 on these 16).
    assert metrics["mean_box_iou"] >= 0.3
    # Given the true rationale, the model puts the box near the named object (0.71 here).
    assert box_iou_given_rationale(model, processor, world, "val", n=16) >= 0.4
    # The asset was pretrained on world v1 (the toy preset now uses world v2 and assets/v2).
    assert world.config == ToyWorldConfig() != get_preset("toy").toy_world
    # The rationale names the grid cell of the box it then gives (the position comes first).
    sample = world.sample("val", 0)
    assert grid_word(sample.box, S) in sample.rationale
