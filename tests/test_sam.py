"""Tests for lenslib.sam: SAM2 with a cached frozen encoder and context tokens as prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor
from sam2.utils.transforms import SAM2Transforms

from lenslib.sam import SamConfig, SamSegmenter, preprocess_images, resolve_config_name
from lenslib.sam_features import FeatureCache, SamFeatures, image_hash
from lenslib.toy.models import TOY_PROMPT_DIM, toy_sam_config

D = TOY_PROMPT_DIM  # prompt width of the toy SAM2 (256 in the real one)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")


def random_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def seg() -> SamSegmenter:
    torch.manual_seed(0)
    return SamSegmenter(toy_sam_config())


@pytest.fixture
def fresh(seg: SamSegmenter) -> SamSegmenter:
    """The shared toy model with an empty cache and no gradients left over."""
    seg.cache = FeatureCache(seg.cfg.cache_size)
    seg.zero_grad(set_to_none=True)
    seg.eval()
    return seg


@pytest.fixture
def encoder_calls(fresh: SamSegmenter, monkeypatch) -> list[int]:
    """Batch sizes of every image-encoder forward (wraps the Hiera + neck module)."""
    calls: list[int] = []
    encoder = fresh.sam.image_encoder
    original = encoder.forward

    def counting_forward(x):
        calls.append(x.shape[0])
        return original(x)

    monkeypatch.setattr(encoder, "forward", counting_forward)
    return calls


def predictor_for(seg: SamSegmenter) -> SAM2ImagePredictor:
    """sam2's own predictor on the same model; its feature sizes are hard-coded for 1024 px."""
    predictor = SAM2ImagePredictor(seg.sam)
    s = seg.cfg.image_size
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor


# ---- config and building ------------------------------------------------------------------
def test_toy_preset_sizes(seg: SamSegmenter) -> None:
    counts = seg.parameter_counts()
    assert 300_000 < counts["image_encoder"] < 400_000  # facts: ~0.36 M at width 256
    # prompt width 128 instead of 256: the decoder shrinks from 4.2 M to 1.65 M parameters
    assert counts["prompt_encoder"] == 3_276 and counts["mask_decoder"] == 1_651_621
    assert counts["total"] * 2 < 4.5e6  # float16 weights stay well under the 8 MB budget
    parts = ("image_encoder", "prompt_encoder", "mask_decoder", "other")
    assert counts["total"] == sum(counts[k] for k in parts)
    assert seg.sam.image_size == 128 and seg.prompt_dim == D
    assert not hasattr(seg.sam, "memory_attention")  # video memory removed, as the authors do


def test_full_hiera_l_builds_with_random_weights() -> None:
    counts = SamSegmenter(SamConfig()).parameter_counts()  # ~5 s on a 2-core CPU
    assert counts["image_encoder"] == 212_703_280
    assert counts["prompt_encoder"] == 6_220
    assert counts["mask_decoder"] == 4_215_109
    # 224,430,130 with SAM2's video memory modules, which are removed (7.3 M)
    assert counts["total"] == 217_122_770


def test_config_names_resolve() -> None:
    assert resolve_config_name("sam2_hiera_l.yaml") == "sam2_hiera_l.yaml"
    assert resolve_config_name("sam2.1_hiera_l") == "configs/sam2.1/sam2.1_hiera_l.yaml"
    with pytest.raises(FileNotFoundError, match="sam3_hiera"):
        resolve_config_name("sam3_hiera_l.yaml")


def test_sam21_toy_builds_after_hydra_was_cleared() -> None:
    GlobalHydra.instance().clear()  # building must not depend on `import sam2` having run last
    seg21 = SamSegmenter(toy_sam_config(config_name="sam2.1_hiera_l.yaml"))
    out = seg21([random_image(64, 64)], context_tokens=torch.randn(1, 2, D), multimask=True)
    assert out.logits.shape == (1, 3, 64, 64)


def test_bad_config_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="image_size"):
        SamConfig(image_size=100)
    with pytest.raises(ValueError, match="cache_size"):
        SamConfig(cache_size=0)


def test_missing_checkpoint_names_the_path(tmp_path) -> None:
    path = tmp_path / "nope" / "sam2_hiera_large.pt"
    with pytest.raises(FileNotFoundError, match="sam2_hiera_large.pt"):
        SamSegmenter(toy_sam_config(checkpoint=str(path)))


