"""Tests for lenslib.mllm (Qwen2.5-VL helpers) and the toy models it runs on (lenslib.toy)."""

from __future__ import annotations

import json
import random
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import (
    GPT2Config,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from lenslib.mllm import (
    EOS_TOKEN,
    IGNORE_INDEX,
    PAD_TOKEN,
    QWEN_CHAT_TEMPLATE,
    QWEN_SPECIAL_TOKENS,
    append_completions,
    build_inputs,
    completion_mask,
    generate,
    load_mllm,
    repeat_batch,
    tokenize_completions,
)
from lenslib.prompts import FORMAT_PATTERN, chat_messages, format_answer, user_prompt
from lenslib.toy.models import build_toy_mllm, default_mrope_section, toy_qwen_config
from lenslib.toy.tokenizer import SCAFFOLD_TOKENS, UNK_TOKEN, build_toy_tokenizer

S = 112  # toy image side = largest coordinate
WORDS = ["red", "blue", "green", "circle", "square", "triangle", "left", "right", "top", "bottom"]
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def toy_corpus() -> list[str]:
    """Texts like the toy world's, built with lenslib.prompts."""
    rng = random.Random(0)
    texts = []
    for _ in range(30):
        label = f"{rng.choice(WORDS[:3])} {rng.choice(WORDS[3:6])}"
        rationale = f"The {label} is at the {rng.choice(WORDS[6:])}, next to a {rng.choice(WORDS)}."
        box = sorted(rng.sample(range(S + 1), 2)) + sorted(rng.sample(range(S + 1), 2))
        texts += [
            user_prompt(label),
            format_answer(rationale, [box[0], box[2], box[1], box[3]], label),
        ]
    return texts


@pytest.fixture(scope="module")
def tokenizer():
    return build_toy_tokenizer(toy_corpus(), max_coordinate=S)


@pytest.fixture(scope="module")
def toy(tokenizer):
    return build_toy_mllm(tokenizer, num_layers=2)


def images(*shapes: tuple[int, int]) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def parse_box(text: str) -> list[int]:
    """The answer parser's job in miniature: <answer>[json]</answer> -> bbox_2d."""
    answer = ANSWER_RE.search(text)
    assert answer is not None, text
    return json.loads(answer.group(1))[0]["bbox_2d"]


# ----------------------------------------------------------------------------- tokenizer
def test_special_tokens_have_qwen_order_and_roles(tokenizer):
    assert tokenizer.convert_tokens_to_ids(QWEN_SPECIAL_TOKENS) == list(range(14))
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == PAD_TOKEN
    assert tokenizer.unk_token == UNK_TOKEN and tokenizer.padding_side == "left"
    text = "".join(QWEN_SPECIAL_TOKENS)
    assert tokenizer(text)["input_ids"] == list(range(14))  # each special is one token


def test_chat_template_is_qwens(tokenizer):
    text = tokenizer.apply_chat_template(
        chat_messages("red circle"), add_generation_prompt=True, tokenize=False
    )
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        f"<|vision_start|><|image_pad|><|vision_end|>{user_prompt('red circle')}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert text == expected
    ids = tokenizer(text)["input_ids"]
    assert UNK_TOKEN not in tokenizer.convert_ids_to_tokens(ids)
    assert tokenizer.decode(ids) == text  # exact round trip


def test_coordinates_and_scaffolding_are_single_tokens(tokenizer):
    for value in range(S + 1):
        assert tokenizer.tokenize(str(value)) == [str(value)]
    for piece in SCAFFOLD_TOKENS:
        assert tokenizer.tokenize(piece) == [piece]
    answer = format_answer("The red circle is at the left.", [1, 2, 30, 40], "red circle")
    assert len(tokenizer(answer)["input_ids"]) < 40  # compact targets: one token per coordinate


def test_unknown_words_become_unk(tokenizer):
    ids = tokenizer("a purple hexagon, 7 zebras")["input_ids"]
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert tokens.count(UNK_TOKEN) == 3  # purple, hexagon, zebras
    assert "7" in tokens


def test_tokenizer_is_deterministic():
    corpus = toy_corpus()
    a = build_toy_tokenizer(corpus, max_coordinate=S).get_vocab()
    b = build_toy_tokenizer(list(reversed(corpus)), max_coordinate=S).get_vocab()
    assert a == b


def test_tokenizer_rejects_bad_input():
    with pytest.raises(TypeError, match="strings"):
        build_toy_tokenizer(["ok", 3])
    with pytest.raises(ValueError, match="max_coordinate"):
        build_toy_tokenizer(["ok"], max_coordinate=0)


@settings(max_examples=60, deadline=None)
@given(
    box=st.lists(st.integers(0, S), min_size=4, max_size=4),
    label=st.lists(st.sampled_from(WORDS), min_size=1, max_size=3).map(" ".join),
    rationale=st.lists(st.sampled_from([*WORDS, "unseenword", ",", "."]), max_size=8).map(" ".join),
)
def test_decoded_answer_parses_to_the_same_box(tokenizer, box, label, rationale):
    text = format_answer(rationale, box, label)
    decoded = tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True)
    assert parse_box(decoded) == box
    assert re.fullmatch(FORMAT_PATTERN, decoded, re.DOTALL)
    if "unseenword" not in rationale:
        assert decoded == text


