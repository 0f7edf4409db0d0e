"""`share_prompt`: each prompt computed once per group of G rollouts (a KV cache repeated G
times) gives the numbers of the plain forward, which repeats the prompt G times: log-probs,
query states, masks, every part's gradient, the reference's log-probs, the sampled rollouts and
a whole GRPO step."""

from __future__ import annotations

import pytest
import torch
from helpers.toy_rl import policy_and_reference
from transformers import DynamicCache

import lenslib.context as context
import lenslib.rl as rl
from lenslib.mllm import completion_batch, shared_prompt_forward
from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.rl import GRPOConfig, frozen_reference, grpo_step, reference_logprobs
from lenslib.training import make_accelerator, set_gradient_checkpointing

G, T = 3, 7  # rollouts per prompt, completion columns
PARTS = ("mllm.model.visual", "mllm.model.language_model", "queries", "connector", "sam")


@pytest.fixture(scope="module")
def toy():
    """A random toy LENS in its stage-2 state, 3 prompts of different lengths, and P*G
    right-padded completions (random tokens: the forward does not care what they say)."""
    preset = get_preset("toy", num_queries=4)
    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    ref = frozen_reference(model)
    model.set_stage("rl")
    model.train()
    samples = toy_split(preset, "train", 3)
    gen = torch.Generator().manual_seed(1)
    tokenizer = model.processor.tokenizer
    words = (max(tokenizer.all_special_ids) + 1, len(tokenizer))  # no image placeholder, no EOS
    ids = torch.randint(*words, (len(samples) * G, T), generator=gen)
    lengths = torch.tensor([7, 3, 5, 1, 7, 6, 2, 4, 7])  # rows of one group end differently
    mask = (torch.arange(T) < lengths[:, None]).int()
    return model, ref, samples, ids, mask


def _inputs(samples):
    return [s.image for s in samples], [s.text for s in samples]


def test_the_batch_has_left_padded_prompts_of_different_lengths(toy):
    model, _, samples, ids, mask = toy
    batch = completion_batch(model.processor, *_inputs(samples), ids, mask, G)
    prompt_mask = batch["attention_mask"][:, : -ids.shape[1]]
    lengths = prompt_mask.sum(1).unique()
    assert len(lengths) >= 2  # prompts of different lengths: left padding is exercised
    assert (prompt_mask[:, 0] == 0).any() and (batch["attention_mask"][:, -1] == 0).any()


def _readout(model, samples, ids, mask, share: bool):
    """Forward + a backward that reaches every output; returns (outputs, gradients by name)."""
    model.zero_grad(set_to_none=True)
    out = model(*_inputs(samples), ids, mask, group_size=G, share_prompt=share)
    gen = torch.Generator().manual_seed(2)  # fixed random weights: no symmetric cancellation
    logp = out.logits.float().log_softmax(-1)
    loss = (logp * torch.rand(logp.shape, generator=gen)).sum() / logp.shape[0]
    loss = loss + (out.prompts * torch.rand(out.prompts.shape, generator=gen)).sum()
    loss = loss + out.mask_logits.float().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    outputs = [out.logits.detach(), out.queries.detach(), out.mask_logits.detach()]
    return outputs, grads


def _assert_close(shared, plain, tol=1e-5):
    """Each tensor within `tol` of its own largest entry (entries that are zero in exact
    arithmetic, e.g. gradients of attention key biases, are float noise: no relative test)."""
    assert shared.keys() == plain.keys()
    for name in plain:
        scale = plain[name].abs().max().clamp(min=1e-30)
        assert ((shared[name] - plain[name]).abs().max() / scale) < tol, name


def test_shared_prompt_gives_the_plain_log_probs_queries_masks_and_gradients(toy):
    model, _, samples, ids, mask = toy
    plain_out, plain_grads = _readout(model, samples, ids, mask, share=False)
    shared_out, shared_grads = _readout(model, samples, ids, mask, share=True)
    names = ("logits", "queries", "mask_logits")
    _assert_close(dict(zip(names, shared_out)), dict(zip(names, plain_out)))
    for part in PARTS:  # every part learns, and learns the same
        grads = {n: g for n, g in plain_grads.items() if n.startswith(part)}
        assert grads and max(g.abs().max() for g in grads.values()) > 0, part
        total = torch.cat([g.flatten() for g in grads.values()])
        diff = torch.cat([(shared_grads[n] - g).flatten() for n, g in grads.items()])
        assert diff.norm() < 1e-5 * total.norm(), part
    # key biases (gradient 0 in exact arithmetic) are compared against the whole part's scale
    big = {n: g for n, g in plain_grads.items() if g.abs().max() > 1e-6}
    _assert_close({n: shared_grads[n] for n in big}, big, tol=1e-4)


