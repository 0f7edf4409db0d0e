"""lenslib.fidelity: the world-v2 experiments run end to end (tiny steps), merge per seed, and
their building blocks do what they say."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest
import torch

import lenslib.fidelity as fidelity
from lenslib.fidelity import FidelityConfig, merge, misguided_box, run_fidelity, shifted_box
from lenslib.model import Rollouts
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


class TwoKindsOfAnswer:
    """A stand-in LENS model whose answers alternate "right", "wrong" within every call."""

    def generate(self, images, texts, group_size=1, **_):
        n = len(images) * group_size
        answers = ["right" if row % 2 == 0 else "wrong" for row in range(n)]
        ids = torch.zeros(n, 1, dtype=torch.long)
        return Rollouts(ids, torch.ones_like(ids), answers, [None] * n, group_size)

    def __call__(self, images, texts, ids, mask, group_size=1, boxes=None):
        return SimpleNamespace(mask_logits=torch.zeros(len(ids), 4, 4))


def test_reward_gaps_pays_the_right_answers_what_their_rewards_say(monkeypatch):
    preset = get_preset("toy", group_size=4)
    samples = take(toy_split(preset, "val", 3), 3)
    monkeypatch.setattr(fidelity, "names", lambda sample, text, preset: text == "right")

    def rewards(samples, rollouts, mask_logits, cfg):  # right answers: R_box 0.9, R_seg 0.3
        right = torch.tensor([t == "right" for t in rollouts.texts]).float()
        return {"box": 0.9 * right, "seg": 0.3 * right + 0.1}

    monkeypatch.setattr(fidelity, "score_rollouts", rewards)
    gaps = fidelity.reward_gaps(TwoKindsOfAnswer(), samples, preset, batch=2)
    assert gaps["greedy"] == pytest.approx(2 / 3)  # rows right, wrong | right
    assert gaps["one_sample"] == 0.5 and gaps["pass_at_g"] == 1.0 and gaps["mixed"] == 1.0
    assert gaps["box_gap"] == pytest.approx(0.9) and gaps["seg_gap"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="no samples"):
        fidelity.reward_gaps(TwoKindsOfAnswer(), [], preset)


def test_reward_gaps_on_a_real_tiny_model_are_shares():
    preset = tiny_preset()
    samples = take(toy_split(preset, "ambiguous", 2), 2)
    torch.manual_seed(0)
    gaps = fidelity.reward_gaps(build_lens(preset, "cpu", False), samples, preset)
    assert all(0 <= gaps[k] <= 1 for k in ("greedy", "one_sample", "pass_at_g", "mixed"))
    assert gaps["pass_at_g"] >= gaps["one_sample"] and gaps["pass_at_g"] >= gaps["mixed"]