# ----------------------------------------------------------------------------- toy config
def test_default_mrope_section():
    assert default_mrope_section(128) == [16, 24, 24]  # Qwen2.5-VL's own
    assert default_mrope_section(32) == [4, 6, 6]


def test_toy_config_matches_tokenizer(tokenizer):
    config = toy_qwen_config(tokenizer, hidden_size=64, num_heads=2, num_kv_heads=1)
    text, vision = config.text_config, config.vision_config
    assert text.vocab_size == len(tokenizer)
    assert sum(text.rope_parameters["mrope_section"]) == (64 // 2) // 2
    assert vision.out_hidden_size == text.hidden_size == 64
    assert max(vision.fullatt_block_indexes) < vision.depth
    assert config.image_token_id == tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert config.video_token_id == tokenizer.convert_tokens_to_ids("<|video_pad|>")
    assert config.vision_start_token_id == tokenizer.convert_tokens_to_ids("<|vision_start|>")
    assert text.eos_token_id == tokenizer.eos_token_id
    assert text.pad_token_id == tokenizer.pad_token_id


def test_toy_config_rejects_bad_sizes(tokenizer):
    with pytest.raises(ValueError, match="mrope_section"):
        toy_qwen_config(tokenizer, mrope_section=[16, 24, 24])
    with pytest.raises(ValueError, match="heads"):
        toy_qwen_config(tokenizer, hidden_size=100, num_heads=3)


def test_toy_model_is_small_and_seeded(tokenizer, toy):
    model, _ = toy
    n_params = sum(p.numel() for p in model.parameters())
    assert 3e5 < n_params < 2e6
    state = torch.random.get_rng_state()
    again, _ = build_toy_mllm(tokenizer, num_layers=2)
    other, _ = build_toy_mllm(tokenizer, num_layers=2, seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    w = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[w], again.state_dict()[w])
    assert not torch.equal(model.state_dict()[w], other.state_dict()[w])


# ----------------------------------------------------------------------------- processor / batches
def test_processor_keeps_112_images_at_16_tokens(toy):
    _, processor = toy
    batch = build_inputs(processor, images((112, 112), (224, 224), (56, 112)), ["a", "b", "c"])
    grids = batch["image_grid_thw"].tolist()
    assert grids == [[1, 8, 8], [1, 8, 8], [1, 4, 8]]  # 224 is scaled down to the 112^2 budget
    n_image = (batch["input_ids"] == processor.image_token_id).sum(1).tolist()
    assert n_image == [16, 16, 8]
    assert batch["pixel_values"].shape == (64 + 64 + 32, 3 * 2 * 14 * 14)
    assert torch.equal(batch["mm_token_type_ids"].sum(1), torch.tensor(n_image))


def test_build_inputs_pads_left(toy):
    _, processor = toy
    batch = build_inputs(processor, images((112, 112), (112, 112)), ["red", "big blue square"])
    mask = batch["attention_mask"]
    assert mask[0, 0] == 0 and mask[1, 0] == 1 and (mask[:, -1] == 1).all()
    last = processor.tokenizer.convert_ids_to_tokens(batch["input_ids"][:, -3:].flatten().tolist())
    assert last[-3:] == ["<|im_start|>", "assistant", "\n"]  # generation prompt ends each row


def test_build_inputs_with_completions_teacher_forces(toy):
    _, processor = toy
    prompt = build_inputs(processor, images((112, 112), (112, 112)), ["red", "blue"])
    answers = [format_answer("The red circle.", [1, 2, 3, 4], "red circle"), "left"]
    batch = build_inputs(processor, images((112, 112), (112, 112)), ["red", "blue"], answers)
    P = prompt["input_ids"].shape[1]
    assert torch.equal(batch["input_ids"][:, :P], prompt["input_ids"])
    assert (batch["labels"][:, :P] == IGNORE_INDEX).all()
    completion_ids, mask = tokenize_completions(processor, answers)
    assert torch.equal(batch["input_ids"][:, P:], completion_ids)
    assert completion_ids[1, mask[1].sum() - 1] == processor.tokenizer.eos_token_id
    assert (batch["labels"][1, P + int(mask[1].sum()) :] == IGNORE_INDEX).all()
    assert processor.tokenizer.decode(batch["labels"][0, P:]) == answers[0] + EOS_TOKEN
    with pytest.raises(ValueError, match="completions"):
        build_inputs(processor, images((112, 112)), ["red"], ["a", "b"])
    with pytest.raises(ValueError, match="fit"):
        append_completions(prompt, completion_ids[:1], mask[:1])


def test_teacher_forced_batch_gives_a_finite_lm_loss(toy):
    model, processor = toy
    answers = [format_answer("A red circle.", [1, 2, 3, 4], "red circle")] * 2
    batch = build_inputs(processor, images((112, 112), (56, 112)), ["red", "blue"], answers)
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss > 0


def test_repeat_batch_equals_repeated_images(toy):
    _, processor = toy
    imgs = images((112, 112), (56, 112))
    repeated = repeat_batch(build_inputs(processor, imgs, ["a", "b"]), 3)
    direct = build_inputs(processor, [imgs[0]] * 3 + [imgs[1]] * 3, ["a"] * 3 + ["b"] * 3)
    assert set(repeated) == set(direct)
    for key in direct:
        assert torch.equal(repeated[key], direct[key]), key


# ----------------------------------------------------------------------------- generation
def test_generate_is_one_batched_call(toy, monkeypatch):
    model, processor = toy
    calls = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda **kw: calls.append(kw) or original(**kw))
    torch.manual_seed(0)
    imgs = images((112, 112), (56, 112))
    out = generate(model, processor, imgs, ["red", "blue"], 12, num_return_sequences=4)
    assert len(calls) == 1 and calls[0]["num_return_sequences"] == 4
    assert out.completion_ids.shape[0] == 8 and out.completion_ids.shape[1] <= 12
    assert len(out.texts) == 8 and out.prompt["input_ids"].shape[0] == 2
    eos = processor.tokenizer.eos_token_id
    assert torch.equal(out.completion_mask, completion_mask(out.completion_ids, eos))


