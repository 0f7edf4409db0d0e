"""The authors' checkpoint layout -> LensModel: renaming, the connector's arithmetic, and a folder
written like a released checkpoint (tiny Qwen2.5-VL + the LENS keys) loaded end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lenslib.authors import (
    AUTHORS_NUM_HEADS,
    authors_connector,
    load_authors_checkpoint,
    map_authors_state_dict,
)
from lenslib.prompts import format_answer
from lenslib.sam import SamSegmenter
from lenslib.toy import ToyWorld, toy_corpus
from lenslib.toy.models import build_toy_mllm, toy_sam_config
from lenslib.toy.tokenizer import build_toy_tokenizer

BLOCK_NAMES = ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")


def authors_state_dict(C=32, M=8, depth=2, P=16, seed=0) -> dict[str, torch.Tensor]:
    """The LENS keys with the authors' names and shapes, random values (as a checkpoint holds)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    sd = {"learnable_query": rand(1, M, C), "connector.pos_embed": rand(1, M, C)}
    for i in range(depth):
        b = f"connector.blocks.{i}."
        sd |= {b + "norm1.weight": 1 + rand(C), b + "norm1.bias": rand(C)}
        sd |= {b + "attn.qkv.weight": rand(3 * C, C), b + "attn.qkv.bias": rand(3 * C)}
        sd |= {b + "attn.proj.weight": rand(C, C), b + "attn.proj.bias": rand(C)}
        sd |= {b + "norm2.weight": 1 + rand(C), b + "norm2.bias": rand(C)}
        sd |= {b + "mlp.fc1.weight": rand(4 * C, C), b + "mlp.fc1.bias": rand(4 * C)}
        sd |= {b + "mlp.fc2.weight": rand(C, 4 * C), b + "mlp.fc2.bias": rand(C)}
    sd |= {"conv_1d.weight": rand(C, C, M), "conv_1d.bias": rand(C)}
    sd |= {"proj_to_sam.0.weight": rand(C, C), "proj_to_sam.0.bias": rand(C)}
    sd |= {"proj_to_sam.2.weight": rand(P, C), "proj_to_sam.2.bias": rand(P)}
    return sd