def test_checkpoint_is_loaded(tmp_path) -> None:
    torch.manual_seed(123)
    cfg = toy_sam_config()
    reference = build_sam2(
        cfg.config_name, device="cpu", hydra_overrides_extra=cfg.hydra_overrides()
    )
    path = tmp_path / "toy.pt"
    torch.save({"model": reference.state_dict()}, path)
    loaded = SamSegmenter(toy_sam_config(checkpoint=str(path)))
    for name in ("image_encoder.trunk.pos_embed", "sam_mask_decoder.iou_token.weight"):
        assert torch.equal(loaded.sam.state_dict()[name], reference.state_dict()[name])


# ---- preprocessing --------------------------------------------------------------------------
def test_preprocess_matches_sam2_transforms() -> None:
    image = random_image(70, 150)
    ours = preprocess_images([image], 128)
    theirs = SAM2Transforms(resolution=128, mask_threshold=0.0)(image)
    assert ours.shape == (1, 3, 128, 128)
    torch.testing.assert_close(ours[0], theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "bad",
    [np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)],
)
def test_preprocess_rejects_bad_images(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"images\[0\]"):
        preprocess_images([bad], 128)


# ---- parity with sam2's SAM2ImagePredictor ----------------------------------------------------
@pytest.mark.parametrize("shape", [(128, 128), (96, 160), (150, 70)])
@pytest.mark.parametrize("fallback", [False, True])
def test_box_prompt_matches_image_predictor(fresh, monkeypatch, shape, fallback) -> None:
    image = random_image(*shape, seed=shape[0])
    h, w = shape
    box = np.array([0.1 * w, 0.2 * h, 0.8 * w, 0.7 * h], dtype=np.float32)
    # the predictor falls back to multimask exactly when the decoder's flag is on (eval mode)
    monkeypatch.setattr(fresh.sam.sam_mask_decoder, "dynamic_multimask_via_stability", fallback)
    predictor = predictor_for(fresh)
    predictor.set_image(image)
    masks, iou, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)

    features = fresh.encode([image])
    torch.testing.assert_close(features.image_embed, predictor._features["image_embed"])
    for ours, theirs in zip(features.high_res, predictor._features["high_res_feats"]):
        torch.testing.assert_close(ours, theirs)
    with torch.no_grad():
        out = fresh.decode(
            features,
            boxes=torch.from_numpy(box)[None],
            orig_sizes=[shape],
            stability_fallback=fallback,
        )
    assert out.logits.shape == (1, 1, h, w)
    np.testing.assert_allclose(out.logits[0].numpy(), masks, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.iou_pred[0].numpy(), iou, atol=1e-5)


def test_multimask_matches_image_predictor(fresh) -> None:
    image = random_image(96, 160, seed=5)
    box = np.array([30.0, 10.0, 120.0, 90.0], dtype=np.float32)
    predictor = predictor_for(fresh)
    predictor.set_image(image)
    masks, iou, _ = predictor.predict(box=box, multimask_output=True, return_logits=True)
    with torch.no_grad():
        out = fresh([image], boxes=torch.from_numpy(box)[None], multimask=True)
    assert out.logits.shape == (1, 3, 96, 160)
    np.testing.assert_allclose(out.logits[0].numpy(), masks, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.iou_pred[0].numpy(), iou, atol=1e-5)


def test_stability_fallback_changes_unstable_masks(fresh) -> None:
    """The fallback parity test above is only meaningful if the fallback fires on this model."""
    image = random_image(96, 160, seed=96)
    boxes = torch.tensor([[16.0, 19.2, 128.0, 67.2]])
    features = fresh.encode([image])
    with torch.no_grad():
        plain = fresh.decode(features, boxes=boxes, orig_sizes=[(96, 160)])
        fallback = fresh.decode(
            features, boxes=boxes, orig_sizes=[(96, 160)], stability_fallback=True
        )
        multi = fresh.decode(features, boxes=boxes, orig_sizes=[(96, 160)], multimask=True)
    stability = fresh.sam.sam_mask_decoder._get_stability_scores(plain.low_res_logits)
    assert stability.item() < 0.98
    best = multi.iou_pred.argmax(dim=1)
    torch.testing.assert_close(fallback.logits[0], multi.logits[0, best])
    assert not torch.allclose(fallback.logits, plain.logits)


