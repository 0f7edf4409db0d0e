"""Tests of the toy MLLM recipe's world-v2 options (lenslib.toy.pretrain_mllm): the name
look-up from the deciding sentence, the warm start across vocabularies, the CLI flags, and
`load_bases(version=2)`."""

from __future__ import annotations

import json

import pytest
import torch

from lenslib.presets import get_preset
from lenslib.toy import ToyWorld, ToyWorldConfig, toy_corpus
from lenslib.toy.models import (
    ASSET_DIRS,
    INFO_FILE,
    build_toy_mllm,
    load_bases,
    load_toy_mllm,
    toy_mllm_world,
)
from lenslib.toy.pretrain_mllm import (
    MllmPretrainConfig,
    locate_positions,
    main,
    make_batch,
    save_toy_mllm,
    target_kind,
    warm_start_from,
)
from lenslib.toy.tokenizer import build_toy_tokenizer

V2 = ToyWorldConfig(version=2)
TINY = {"num_layers": 1, "hidden_size": 64, "vision_hidden_size": 32, "vision_depth": 1}


@pytest.fixture(scope="module")
def tokenizer_v2():
    return build_toy_tokenizer(toy_corpus(V2), max_coordinate=V2.image_size)


def test_locate_from_last_starts_at_the_deciding_sentence(tokenizer_v2):
    _, processor = build_toy_mllm(tokenizer_v2, **TINY)
    samples = ToyWorld(V2, seed=0).split("train", 6)
    cfg = MllmPretrainConfig(model=TINY, world=V2, locate_from="last")
    batch, targets = make_batch(samples, processor, cfg)
    think_end = tokenizer_v2.convert_tokens_to_ids("</think>")
    where = locate_positions(batch["input_ids"], batch["labels"], targets.name_ids, think_end)
    for row, sample in enumerate(samples):
        tokens = tokenizer_v2.convert_ids_to_tokens(batch["input_ids"][row][where[row]])
        text = "".join(tokens)
        assert tokens[0] == target_kind(sample) and tokens[-1] == "<|im_end|>"
        # from the last naming of the target's kind in the rationale: its deciding sentence
        rationale_rest = sample.rationale[sample.rationale.rindex(target_kind(sample)) :]
        assert text.startswith(rationale_rest + "</think>")
    first = locate_positions(batch["input_ids"], batch["labels"], targets.name_ids)
    assert (first.sum(1) >= where.sum(1)).all()  # "first" starts earlier or at the same token
    with pytest.raises(ValueError, match="locate_from"):
        MllmPretrainConfig(locate_from="middle")


def test_warm_start_copies_shared_words_and_same_shaped_weights(tmp_path, tokenizer_v2):
    tokenizer_v1 = build_toy_tokenizer(toy_corpus(), max_coordinate=112)
    old, old_processor = build_toy_mllm(tokenizer_v1, seed=1, **TINY)
    save_toy_mllm(old, old_processor, tmp_path, {"steps": 0})
    new, _ = build_toy_mllm(tokenizer_v2, seed=2, **TINY)
    counts = warm_start_from(new, tokenizer_v2, tmp_path)
    v1_words, v2_words = tokenizer_v1.get_vocab(), tokenizer_v2.get_vocab()
    assert counts["rows"] == len(set(v1_words) & set(v2_words))
    assert counts["new_rows"] == len(set(v2_words) - set(v1_words)) > 0
    old_emb, new_emb = old.get_input_embeddings().weight, new.get_input_embeddings().weight
    for word in (" circle", "</think>", "37"):
        assert torch.equal(new_emb[v2_words[word]], old_emb[v1_words[word]])
    fresh, _ = build_toy_mllm(tokenizer_v2, seed=2, **TINY)
    ring = v2_words[" ring"]  # a v2 word keeps its random row
    assert torch.equal(new_emb[ring], fresh.get_input_embeddings().weight[ring])
    layer = "model.language_model.layers.0.mlp.up_proj.weight"
    assert torch.equal(new.state_dict()[layer], old.state_dict()[layer])
    with pytest.raises(ValueError, match="not both"):
        MllmPretrainConfig(warm_start="a", init_from="b")


def test_cli_world_version_2_writes_a_v2_asset(tmp_path):
    out = tmp_path / "mllm"
    argv = ["--out", str(out), "--steps", "2", "--batch-size", "2", "--eval-samples", "2"]
    argv += ["--dense-layer", "1", "--model", json.dumps(TINY), "--world-version", "2"]
    main([*argv, "--eval-every", "1", "--save-every-eval"])
    saved = json.loads((out / INFO_FILE).read_text())
    assert saved["config"]["world"]["version"] == 2 and saved["config"]["locate_from"] == "last"
    assert "partial" not in saved  # the final save replaces the intermediate one
    assert toy_mllm_world(out).config == V2
    model, processor = load_toy_mllm(directory=out)
    assert processor.tokenizer.get_vocab() == build_toy_tokenizer(toy_corpus(V2)).get_vocab()


def test_load_bases_knows_the_v2_assets():
    with pytest.raises(ValueError, match="version 3"):
        load_bases(version=3)
    mllm_dir, sam_dir = ASSET_DIRS[2]
    if not (mllm_dir / INFO_FILE).is_file() or not (sam_dir / "sam.json").is_file():
        pytest.skip("world v2 base models not written yet")
    mllm, processor, sam = load_bases(version=2)
    assert toy_mllm_world(mllm_dir).config == V2
    # the toy preset trains LENS on exactly the world these bases were pretrained on
    assert get_preset("toy").toy_world == V2
    assert processor.tokenizer.convert_tokens_to_ids(" ring") != processor.tokenizer.unk_token_id
    assert sam.prompt_dim == 128 and not mllm.training