def test_greedy_generation_stops_at_im_end_and_is_deterministic(toy):
    model, processor = toy
    eos = processor.tokenizer.eos_token_id
    # make <|im_end|> the likeliest next token everywhere: generation must stop at once
    bias = torch.zeros(model.lm_head.out_features)
    bias[eos] = 100.0
    model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        out = generate(model, processor, images((112, 112)), ["red"], 10, do_sample=False)
    finally:
        model.lm_head.bias = None
    assert out.completion_ids.tolist() == [[eos]] and out.texts == [""]
    a = generate(model, processor, images((112, 112)), ["red"], 6, do_sample=False)
    b = generate(model, processor, images((112, 112)), ["red"], 6, do_sample=False)
    assert torch.equal(a.completion_ids, b.completion_ids)


# ----------------------------------------------------------------------------- save / load
def test_generation_never_writes_an_image_placeholder(toy):
    model, processor = toy
    # make <|image_pad|> the likeliest token everywhere: a forward over prompt + completion
    # would then count one image token more than the image has features
    pad = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    bias = torch.zeros(model.lm_head.out_features)
    bias[pad] = 100.0
    model.lm_head.bias = torch.nn.Parameter(bias)
    try:
        for sample in (False, True):
            out = generate(model, processor, images((112, 112)), ["red"], 6, do_sample=sample)
            assert out.completion_ids.shape[1] == 6
            assert not (out.completion_ids == pad).any()
    finally:
        model.lm_head.bias = None