def test_train_high_res_convs_keeps_parity_and_trains_the_convs() -> None:
    torch.manual_seed(1)
    seg_raw = SamSegmenter(toy_sam_config(train_high_res_convs=True))
    image = random_image(96, 160, seed=3)
    box = np.array([10.0, 10.0, 100.0, 80.0], dtype=np.float32)
    seg_raw.sam.sam_mask_decoder.dynamic_multimask_via_stability = False
    predictor = predictor_for(seg_raw)
    predictor.set_image(image)
    masks, _, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)

    features = seg_raw.encode([image])
    assert [level.shape[1] for level in features.high_res] == [D, D]  # before conv_s0/s1
    tokens = torch.randn(1, 4, D)
    out = seg_raw.decode(features, tokens, torch.from_numpy(box)[None], [(96, 160)])
    out.logits.sum().backward()
    assert seg_raw.sam.sam_mask_decoder.conv_s0.weight.grad.abs().sum() > 0
    assert seg_raw.sam.sam_mask_decoder.conv_s1.weight.grad.abs().sum() > 0
    with torch.no_grad():
        box_only = seg_raw.decode(
            features, boxes=torch.from_numpy(box)[None], orig_sizes=[(96, 160)]
        )
    np.testing.assert_allclose(box_only.logits[0].numpy(), masks, atol=1e-4, rtol=1e-4)


# ---- feature cache --------------------------------------------------------------------------
def test_cache_hit_does_not_run_the_encoder(fresh, encoder_calls) -> None:
    a, b = random_image(64, 80, seed=1), random_image(64, 80, seed=2)
    first = fresh.encode([a])
    second = fresh.encode([a])
    assert encoder_calls == [1]
    assert fresh.cache.stats() == {"hits": 1, "disk_hits": 0, "misses": 1, "in_memory": 1}
    assert torch.equal(first.image_embed, second.image_embed)
    fresh.encode([b, a])  # only b is new
    assert encoder_calls == [1, 1]
    assert (fresh.cache.hits, fresh.cache.misses) == (2, 2)


def test_duplicate_images_in_one_call_are_encoded_once(fresh, encoder_calls) -> None:
    a, b = random_image(64, 64, seed=1), random_image(64, 64, seed=2)
    features = fresh.encode([a, a, b, a])
    assert encoder_calls == [2]
    assert len(features) == 4
    assert torch.equal(features.image_embed[0], features.image_embed[3])
    assert not torch.equal(features.image_embed[0], features.image_embed[2])
    assert (fresh.cache.hits, fresh.cache.misses) == (2, 2)


def test_cache_is_bounded_least_recently_used_first(fresh, encoder_calls) -> None:
    fresh.cache = FeatureCache(max_items=2)
    a, b, c = (random_image(32, 32, seed=s) for s in range(3))
    for image in (a, b, a, c):  # a was used after b, so b is evicted when c arrives
        fresh.encode([image])
    assert len(fresh.cache.memory) == 2 and len(encoder_calls) == 3
    fresh.encode([a])
    assert len(encoder_calls) == 3
    fresh.encode([b])
    assert len(encoder_calls) == 4


def test_disk_cache_round_trip(fresh, encoder_calls, tmp_path) -> None:
    fresh.cache = FeatureCache(max_items=4, cache_dir=tmp_path)
    image = random_image(48, 64, seed=7)
    computed = fresh.encode([image])
    path = tmp_path / fresh.fingerprint() / f"{image_hash(image)}.safetensors"
    assert path.is_file()
    fresh.cache.clear_memory()
    loaded = fresh.encode([image])
    assert encoder_calls == [1]
    assert fresh.cache.disk_hits == 1
    assert torch.equal(loaded.image_embed, computed.image_embed)
    for ours, theirs in zip(loaded.high_res, computed.high_res):
        assert torch.equal(ours, theirs)


def test_fingerprint_follows_encoder_weights_not_decoder_weights(fresh, encoder_calls) -> None:
    image = random_image(32, 32)
    fresh.encode([image])
    before = fresh.fingerprint()
    weight = fresh.sam.sam_mask_decoder.iou_token.weight
    with torch.no_grad():
        weight.add_(1.0)  # decoder training must not invalidate cached features
    fresh.reset_cache()
    assert fresh.fingerprint() == before
    with torch.no_grad():
        weight.sub_(1.0)
    trunk_weight = fresh.sam.image_encoder.trunk.pos_embed
    saved = trunk_weight.detach().clone()
    with torch.no_grad():
        trunk_weight.add_(0.5)
    fresh.reset_cache()
    assert fresh.fingerprint() != before
    with torch.no_grad():
        trunk_weight.copy_(saved)
    fresh.reset_cache()
    assert fresh.fingerprint() == before


