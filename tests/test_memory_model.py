"""benchmarks/full_scale_memory.py: the memory estimator's formulas, its sharding rules, and its
activation counts against what autograd really saves in the toy model."""

import importlib.util
import sys
from dataclasses import replace
from pathlib import Path

import pytest

PATH = Path(__file__).parents[1] / "benchmarks" / "full_scale_memory.py"
spec = importlib.util.spec_from_file_location("full_scale_memory", PATH)
fsm = importlib.util.module_from_spec(spec)
sys.modules["full_scale_memory"] = fsm
spec.loader.exec_module(fsm)

# Qwen2.5-VL-3B + SAM2 hiera-L sizes, as `full_sizes` reads them (parameter counts rounded)
SIZES = fsm.ModelSizes(
    name="full", layers=36, hidden=2048, heads=16, kv_heads=2, intermediate=11008,
    vocab=151936, vis_layers=32, vis_hidden=1280, vis_intermediate=3420, vis_patch=14,
    vis_merge=2, vis_temporal_patch=2, num_queries=64, connector_depth=4, sam_image_size=1024,
    params={"vision": 668_700_000, "language": 3_085_900_000, "queries": 131_072,
            "connector": 206_300_000, "sam_encoder": 212_700_000, "sam_trainable": 4_200_000,
            "sam_frozen_rest": 200_000},
)  # fmt: skip
RL = fsm.Launch(
    stage="rl", num_gpus=8, zero=2, rows_per_gpu=64, micro_batch=1, checkpointing=False,
    prompt_tokens=1403, image_tokens=1275, completion_tokens=768, group_size=8,
)  # fmt: skip


def rows(run):
    return {r.part: r.nbytes for r in fsm.estimate(SIZES, run)}


def test_qwen_block_activations_per_token_and_layer():
    # 8 h + e (8 h + 4 i) with weights training, 8 h + e (4 h + 3 i) frozen (bf16: e = 2)
    assert fsm.layer_bytes_per_token(2048, 11008, 2, trainable=True) == 137_216
    assert fsm.layer_bytes_per_token(2048, 11008, 2, trainable=False) == 98_816


def test_zero_stages_shard_what_the_zero_paper_says():
    ddp, z2, z3 = (rows(replace(RL, zero=z)) for z in (0, 2, 3))
    trainable = SIZES.mllm_params + 206_300_000 + 131_072 + 4_200_000
    assert z2["AdamW: fp32 master + 2 moments"] == pytest.approx(12 * trainable / 8)
    assert z3["AdamW: fp32 master + 2 moments"] == z2["AdamW: fp32 master + 2 moments"]
    assert z3["weights (bf16)"] == pytest.approx(z2["weights (bf16)"] / 8)  # ZeRO-3 only
    assert z3["reference MLLM (frozen copy)"] == pytest.approx(
        ddp["reference MLLM (frozen copy)"] / 8
    )
    # DDP as lenslib runs it: bf16 MLLM, AdamW moments in bf16, no fp32 master copy
    assert "AdamW: fp32 master + 2 moments" not in ddp
    assert ddp["AdamW moments (in the weight's dtype, no master copy)"] == 2 * ddp["gradients"]
    peaks = [fsm.peak_bytes(fsm.estimate(SIZES, replace(RL, zero=z))) for z in (0, 2, 3)]
    assert peaks[0] > peaks[1] > peaks[2]


def test_activations_grow_with_the_micro_batch_and_checkpointing_cuts_them():
    one, two = rows(RL), rows(replace(RL, micro_batch=2))
    assert two["language model activations"] == pytest.approx(2 * one["language model activations"])
    ckpt = rows(replace(RL, checkpointing=True))
    assert ckpt["language model activations"] < one["language model activations"] / 10
    assert ckpt["vision tower activations (image repeated per row)"] < (
        one["vision tower activations (image repeated per row)"] / 10
    )


def test_stage_1_trains_only_the_context_module_and_has_no_vision_activations():
    align = rows(replace(RL, stage="align", completion_tokens=64, reference=False))
    assert "vision tower activations (image repeated per row)" not in align
    assert "reference MLLM (frozen copy)" not in align
    assert align["AdamW: fp32 master + 2 moments"] == pytest.approx(
        12 * (206_300_000 + 131_072) / 8
    )


def test_fit_search_finds_the_largest_power_of_two_that_fits():
    best = fsm.largest_micro_batch(SIZES, RL, 80)
    assert best is not None and best < RL.rows_per_gpu
    assert fsm.fits(fsm.peak_bytes(fsm.estimate(SIZES, replace(RL, micro_batch=best))), 80)
    assert not fsm.fits(fsm.peak_bytes(fsm.estimate(SIZES, replace(RL, micro_batch=2 * best))), 80)


def test_language_model_activations_match_what_autograd_saves_in_the_toy_model():
    from lenslib.presets import get_preset

    parts, shapes = fsm.measure_toy_parts("align")
    sizes = fsm.model_sizes(get_preset("toy"))
    run = fsm.Launch(
        stage="align", num_gpus=1, zero=0, rows_per_gpu=shapes["rows"],
        micro_batch=shapes["rows"], checkpointing=False, prompt_tokens=shapes["prompt"],
        image_tokens=16, completion_tokens=shapes["completion"],
    )  # fmt: skip
    est = {r.part: r.nbytes for r in fsm.estimate(sizes, run)}
    lm = est["language model activations"] + est["rotary tables, final norm"]
    assert parts["language model"] == pytest.approx(lm, rel=0.02)


def test_log_probs_are_counted_in_pieces_of_the_token_chunk():
    from lenslib import grpo

    got = rows(replace(RL, micro_batch=4))
    piece = min(4 * RL.completion_tokens, grpo.TOKEN_CHUNK)
    assert got["fp32 log-prob pieces (chunked, recomputed)"] == piece * SIZES.vocab * 12
    assert "log-softmax, fp32 (saved for backward)" not in got


def test_tables_print_every_backend_and_gpu_size():
    text = fsm.compare_table(SIZES, RL, [80, 48], markdown=True)
    assert "| DDP | ZeRO-2 | ZeRO-3 |" in text and "on 48 GB" in text
    fit = fsm.fit_table(SIZES, RL, [80, 48])
    assert fit.count("ZeRO-3") == 2 and "largest micro-batch on 80 GB" in fit
