"""lenslib.fidelity: the world-v2 experiments run end to end (tiny steps), merge per seed, and
their building blocks do what they say."""

from __future__ import annotations

import json
import math

import pytest
import torch

import lenslib.fidelity as fidelity
from lenslib.fidelity import FidelityConfig, merge, misguided_box, run_fidelity, shifted_box
from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.toy.rationales import named_shape, names_target
from lenslib.training import make_accelerator, take


@pytest.fixture(autouse=True)
def random_base_models(monkeypatch):
    """Random-weight toy models keep the end-to-end test about the plumbing, and fast."""
    real = fidelity.build_lens
    monkeypatch.setattr(fidelity, "build_lens", lambda p, device="cpu": real(p, device, False))


def tiny_preset():
    preset = get_preset("toy", group_size=2, max_new_tokens=4, num_queries=2)
    return preset.override("align", batch_size=2, max_steps=1).override(
        "rl", batch_size=1, max_steps=1
    )


def test_run_fidelity_writes_every_model_per_seed_and_merges_them(tmp_path):
    cfg = FidelityConfig(seeds=(0, 1), samples=2, shifts=(0.0, 1.0))
    merged = run_fidelity(tiny_preset(), cfg, tmp_path, make_accelerator(cpu=True))
    assert merged["seeds"] == [0, 1]
    for split in ("val", "ambiguous"):
        assert set(merged[split]) == set(fidelity.MODELS)
        assert all(len(v) == 2 and all(0 <= c <= 1 for c in v) for v in merged[split].values())
    assert merged["stage2"]["before"] == merged["val"]["lens_stage1"]
    assert merged["stage2"]["control"] == merged["val"]["control"]
    assert merged["misguided_box"]["shift"] == [0.0, 1.0]
    assert json.loads((tmp_path / "fidelity.json").read_text()) == merged
    # a finished seed is not run again
    seed_file = tmp_path / "seed_0.json"
    before = seed_file.stat().st_mtime_ns
    run_fidelity(tiny_preset(), FidelityConfig(seeds=(0,), samples=2), tmp_path,
                 make_accelerator(cpu=True))  # fmt: skip
    assert seed_file.stat().st_mtime_ns == before


def test_a_seed_without_stage2_counts_only_for_its_models(tmp_path):
    accelerator = make_accelerator(cpu=True)
    run_fidelity(tiny_preset(), FidelityConfig(seeds=(0,), samples=2), tmp_path, accelerator)
    short = FidelityConfig(seeds=(1,), samples=2, stage2=False)
    merged = run_fidelity(tiny_preset(), short, tmp_path, accelerator)
    assert merged["model_seeds"]["lens_stage1"] == [0, 1]
    assert merged["model_seeds"]["lens"] == [0] and merged["stage2"]["seeds"] == [0]
    assert len(merged["val"]["seg_zero_style"]) == 2 and len(merged["val"]["control"]) == 1
    assert "| lens | 1 |" in fidelity.summary(merged)


def test_merge_lists_each_seed_in_order_and_means_the_misguided_curves():
    def seed(s, c):
        models = {m: {"val": {"ciou": c, "giou": c, "box_iou": c, "wrong_name": 0.5}}
                  for m in fidelity.MODELS}  # fmt: skip
        box = {"shift": [0, 1], "seg_zero_style": [c, 0.0], "lens": [c, c]}
        return {"seed": s, "config": {"samples": 4}, "models": models, "misguided_box": box}

    merged = merge([seed(2, 0.3), seed(1, 0.1)])
    assert merged["seeds"] == [1, 2]
    assert merged["val"]["lens"] == [0.1, 0.3]
    assert merged["misguided_box"]["seg_zero_style"] == pytest.approx([0.2, 0.0])
    assert merged["details"]["control"]["val"]["wrong_name"] == [0.5, 0.5]
    assert "0.200 ± 0.141" in fidelity.summary(merged)


def test_shifted_box_moves_by_box_sizes_and_stays_in_the_image():
    box = (10.0, 20.0, 30.0, 60.0)  # 20 x 40
    assert shifted_box(box, 0.0, 1.0, (112, 112)) == box
    right = shifted_box(box, 0.5, 0.0, (112, 112))
    assert right == pytest.approx((20.0, 20.0, 40.0, 60.0))
    down = shifted_box(box, 0.5, math.pi / 2, (112, 112))
    assert down == pytest.approx((10.0, 40.0, 30.0, 80.0))
    far = shifted_box(box, 10.0, 0.0, (112, 112))
    assert 0 <= far[0] < far[2] <= 112 and far[2] - far[0] >= 1


def test_misguided_box_at_zero_shift_is_sam_with_the_true_box():
    preset = get_preset("toy", num_queries=2)
    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    samples = take(toy_split(preset, "val", 3), 3)
    result = misguided_box(model, samples, (0.0, 2.0), seed=0)
    assert result["shift"] == [0.0, 2.0]
    # even a random-weight SAM's masks change when its box moves two box sizes away
    assert result["seg_zero_style"][0] != result["seg_zero_style"][1]
    assert len(result["lens"]) == 2


def test_named_shape_reads_the_shape_a_rationale_settles_on():
    preset = get_preset("toy")
    world = preset.toy_world
    for sample in take(toy_split(preset, "ambiguous", 30), 30):
        answer = f"<think>{sample.rationale}</think><answer>[]</answer>"
        shapes, target = sample.meta["shapes"], sample.meta["target_index"]
        assert names_target(answer, shapes, target, world)
        other = next(i for i in range(len(shapes)) if i != target)
        assert not names_target(answer, shapes, other, world) or (
            (shapes[other].colour, shapes[other].kind)
            == (shapes[target].colour, shapes[target].kind)
        )
    assert named_shape("<think>nothing here</think>", world) is None
    assert named_shape("<think>the large red ring, then the blue cross</think>", world) == (
        None, "blue", "cross",
    )  # fmt: skip