def test_load_state_dict_resets_the_cache(fresh) -> None:
    fresh.encode([random_image(32, 32)])
    fresh.fingerprint()
    fresh.load_state_dict(fresh.state_dict())
    assert len(fresh.cache.memory) == 0 and fresh._fingerprint is None


# ---- decoding with context tokens -----------------------------------------------------------
def test_gradients_reach_tokens_and_decoder_but_not_encoder(fresh) -> None:
    fresh.train()
    assert not fresh.sam.image_encoder.training and fresh.sam.sam_mask_decoder.training
    image = random_image(64, 96)
    tokens = torch.randn(3, 5, D, requires_grad=True)
    features = fresh.encode([image])
    out = fresh.decode(features, context_tokens=tokens, orig_sizes=[(64, 96)] * 3)
    out.logits.sigmoid().mean().backward()
    assert tokens.grad is not None and (tokens.grad.abs().sum(dim=(1, 2)) > 0).all()
    decoder = fresh.sam.sam_mask_decoder
    assert decoder.output_hypernetworks_mlps[0].layers[0].weight.grad.abs().sum() > 0
    assert decoder.transformer.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert fresh.sam.sam_prompt_encoder.no_mask_embed.weight.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in fresh.sam.image_encoder.parameters())
    assert decoder.conv_s0.weight.grad is None and not decoder.conv_s0.weight.requires_grad
    assert not fresh.sam.no_mem_embed.requires_grad
    trainable = {id(p) for p in fresh.trainable_parameters()}
    assert id(decoder.iou_token.weight) in trainable
    assert id(decoder.conv_s0.weight) not in trainable


def test_frozen_decoder_still_passes_gradient_to_tokens(fresh) -> None:
    fresh.set_decoder_trainable(False)  # stage 1: all of SAM frozen
    try:
        assert fresh.trainable_parameters() == []
        tokens = torch.randn(1, 4, D, requires_grad=True)
        out = fresh([random_image(40, 40)], context_tokens=tokens)
        out.logits.mean().backward()
        assert tokens.grad.abs().sum() > 0
        assert fresh.sam.sam_mask_decoder.iou_token.weight.grad is None
    finally:
        fresh.set_decoder_trainable(True)