def test_save_and_load_round_trip(toy, tmp_path):
    model, processor = toy
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, loaded_processor = load_mllm(str(tmp_path), dtype=torch.float32, max_pixels=S * S)
    assert isinstance(loaded, Qwen2_5_VLForConditionalGeneration)
    assert loaded_processor.tokenizer.padding_side == "left"
    imgs, queries = images((112, 112), (56, 112)), ["red circle", "blue"]
    answers = [format_answer("The red circle.", [1, 2, 3, 4], "red circle"), "blue"]
    batch = build_inputs(processor, imgs, queries, answers)
    batch_loaded = build_inputs(loaded_processor, imgs, queries, answers)
    for key in batch:
        assert torch.equal(batch[key], batch_loaded[key]), key
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch_loaded).logits)
    ids = batch["input_ids"][0]
    assert loaded_processor.tokenizer.decode(ids) == processor.tokenizer.decode(ids)


def test_load_mllm_sets_pixel_budget(toy, tmp_path):
    model, processor = toy
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    _, small = load_mllm(str(tmp_path), dtype=torch.float32, max_pixels=56 * 56)
    assert build_inputs(small, images((112, 112)), ["a"])["image_grid_thw"].tolist() == [[1, 4, 4]]
    with pytest.raises(ValueError, match="min_pixels"):
        load_mllm(str(tmp_path), dtype=torch.float32, max_pixels=100, min_pixels=1000)


def test_load_mllm_picks_qwen2_vl_class(tokenizer, tmp_path):
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128,
                     "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                     "bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                         "mrope_section": [4, 6, 6]}},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2},
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
    )  # fmt: skip
    Qwen2VLForConditionalGeneration(config).save_pretrained(tmp_path)
    pixels = {"min_pixels": 784, "max_pixels": S * S}
    Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    ).save_pretrained(tmp_path)
    model, processor = load_mllm(str(tmp_path), dtype=torch.float32, max_pixels=S * S)
    assert isinstance(model, Qwen2VLForConditionalGeneration)
    batch = build_inputs(processor, images((112, 112)), ["red"], ["The red circle."])
    assert torch.isfinite(model(**batch).loss)


def test_load_mllm_rejects_other_models(tmp_path):
    GPT2Config(n_layer=1).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gpt2"):
        load_mllm(str(tmp_path))


def test_completion_mask_stops_after_first_eos():
    eos = 9
    ids = torch.tensor([[1, 2, eos, 3, eos], [1, 2, 3, 4, 5], [eos, 1, 1, 1, 1]])
    mask = completion_mask(ids, eos)
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