def test_the_authors_1d_positions_are_shared_exactly_too(toy):
    """The queries' positions are cut from the whole rows' positions, whichever rule made them."""
    _, _, samples, ids, mask = toy
    torch.manual_seed(0)
    model = build_lens(get_preset("toy", num_queries=4, mrope="authors"), pretrained=False)
    with torch.no_grad():
        plain, shared = (model(*_inputs(samples), ids, mask, group_size=G, share_prompt=share)
                         for share in (False, True))  # fmt: skip
        assert torch.allclose(shared.logits, plain.logits, atol=1e-5)
        assert torch.allclose(shared.queries, plain.queries, atol=1e-5)


def test_a_wrong_expansion_of_the_cache_is_caught(toy, monkeypatch):
    """Repeating the cache as (a b a b) instead of (a a b b) pairs completions with the wrong
    prompts: the comparison above must then fail."""
    model, _, samples, ids, mask = toy
    plain, _ = _readout(model, samples, ids, mask, share=False)

    def tiled(cache, repeats):
        for layer in cache.layers:
            layer.keys = layer.keys.repeat(repeats, 1, 1, 1)
            layer.values = layer.values.repeat(repeats, 1, 1, 1)

    monkeypatch.setattr(DynamicCache, "batch_repeat_interleave", tiled)
    wrong, _ = _readout(model, samples, ids, mask, share=True)
    assert not torch.allclose(wrong[0], plain[0], atol=1e-3)  # completion logits
    assert not torch.allclose(wrong[1], plain[1], atol=1e-3)  # query states


def test_rows_that_do_not_share_their_prompt_are_refused(toy):
    model, _, samples, ids, mask = toy
    images, texts = _inputs(samples)
    batch = completion_batch(model.processor, images[:1], texts[:1], ids[:G], mask[:G], G)
    L = batch["input_ids"].shape[1]
    shared_prompt_forward(model.mllm.model, batch, G, L - T)  # one group: fine
    mixed = completion_batch(model.processor, images, texts, ids[:G], mask[:G], 1)
    with pytest.raises(ValueError, match="do not share"):  # three prompts, "one group"
        shared_prompt_forward(model.mllm.model, mixed, G, mixed["input_ids"].shape[1] - T)


def test_reference_log_probs_are_the_same_shared_or_not(toy):
    model, ref, samples, ids, mask = toy
    plain_cfg = GRPOConfig(group_size=G, output_dir="unused")
    plain = reference_logprobs(ref, model, samples, ids, mask, plain_cfg)
    for micro in (None, G, 2):  # whole batch; one group per micro-batch; micro-batches cut groups
        cfg = GRPOConfig(group_size=G, output_dir="unused", share_prompt=True,
                         rollout_micro_batch=micro)  # fmt: skip
        shared = reference_logprobs(ref, model, samples, ids, mask, cfg)
        assert torch.allclose(shared, plain, atol=1e-5, rtol=0), micro
    assert plain.std() > 0.1  # log-probs that vary: not trivially equal


def test_gradient_checkpointing_and_share_prompt_are_refused_together(toy):
    with pytest.raises(ValueError, match="share_prompt.*gradient_checkpointing"):
        GRPOConfig(output_dir="unused", share_prompt=True, gradient_checkpointing=True)
    with pytest.raises(ValueError, match="gradient_checkpointing"):  # through the presets too
        get_preset("full", share_prompt=True)
    model, _, samples, ids, mask = toy
    set_gradient_checkpointing(model, True)
    try:  # checkpointed layers drop the cache: refused, not silently wrong
        with pytest.raises(ValueError, match="gradient_checkpointing"):
            model(*_inputs(samples), ids, mask, group_size=G, share_prompt=True)
        with torch.no_grad():  # no backward, no checkpointing: the cache is kept
            model(*_inputs(samples), ids, mask, group_size=G, share_prompt=True)
    finally:
        set_gradient_checkpointing(model, False)


