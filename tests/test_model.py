"""LensModel at toy scale with random weights: shapes, one forward for log-probs and masks,
freezing per stage, save / load."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from lenslib import grpo
from lenslib.align import align_step
from lenslib.mllm import tokenize_completions
from lenslib.model import LensConfig, LensModel, to_mllm_frame, to_original_frame
from lenslib.prompts import format_answer
from lenslib.sam import SamSegmenter
from lenslib.toy import ToyWorld, toy_corpus
from lenslib.toy.models import build_toy_mllm, toy_sam_config
from lenslib.toy.tokenizer import build_toy_tokenizer
from lenslib.training import ground_truth_answer, make_accelerator


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    tokenizer = build_toy_tokenizer(toy_corpus(ToyWorld().config))
    mllm, processor = build_toy_mllm(tokenizer, num_layers=2)
    sam = SamSegmenter(toy_sam_config())
    return LensModel(mllm, processor, sam, LensConfig(num_queries=8, connector_depth=1))


@pytest.fixture(scope="module")
def samples():
    return ToyWorld(seed=0).split("val", 3)


def test_forward_answers_gives_logits_and_full_size_masks(model, samples):
    images = [s.image for s in samples]
    answers = [format_answer(s.rationale, s.box, s.text) for s in samples]
    out = model.forward_answers(images, [s.text for s in samples], answers)
    n = len(samples)
    assert out.queries.shape == (n, 8, model.mllm.config.text_config.hidden_size)
    assert out.prompts.shape == (n, 8, model.sam.prompt_dim)
    assert out.mask_logits.shape == (n, 112, 112)
    ids, _ = tokenize_completions(model.processor, answers)
    assert out.logits.shape == (n, ids.shape[1], model.mllm.config.text_config.vocab_size)
    # the logits predict the answer: teacher-forced argmax is scored against the same ids
    assert grpo.token_logprobs(out.logits, ids).shape == ids.shape


def test_rollouts_of_a_group_get_their_own_masks_and_logprobs(model, samples):
    images, texts = [s.image for s in samples[:2]], [s.text for s in samples[:2]]
    torch.manual_seed(1)
    rollouts = model.generate(images, texts, group_size=3, max_new_tokens=6, do_sample=True)
    assert rollouts.completion_ids.shape[0] == 6 and len(rollouts.boxes) == 6
    out = model.forward_completions(
        images, texts, rollouts.completion_ids, rollouts.completion_mask, group_size=3
    )
    logp = grpo.token_logprobs(out.logits, rollouts.completion_ids.to(out.logits.device))
    assert logp.shape == rollouts.completion_ids.shape
    assert out.mask_logits.shape == (6, 112, 112)
    # rollouts of one prompt read different text, so their masks differ
    distinct = {tuple(r.tolist()) for r in rollouts.completion_ids[:3]}
    if len(distinct) > 1:
        assert not torch.allclose(out.mask_logits[0], out.mask_logits[1])


def test_gradients_reach_queries_connector_and_mllm_in_rl(model, samples):
    counts = model.set_stage("rl")
    assert all(v > 0 for v in counts.values())
    s = samples[0]
    out = model.forward_answers([s.image], [s.text], [format_answer(s.rationale, s.box, s.text)])
    (out.mask_logits.mean() + out.logits.mean()).backward()
    assert model.queries.queries.grad is not None
    assert next(model.connector.parameters()).grad is not None
    assert model.mllm.lm_head.weight.grad is not None
    assert all(p.grad is None for p in model.sam.sam.image_encoder.parameters())
    model.zero_grad(set_to_none=True)


def test_stages_really_freeze(model):
    align = model.set_stage("align")
    assert align["mllm"] == 0 and align["sam"] == 0
    assert align["queries"] == 8 * model.mllm.config.text_config.hidden_size
    assert align["connector"] == sum(p.numel() for p in model.connector.parameters())
    rl = model.set_stage("rl")
    assert rl["mllm"] == sum(p.numel() for p in model.mllm.parameters())
    encoder = sum(p.numel() for p in model.sam.sam.image_encoder.parameters())
    assert 0 < rl["sam"] < sum(p.numel() for p in model.sam.parameters()) - encoder + 1
    no_vision = model.set_stage("rl", train_vision_tower=False)
    visual = sum(p.numel() for p in model.mllm.model.visual.parameters())
    assert no_vision["mllm"] == rl["mllm"] - visual
    assert sum(model.set_stage("eval").values()) == 0
    with pytest.raises(ValueError):
        model.set_stage("pretrain")


def test_save_and_load_round_trip(model, samples, tmp_path):
    model.eval()
    s = samples[0]
    answer = [format_answer(s.rationale, s.box, s.text)]
    with torch.no_grad():
        before = model.forward_answers([s.image], [s.text], answer)
    model.save_pretrained(tmp_path / "lens")
    loaded = LensModel.from_pretrained(tmp_path / "lens").eval()
    with torch.no_grad():
        after = loaded.forward_answers([s.image], [s.text], answer)
    assert torch.allclose(before.mask_logits, after.mask_logits, atol=1e-5)
    assert torch.allclose(before.logits, after.logits, atol=1e-5)
    saved = model.processor.image_processor.size["longest_edge"]
    assert loaded.processor.image_processor.size["longest_edge"] == saved  # toy budget kept
    with pytest.raises(FileNotFoundError, match="lens_config.json"):
        LensModel.from_pretrained(tmp_path / "nowhere")


def test_box_frames_round_trip():
    box = (10.0, 20.0, 50.0, 60.0)
    seen = to_mllm_frame(box, (56, 112), (100, 200))
    assert np.allclose(seen, (5.6, 11.2, 28.0, 33.6))
    assert np.allclose(to_original_frame(seen, (56, 112), (100, 200)), box)


def test_connector_settings_survive_save_and_load(model, tmp_path):
    cfg = LensConfig(num_queries=4, connector_depth=1, connector_heads=2,
                     connector_activation="quick_gelu", connector_norm_eps=1e-6)  # fmt: skip
    authors_like = LensModel(model.mllm, model.processor, model.sam, cfg)
    assert cfg.sam == {}  # the caller's config is not modified
    authors_like.save_pretrained(tmp_path / "m")
    block = LensModel.from_pretrained(tmp_path / "m").connector.blocks[0]
    assert block.norm1.eps == 1e-6 and block.self_attn.num_heads == 2
    assert block.activation.__name__ == "quick_gelu"


def test_box_prompt_gives_sam_the_answers_own_box_in_teacher_forcing(model, samples, monkeypatch):
    """With cfg.box_prompt, stage 1 and `forward_answers` prompt SAM with each answer's box."""
    monkeypatch.setattr(model, "cfg", replace(model.cfg, box_prompt=True))
    given = []
    decode = model.sam.decode
    monkeypatch.setattr(
        model.sam, "decode", lambda *a, **k: given.append(k["boxes"]) or decode(*a, **k)
    )
    images, texts = [s.image for s in samples], [s.text for s in samples]
    answers = [ground_truth_answer(model, s) for s in samples]
    truth = torch.tensor([s.box for s in samples], dtype=torch.float32)
    model.forward_answers(images, texts, answers)
    assert given[-1] is not None and torch.allclose(given[-1], truth, atol=1.0)
    # one optimiser step of stage 1 (eq. 5) prompts SAM with the same boxes
    model.set_stage("align")
    optimizer = torch.optim.SGD(model.queries.parameters(), lr=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    align_step(model, samples, make_accelerator(cpu=True), optimizer, scheduler)
    assert torch.allclose(given[-1], truth, atol=1.0)
    # without the option SAM gets no box
    monkeypatch.setattr(model, "cfg", replace(model.cfg, box_prompt=False))
    model.forward_answers(images, texts, answers)
    assert given[-1] is None
    model.set_stage("eval")