def test_one_image_serves_a_group_of_rollouts(fresh) -> None:
    """GRPO: features of batch 1, G prompts; same result as one image copy per prompt."""
    image = random_image(72, 100, seed=4)
    tokens = torch.randn(4, 6, D)
    shared = fresh.encode([image])
    with torch.no_grad():
        grouped = fresh.decode(shared, tokens, orig_sizes=[(72, 100)] * 4)
        copied = fresh.decode(SamFeatures.cat([shared] * 4), tokens, orig_sizes=[(72, 100)] * 4)
        single = fresh.decode(shared, tokens[2:3], orig_sizes=[(72, 100)])
    assert grouped.logits.shape == (4, 1, 72, 100)
    torch.testing.assert_close(grouped.logits, copied.logits)
    torch.testing.assert_close(grouped.logits[2:3], single.logits, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(grouped.logits[0], grouped.logits[1])  # rollouts differ


def test_box_and_tokens_together(fresh) -> None:
    image = random_image(64, 64)
    features = fresh.encode([image])
    boxes = torch.tensor([[4.0, 4.0, 40.0, 50.0]])
    with torch.no_grad():
        box_only = fresh.decode(features, boxes=boxes, orig_sizes=[(64, 64)])
        both = fresh.decode(features, torch.randn(1, 3, D), boxes, [(64, 64)])
    assert both.logits.shape == box_only.logits.shape == (1, 1, 64, 64)
    assert not torch.allclose(both.logits, box_only.logits)


def test_outputs_have_each_original_size(fresh) -> None:
    images = [random_image(50, 90, seed=1), random_image(120, 40, seed=2)]
    out = fresh(images, context_tokens=torch.randn(2, 3, D))
    assert isinstance(out.logits, list)
    assert [tuple(t.shape) for t in out.logits] == [(1, 50, 90), (1, 120, 40)]
    assert out.low_res_logits.shape == (2, 1, 32, 32) and out.iou_pred.shape == (2, 1)
    same = fresh([images[0], images[0]], context_tokens=torch.randn(2, 3, D))
    assert same.logits.shape == (2, 1, 50, 90)


def test_decode_input_errors(fresh) -> None:
    features = fresh.encode([random_image(32, 32)])
    sizes = [(32, 32)]
    with pytest.raises(ValueError, match="SAM needs a prompt"):
        fresh.decode(features, orig_sizes=sizes)
    with pytest.raises(ValueError, match=rf"\(B, K, {D}\)"):
        fresh.decode(features, torch.randn(1, 3, D // 2), orig_sizes=sizes)
    with pytest.raises(ValueError, match=r"boxes must be \(B, 4\)"):
        fresh.decode(features, boxes=torch.zeros(1, 5), orig_sizes=sizes)
    with pytest.raises(ValueError, match="points must be"):
        fresh.decode(features, points=(torch.zeros(1, 2, 3), torch.ones(1, 2)), orig_sizes=sizes)
    with pytest.raises(ValueError, match="batch size"):
        fresh.decode(features, torch.randn(2, 3, D), torch.zeros(1, 4), sizes * 2)
    with pytest.raises(ValueError, match="orig_sizes"):
        fresh.decode(features, torch.randn(2, 3, D), orig_sizes=sizes)
    with pytest.raises(ValueError, match="features hold 2 images for 3 prompts"):
        fresh.decode(SamFeatures.cat([features, features]), torch.randn(3, 1, D), None, sizes * 3)
    with pytest.raises(ValueError, match="not both"):
        fresh.decode(features, torch.randn(1, 1, D), None, sizes, True, True)
    with pytest.raises(ValueError, match="at least one image"):
        fresh.encode([])


# ---- point prompts and all mask tokens ------------------------------------------------------
@pytest.mark.parametrize("with_box", [False, True])
def test_point_prompts_match_image_predictor(fresh, with_box) -> None:
    """Clicks (and an optional box) in original pixels, as SAM2ImagePredictor takes them."""
    image = random_image(96, 160, seed=11)
    coords = np.array([[40.0, 30.0], [100.0, 70.0]], dtype=np.float32)
    labels = np.array([1, 0], dtype=np.int32)
    box = np.array([20.0, 10.0, 130.0, 90.0], dtype=np.float32) if with_box else None
    predictor = predictor_for(fresh)
    predictor.set_image(image)
    masks, iou, _ = predictor.predict(
        point_coords=coords, point_labels=labels, box=box, multimask_output=True, return_logits=True
    )
    points = (torch.from_numpy(coords)[None], torch.from_numpy(labels)[None])
    boxes = torch.from_numpy(box)[None] if with_box else None
    with torch.no_grad():
        out = fresh.decode(
            fresh.encode([image]),
            boxes=boxes,
            orig_sizes=[(96, 160)],
            multimask=True,
            points=points,
        )
    np.testing.assert_allclose(out.logits[0].numpy(), masks, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(out.iou_pred[0].numpy(), iou, atol=1e-5)


def test_predict_all_masks_holds_single_and_multimask_outputs(fresh) -> None:
    image = random_image(64, 64, seed=8)
    features = fresh.encode([image])
    boxes = torch.tensor([[8.0, 8.0, 40.0, 50.0], [20.0, 4.0, 60.0, 30.0]])
    with torch.no_grad():
        low_res, iou = fresh.predict_all_masks(features, boxes=boxes, orig_sizes=[(64, 64)] * 2)
        single = fresh.decode(features, boxes=boxes, orig_sizes=[(64, 64)] * 2)
        multi = fresh.decode(features, boxes=boxes, orig_sizes=[(64, 64)] * 2, multimask=True)
    assert low_res.shape == (2, 4, 32, 32) and iou.shape == (2, 4)
    torch.testing.assert_close(low_res[:, :1], single.low_res_logits)
    torch.testing.assert_close(low_res[:, 1:], multi.low_res_logits)
    torch.testing.assert_close(iou[:, 1:], multi.iou_pred)


def test_image_features_are_differentiable_and_match_encode(fresh) -> None:
    image = random_image(64, 64, seed=9)
    pixels = preprocess_images([image], fresh.cfg.image_size)
    fresh.sam.image_encoder.requires_grad_(True)
    try:
        features = fresh.image_features(pixels)
        features.image_embed.sum().backward()
        assert fresh.sam.image_encoder.trunk.pos_embed.grad.abs().sum() > 0
        torch.testing.assert_close(features.image_embed.detach(), fresh.encode([image]).image_embed)
    finally:
        fresh.sam.image_encoder.requires_grad_(False)
        fresh.sam.image_encoder.zero_grad(set_to_none=True)