def test_a_shared_prefill_samples_the_same_rollouts(monkeypatch):
    """Generation with each prompt's prefill once per group: the same tokens for the same seed
    (committed toy bases: real, varied answers, so equal rollouts are not trivially equal)."""
    preset = get_preset("toy", num_queries=4)
    model = build_lens(preset)
    images, texts = _inputs(toy_split(preset, "train", 3))

    def rollouts(share: bool) -> torch.Tensor:
        torch.manual_seed(3)
        return model.generate(images, texts, group_size=G, max_new_tokens=48, do_sample=True,
                              share_prompt=share).completion_ids  # fmt: skip

    plain = rollouts(False)
    assert torch.equal(rollouts(True), plain)
    assert len({tuple(row.tolist()) for row in plain}) > len(texts)  # samples differ in a group
    assert torch.equal(rollouts(False), plain)  # the shared prefill left no state behind

    def tiled(cache, repeats):  # (a b a b) instead of (a a b b): wrong prompts, other tokens
        for layer in cache.layers:
            layer.keys = layer.keys.repeat(repeats, 1, 1, 1)
            layer.values = layer.values.repeat(repeats, 1, 1, 1)

    monkeypatch.setattr(DynamicCache, "batch_repeat_interleave", tiled)
    assert not torch.equal(rollouts(True), plain)


def _trained_params(share: bool):
    """The parameters after one `grpo_step` (AdamW) from the committed toy bases."""
    preset = get_preset("toy", num_queries=4)
    model, ref = policy_and_reference(preset)
    # R_seg thresholds mask logits at 0, where float noise may flip a pixel: left out of the
    # reward here (the masks are still drawn, and L_seg's gradient is in the step)
    cfg = GRPOConfig(group_size=G, max_new_tokens=48, beta=0.04, output_dir="unused",
                     reward_weights=(1.0, 1.0, 0.0), share_prompt=share)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    # eps 1e-6: AdamW's first step moves each weight by ~lr * g / (|g| + eps), which turns
    # float noise in gradients that are 0 in exact arithmetic (1e-10) into a visible step
    optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    before = [p.detach().clone() for p in params]
    torch.manual_seed(7)  # the same rollouts
    record = grpo_step(model, ref, toy_split(preset, "train", 3), make_accelerator(True),
                       optimizer, scheduler, cfg)  # fmt: skip
    return before, [p.detach().clone() for p in params], record


def test_a_grpo_step_with_a_shared_prompt_makes_the_same_update(monkeypatch):
    calls = []
    for module in (context, rl):  # count the shared forwards: policy and reference
        real = module.shared_prompt_forward
        monkeypatch.setattr(module, "shared_prompt_forward",
                            lambda *a, _real=real, _m=module.__name__, **k:
                            calls.append(_m) or _real(*a, **k))  # fmt: skip
    before, plain, rec_plain = _trained_params(False)
    assert calls == []
    _, shared, rec_shared = _trained_params(True)
    assert sorted(calls) == ["lenslib.context", "lenslib.rl"]
    assert rec_plain["advantage_spread"] > 0 and rec_plain["kl"] > 0
    for key in ("loss", "kl", "seg_loss", "reward", "completion_length"):
        assert rec_shared[key] == pytest.approx(rec_plain[key], rel=1e-5, abs=1e-7), key
    # AdamW's first step is ~lr * sign(g) for |g| >> eps, and turns the float rounding of a
    # small |g| into a few % of lr: the updates are compared as a whole, and weight by weight
    # against lr
    lr = 1e-4
    step = torch.cat([(a - b).flatten() for a, b in zip(plain, before)])
    diff = torch.cat([(a - b).flatten() for a, b in zip(shared, plain)])
    assert step.abs().max() > 0.5 * lr  # the step did something
    assert diff.norm() < 1e-3 * step.norm(), (diff.norm(), step.norm())
    assert diff.abs().max() < 0.1 * lr, diff.abs().max()
