"""Tests for lenslib.context: context queries (eq. 2) and the connector (eq. 3, Table 4)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import (
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessor,
    Qwen2VLProcessor,
    Qwen2VLVideoProcessor,
)

from lenslib.context import Connector, ContextQueries, context_position_ids
from lenslib.mllm import QWEN_CHAT_TEMPLATE, build_inputs
from lenslib.prompts import format_answer, user_prompt
from lenslib.toy.models import build_toy_mllm
from lenslib.toy.tokenizer import build_toy_tokenizer

M = 8  # queries in these tests (the paper: 64)
QUERIES = ["red circle", "big blue square", "circle"]
ANSWERS = [
    format_answer(
        "The red circle is at the top left, next to a square.", [3, 4, 50, 60], "red circle"
    ),
    "The big",
    format_answer("A circle.", [1, 2, 3, 4], "circle"),
]


@pytest.fixture(scope="module")
def toy():
    corpus = [user_prompt(q) for q in QUERIES] + ANSWERS
    model, processor = build_toy_mllm(build_toy_tokenizer(corpus), num_layers=2)
    return model.float().eval(), processor


@pytest.fixture(scope="module")
def imgs():
    rng = np.random.default_rng(0)
    shapes = [(112, 112), (56, 112), (84, 56)]  # 16, 8 and 6 image tokens
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


def context_queries(mrope: str = "correct") -> ContextQueries:
    torch.manual_seed(0)
    return ContextQueries(num_queries=M, hidden_size=128, mrope=mrope)


def _prompt_width(batch) -> int:
    return int((batch["labels"] != -100).any(0).nonzero().min())


# ----------------------------------------------------------------------------- queries
def test_queries_init_and_shape():
    cq = ContextQueries(num_queries=64, hidden_size=256)
    assert cq.queries.shape == (64, 256) and cq.num_queries == 64
    assert abs(cq.queries.std().item() - 0.02) < 0.002
    with pytest.raises(ValueError, match="mrope"):
        ContextQueries(mrope="1d")


@torch.no_grad()
def test_readout_is_the_same_alone_and_in_a_padded_batch(toy, imgs):
    """Rows of different prompt, image and completion lengths: padding must not leak in."""
    model, processor = toy
    cq = context_queries()
    batch = build_inputs(processor, imgs, QUERIES, ANSWERS)
    T = batch["input_ids"].shape[1] - _prompt_width(batch)
    together = cq(model, batch, logits_to_keep=T)
    assert together.queries.shape == (3, M, 128)
    assert together.logits.shape == (3, T, model.config.text_config.vocab_size)
    for i in range(3):
        alone_batch = build_inputs(
            processor, imgs[i : i + 1], QUERIES[i : i + 1], ANSWERS[i : i + 1]
        )
        T_i = int((alone_batch["labels"] != -100).sum())
        alone = cq(model, alone_batch, logits_to_keep=T_i)
        torch.testing.assert_close(together.queries[i], alone.queries[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.logits[i, :T_i], alone.logits[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(together.queries[0], together.queries[1], atol=1e-3)


@torch.no_grad()
def test_readout_logits_are_the_plain_forward_logits(toy, imgs):
    """The queries come last, so causal attention leaves the completion's logits unchanged."""
    model, processor = toy
    batch = build_inputs(processor, imgs, QUERIES, ANSWERS)
    T = batch["input_ids"].shape[1] - _prompt_width(batch)
    readout = context_queries()(model, batch, logits_to_keep=T)
    labels = batch.pop("labels")
    plain = model(**batch).logits[:, -T - 1 : -1]  # (B, T, V)
    keep = labels[:, -T:] != -100
    torch.testing.assert_close(readout.logits[keep], plain[keep], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_correct_positions_equal_the_models_own(toy, imgs):
    """Explicit get_rope_index positions == the model's own (ids + embeds)."""
    model, processor = toy
    cq = context_queries()
    batch = build_inputs(processor, imgs, QUERIES, ANSWERS)
    ours = cq(model, batch).queries
    B, L = batch["input_ids"].shape
    ids = torch.cat([batch["input_ids"], torch.zeros(B, M, dtype=torch.long)], 1)
    embeds = torch.cat(
        [model.get_input_embeddings()(batch["input_ids"]), cq.queries.expand(B, M, -1)], 1
    )
    theirs = model.model(
        input_ids=ids,
        inputs_embeds=embeds,
        attention_mask=torch.cat([batch["attention_mask"], torch.ones(B, M, dtype=torch.long)], 1),
        mm_token_type_ids=torch.cat(
            [batch["mm_token_type_ids"], torch.zeros(B, M, dtype=torch.long)], 1
        ),
        pixel_values=batch["pixel_values"],
        image_grid_thw=batch["image_grid_thw"],
    ).last_hidden_state[:, L:]
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_authors_option_uses_1d_positions(toy, imgs):
    model, processor = toy
    batch = build_inputs(processor, imgs[:1], QUERIES[:1], ANSWERS[:1])
    args = (
        batch["input_ids"],
        batch["attention_mask"],
        batch["mm_token_type_ids"],
        batch["image_grid_thw"],
    )
    correct = context_position_ids(model, *args, mrope="correct")  # (3, 1, L)
    authors = context_position_ids(model, *args, mrope="authors")
    L = batch["input_ids"].shape[1]
    assert torch.equal(authors[0], authors[1]) and torch.equal(authors[1], authors[2])
    assert torch.equal(authors[0, 0], torch.arange(L))
    image = batch["mm_token_type_ids"][0].bool()
    assert not torch.equal(
        correct[1, 0, image], correct[2, 0, image]
    )  # rows vs columns of the grid
    assert correct[0, 0, -1] < authors[0, 0, -1]  # 16 image tokens take only 8 mRoPE steps
    a = context_queries("authors")(model, batch).queries
    c = context_queries("correct")(model, batch).queries
    assert not torch.allclose(a, c, atol=1e-4)
    with pytest.raises(ValueError, match="mrope"):
        context_position_ids(model, *args, mrope="none")


def test_gradients_reach_the_queries_through_a_frozen_mllm(toy, imgs):
    model, processor = toy
    model.requires_grad_(False)
    cq = context_queries()
    batch = build_inputs(processor, imgs[:2], QUERIES[:2], ANSWERS[:2])
    cq(model, batch).queries.pow(2).sum().backward()
    assert cq.queries.grad is not None and cq.queries.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    model.requires_grad_(True)


@torch.no_grad()
def test_readout_works_for_qwen2_vl(toy, imgs):
    """LENS-2B uses Qwen2-VL: the same code path must hold (tiny random model)."""
    _, toy_processor = toy
    tokenizer = toy_processor.tokenizer
    text = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128}
    text |= {"num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}
    text |= {"bos_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 1e4,
        "mrope_section": [4, 6, 6],
    }
    config = Qwen2VLConfig(
        text_config=text,
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2},
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
    )
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).eval()
    pixels = {"min_pixels": 784, "max_pixels": 112 * 112}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        video_processor=Qwen2VLVideoProcessor(**pixels),
        tokenizer=tokenizer,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    cq = ContextQueries(num_queries=M, hidden_size=64)
    together = cq(model, build_inputs(processor, imgs[:2], QUERIES[:2], ANSWERS[:2])).queries
    alone = cq(model, build_inputs(processor, imgs[1:2], QUERIES[1:2], ANSWERS[1:2])).queries
    assert together.shape == (2, M, 64)
    torch.testing.assert_close(together[1], alone[0], atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- connector
def transformer_block_params(c: int) -> int:
    """Pre-LN block: qkv (3c^2+3c) + out (c^2+c) + MLP (8c^2+5c) + 2 LayerNorms (4c)."""
    return 12 * c * c + 13 * c


@pytest.mark.parametrize("kind", ["vit", "mlp"])
@pytest.mark.parametrize("output", ["tokens", "pooled"])
def test_connector_shapes_and_gradients(kind, output):
    torch.manual_seed(0)
    connector = Connector(
        hidden_size=32, num_queries=M, kind=kind, output=output, depth=2, num_heads=4
    )
    x = torch.randn(3, M, 32, requires_grad=True)
    y = connector(x)
    assert y.shape == (3, M if output == "tokens" else 1, 256)
    y.pow(2).mean().backward()
    assert x.grad.abs().sum() > 0
    for name, p in connector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["vit", "mlp"])