def authors_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The authors' get_sam_embedding, re-derived from their code: connector (pos_embed, blocks
    of pre-LN attention with 16 heads, no RoPE, QuickGELU MLP, LayerNorm eps 1e-6), conv_1d,
    proj_to_sam. (B, M, C) -> (B, 1, P)."""
    B, L, C = x.shape
    x = x + sd["connector.pos_embed"]
    depth = len({k.split(".")[2] for k in sd if k.startswith("connector.blocks.")})
    for i in range(depth):
        w = {n: (sd[f"connector.blocks.{i}.{n}.weight"], sd[f"connector.blocks.{i}.{n}.bias"])
             for n in BLOCK_NAMES}  # fmt: skip
        h = F.layer_norm(x, (C,), *w["norm1"], eps=1e-6)
        qkv = F.linear(h, *w["attn.qkv"]).reshape(B, L, 3, AUTHORS_NUM_HEADS, -1)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, C / heads)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, C)
        x = x + F.linear(attn, *w["attn.proj"])
        h = F.linear(F.layer_norm(x, (C,), *w["norm2"], eps=1e-6), *w["mlp.fc1"])
        x = x + F.linear(h * torch.sigmoid(1.702 * h), *w["mlp.fc2"])
    x = F.conv1d(x.transpose(1, 2), sd["conv_1d.weight"], sd["conv_1d.bias"]).transpose(1, 2)
    x = F.gelu(F.linear(x, sd["proj_to_sam.0.weight"], sd["proj_to_sam.0.bias"]))
    return F.linear(x, sd["proj_to_sam.2.weight"], sd["proj_to_sam.2.bias"])


# ----------------------------------------------------------------------------- renaming
def test_every_authors_key_gets_its_lenslib_name():
    sd = authors_state_dict(depth=2)
    qwen = {"model.embed_tokens.weight": torch.zeros(3), "visual.x": torch.zeros(1)}
    sam = {"sam.no_mem_embed": torch.ones(1, 1, 4)}
    mapped = map_authors_state_dict(sd | qwen | {"lm_head.weight": torch.zeros(2)} | sam)
    assert mapped["queries.queries"].shape == (8, 32)
    assert torch.equal(mapped["queries.queries"], sd["learnable_query"][0])
    assert (
        mapped["connector.blocks.1.self_attn.in_proj_weight"]
        is sd["connector.blocks.1.attn.qkv.weight"]
    )
    assert mapped["connector.blocks.0.linear2.bias"] is sd["connector.blocks.0.mlp.fc2.bias"]
    assert mapped["connector.pool.weight"] is sd["conv_1d.weight"]
    assert mapped["connector.proj.2.weight"] is sd["proj_to_sam.2.weight"]
    assert mapped["sam.sam.no_mem_embed"] is sam["sam.no_mem_embed"]
    assert not any(k.startswith(("model.", "visual.", "lm_head.")) for k in mapped)
    assert len(mapped) == len(sd) + len(sam)


def test_mapped_weights_compute_what_the_authors_connector_computes():
    C, M, depth, P = 32, 8, 2, 16
    sd = authors_state_dict(C, M, depth, P)
    mapped = map_authors_state_dict(sd)
    connector = authors_connector(C, M, depth, P).eval()
    state = {k.removeprefix("connector."): v for k, v in mapped.items() if "connector." in k}
    connector.load_state_dict(state, strict=True)
    x = torch.randn(3, M, C, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = connector(x), authors_forward(sd, x)
    assert ours.shape == (3, 1, P)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    # the same weights with exact GELU (lenslib's default) compute something else
    wrong = authors_connector(C, M, depth, P).eval()
    wrong.load_state_dict(state)
    for block in wrong.blocks:
        block.activation = torch.nn.GELU()
    with torch.no_grad():
        assert not torch.allclose(wrong(x), theirs, atol=1e-5)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda sd: sd.update({"connector.blocks.0.attn.q.weight": torch.zeros(1)}), "attn.q.w"),
        (lambda sd: sd.update({"learnable_queries": torch.zeros(1)}), "learnable_queries"),
        (lambda sd: sd.pop("conv_1d.bias"), "missing.*conv_1d.bias"),
        (lambda sd: sd.pop("connector.blocks.1.mlp.fc1.weight"), "blocks.1.mlp.fc1.weight"),
        (lambda sd: sd.pop("learnable_query"), "missing.*learnable_query"),
        (lambda sd: sd.update({"learnable_query": torch.zeros(8, 32)}), r"\(1, M, C\)"),
        (lambda sd: sd.update({"connector.pos_embed": torch.zeros(1, 4, 32)}), "pos_embed"),
        (lambda sd: sd.update({"conv_1d.weight": torch.zeros(32, 32, 3)}), "conv_1d.weight"),
    ],
)
def test_bad_keys_and_shapes_are_named(change, message):
    sd = authors_state_dict()
    change(sd)
    with pytest.raises(ValueError, match=message):
        map_authors_state_dict(sd)


def test_a_checkpoint_without_connector_blocks_is_refused():
    sd = {k: v for k, v in authors_state_dict().items() if ".blocks." not in k}
    with pytest.raises(ValueError, match="connector.blocks.0"):
        map_authors_state_dict(sd)


# ----------------------------------------------------------------------------- a folder
@pytest.fixture(scope="module")
def tiny_parts():
    tokenizer = build_toy_tokenizer(toy_corpus(ToyWorld().config))
    mllm, processor = build_toy_mllm(tokenizer, num_layers=1)
    sam = SamSegmenter(toy_sam_config())
    return mllm, processor, sam


def write_checkpoint(folder, mllm, processor, lens_keys, same_file: bool) -> None:
    """A folder like a released one: Qwen's save_pretrained, the LENS keys either in an extra
    safetensors file or in the same file as Qwen's weights (the real layout)."""
    mllm.save_pretrained(folder)
    processor.save_pretrained(folder)
    if same_file:
        weights = load_file(str(folder / "model.safetensors"))
        save_file(weights | lens_keys, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_file(lens_keys, str(folder / "lens_extra.safetensors"))


@pytest.mark.parametrize("same_file", [False, True], ids=["extra-file", "same-file"])
def test_load_folder_puts_every_value_where_it_belongs(tiny_parts, tmp_path, same_file):
    mllm, processor, sam = tiny_parts
    C, M = mllm.config.text_config.hidden_size, 8
    sd = authors_state_dict(C=C, M=M, depth=1, P=sam.prompt_dim)
    sam_sd = {f"sam.{k}": v + 0.5 for k, v in sam.sam.state_dict().items()}  # "trained" SAM
    write_checkpoint(tmp_path, mllm, processor, sd | sam_sd, same_file)

    model = load_authors_checkpoint(tmp_path, toy_sam_config(), dtype=torch.float32)
    assert model.cfg.num_queries == M and model.cfg.connector_depth == 1
    assert (model.cfg.connector_kind, model.cfg.connector_output) == ("vit", "pooled")
    assert model.cfg.mrope == "authors"
    assert torch.equal(model.queries.queries, sd["learnable_query"][0])
    assert torch.equal(model.connector.pos_embed, sd["connector.pos_embed"])
    block = model.connector.blocks[0]
    assert block.self_attn.num_heads == AUTHORS_NUM_HEADS
    assert torch.equal(block.self_attn.in_proj_weight, sd["connector.blocks.0.attn.qkv.weight"])
    assert torch.equal(block.self_attn.out_proj.bias, sd["connector.blocks.0.attn.proj.bias"])
    assert torch.equal(block.linear1.weight, sd["connector.blocks.0.mlp.fc1.weight"])
    assert torch.equal(block.norm2.weight, sd["connector.blocks.0.norm2.weight"])
    assert torch.equal(model.connector.pool.weight, sd["conv_1d.weight"])
    assert torch.equal(model.connector.proj[2].bias, sd["proj_to_sam.2.bias"])
    decoder = model.sam.sam.sam_mask_decoder.iou_prediction_head.layers[0].weight
    assert torch.equal(decoder, sam_sd["sam.sam_mask_decoder.iou_prediction_head.layers.0.weight"])
    for (name, ours), theirs in zip(model.mllm.state_dict().items(), mllm.state_dict().values()):
        assert torch.equal(ours, theirs), name

    s = ToyWorld(seed=0).sample("val", 0)
    with torch.no_grad():
        out = model.forward_answers(
            [s.image], [s.text], [format_answer(s.rationale, s.box, s.text)]
        )
    assert out.prompts.shape == (1, 1, sam.prompt_dim)  # pooled: ONE prompt token
    assert out.mask_logits.shape == (1, *s.image.shape[:2])
    assert np.isfinite(out.mask_logits.numpy()).all()


def test_folder_errors_name_the_problem(tiny_parts, tmp_path):
    mllm, processor, sam = tiny_parts
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_authors_checkpoint(tmp_path / "nowhere", toy_sam_config())
    plain = tmp_path / "plain"
    mllm.save_pretrained(plain)
    processor.save_pretrained(plain)
    with pytest.raises(ValueError, match="plain Qwen2.5-VL"):
        load_authors_checkpoint(plain, toy_sam_config())
    # a Qwen tensor missing: transformers would only warn and initialise it at random
    C = mllm.config.text_config.hidden_size
    holey = tmp_path / "holey"
    write_checkpoint(holey, mllm, processor, authors_state_dict(C=C, P=128), same_file=True)
    weights = load_file(str(holey / "model.safetensors"))
    del weights["model.layers.0.mlp.up_proj.weight"]
    save_file(weights, str(holey / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="some weights were not loaded"):
        load_authors_checkpoint(holey, toy_sam_config(), dtype=torch.float32)
    # LENS keys made for SAM's real prompt width 256, but the toy SAM takes 128
    wide = tmp_path / "wide"
    write_checkpoint(wide, mllm, processor, authors_state_dict(C=C, P=256), same_file=False)
    with (
        pytest.warns(UserWarning, match="SAM2 is random"),
        pytest.raises(ValueError, match=r"proj_to_sam.2.weight has shape \(256"),
    ):
        load_authors_checkpoint(wide, toy_sam_config(), dtype=torch.float32)