@pytest.mark.parametrize("output", ["tokens", "pooled"])
def test_connector_parameter_counts(kind, output):
    c, depth = 32, 3
    connector = Connector(hidden_size=c, num_queries=M, kind=kind, output=output, depth=depth)
    body = (
        M * c + depth * transformer_block_params(c) if kind == "vit" else 2 * c + 8 * c * c + 5 * c
    )
    pool = c * c * M + c if output == "pooled" else 0  # Conv1d(c, c, kernel M)
    head = (c * c + c) + (c * 256 + 256)  # Linear(c,c)-GELU-Linear(c,256)
    assert sum(p.numel() for p in connector.parameters()) == body + pool + head


def test_connector_vit_starts_with_zero_positions_and_mixes_queries():
    torch.manual_seed(0)
    connector = Connector(hidden_size=32, num_queries=M, kind="vit", depth=1, num_heads=4)
    assert (connector.pos_embed == 0).all()
    x = torch.randn(1, M, 32)
    x2 = x.clone()
    x2[0, -1] += 1.0  # change the last query only
    y, y2 = connector(x), connector(x2)
    assert not torch.allclose(y[0, 0], y2[0, 0])  # attention carries it to the first token
    mlp = Connector(hidden_size=32, num_queries=M, kind="mlp")
    assert torch.allclose(mlp(x)[0, 0], mlp(x2)[0, 0])  # the MLP connector does not mix


def test_connector_rejects_bad_options():
    with pytest.raises(ValueError, match="kind"):
        Connector(hidden_size=32, kind="cnn")
    with pytest.raises(ValueError, match="output"):
        Connector(hidden_size=32, output="mean")
