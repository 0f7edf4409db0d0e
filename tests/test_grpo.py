"""Unit tests of lenslib.grpo (paper eqs. 6-10)."""

from __future__ import annotations

import math

import pytest
import torch

from lenslib import grpo


def test_advantages_of_one_group_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    adv = grpo.group_advantages(rewards, group_size=4, std="population")
    mean, std = 0.5, math.sqrt((0.25 + 0.25 + 0 + 0) / 4)  # eq. 6, population
    expected = (rewards - mean) / (std + grpo.DELTA)
    assert torch.allclose(adv, expected)
    assert adv.sum().abs() < 1e-6  # advantages of a group sum to zero


def test_bessel_std_is_larger_than_population():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    pop = grpo.group_advantages(rewards, 4, std="population")
    bessel = grpo.group_advantages(rewards, 4, std="bessel")
    assert torch.all(pop.abs() > bessel.abs())


def test_identical_rewards_give_zero_advantage_not_nan():
    rewards = torch.tensor([0.7] * 8 + [0.1, 0.9] * 4)
    for scale in ("group", "batch", "none"):
        for std in ("population", "bessel"):
            adv = grpo.group_advantages(rewards, 8, scale=scale, std=std)
            assert torch.isfinite(adv).all()
            assert torch.equal(adv[:8], torch.zeros(8))


def test_groups_are_independent():
    a = torch.tensor([0.0, 1.0, 2.0, 3.0])
    b = torch.tensor([10.0, 10.5, 9.0, 11.0])
    both = grpo.group_advantages(torch.cat([a, b]), 4)
    assert torch.allclose(both[:4], grpo.group_advantages(a, 4))
    assert torch.allclose(both[4:], grpo.group_advantages(b, 4))


def test_scale_none_only_centres_and_batch_uses_one_std():
    rewards = torch.tensor([0.0, 2.0, 10.0, 30.0])
    assert torch.allclose(
        grpo.group_advantages(rewards, 2, scale="none"), torch.tensor([-1.0, 1, -10, 10])
    )
    batch = grpo.group_advantages(rewards, 2, scale="batch")
    assert torch.allclose(
        batch, torch.tensor([-1.0, 1, -10, 10]) / (rewards.std(unbiased=False) + 1e-4)
    )


@pytest.mark.parametrize("bad", [dict(group_size=1), dict(group_size=3), dict(scale="oops")])
def test_advantage_input_errors(bad):
    kwargs = dict(group_size=2) | bad
    with pytest.raises(ValueError):
        grpo.group_advantages(torch.zeros(4), **kwargs)


def test_token_logprobs_match_log_softmax_and_temperature():
    logits = torch.randn(2, 5, 11)
    ids = torch.randint(0, 11, (2, 5))
    lp = grpo.token_logprobs(logits, ids, temperature=0.5)
    manual = torch.log_softmax(logits * 2, -1).gather(-1, ids[..., None])[..., 0]
    assert torch.allclose(lp, manual, atol=1e-6)
    assert not torch.allclose(lp, grpo.token_logprobs(logits, ids, 1.0))
    with pytest.raises(ValueError):
        grpo.token_logprobs(logits, ids, 0.0)


def test_k3_is_nonnegative_zero_at_equality_and_unbiased():
    logp = torch.log(torch.tensor([0.2, 0.5, 0.3]))
    assert torch.all(grpo.k3_kl(logp, logp) == 0)
    p = torch.tensor([0.2, 0.5, 0.3])
    q = torch.tensor([0.4, 0.4, 0.2])
    # E_{x~p}[k3(x)] = KL(p || q) exactly
    expected_k3 = (p * grpo.k3_kl(p.log(), q.log())).sum()
    true_kl = (p * (p / q).log()).sum()
    assert torch.allclose(expected_k3, true_kl, atol=1e-6)
    assert torch.all(grpo.k3_kl(p.log(), q.log()) >= 0)


def test_clipping_stops_gradient_only_where_ratio_leaves_the_trust_region():
    old = torch.zeros(1, 4)
    logp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]])).requires_grad_(True)
    for sign in (1.0, -1.0):
        obj, clipped = grpo.clipped_surrogate(logp, old, torch.tensor([sign]), 0.2, 0.2)
        (grad,) = torch.autograd.grad(obj.sum(), logp)
        # A > 0: clip above 1.2 (ratio 1.5); A < 0: clip below 0.8 (ratio 0.5)
        expected_clipped = [False, False, False, True] if sign > 0 else [True, False, False, False]
        assert clipped[0].tolist() == expected_clipped
        assert (grad[0] == 0).tolist() == expected_clipped


def test_aggregations_weight_long_answers_differently():
    per_token = torch.ones(2, 4)
    per_token[1] *= 3.0
    mask = torch.tensor([[1, 0, 0, 0], [1, 1, 1, 1]])
    assert grpo.aggregate(per_token, mask, "grpo").item() == pytest.approx((1 + 3) / 2)
    assert grpo.aggregate(per_token, mask, "bnpo").item() == pytest.approx((1 + 12) / 5)
    assert grpo.aggregate(
        per_token, mask, "dr_grpo", max_completion_length=4
    ).item() == pytest.approx(13 / 8)
    assert grpo.aggregate(per_token, mask, "dapo", num_items_in_batch=10).item() == pytest.approx(
        1.3
    )
    with pytest.raises(ValueError):
        grpo.aggregate(per_token, mask, "dr_grpo")
    with pytest.raises(ValueError):
        grpo.aggregate(per_token, mask, "nope")


def test_grpo_loss_needs_reference_when_beta_positive():
    logp = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logp"):
        grpo.grpo_loss(logp, None, None, torch.zeros(2), torch.ones(2, 3), beta=0.04)


def test_positive_advantage_raises_probability_after_a_step():
    """One gradient step on the GRPO loss makes the better rollout more likely."""
    logits = torch.zeros(2, 3, 5, requires_grad=True)
    ids = torch.tensor([[1, 2, 3], [4, 4, 4]])
    adv = torch.tensor([1.0, -1.0])
    mask = torch.ones(2, 3)
    loss = grpo.grpo_loss(grpo.token_logprobs(logits, ids), None, None, adv, mask, beta=0.0).loss
    loss.backward()
    with torch.no_grad():
        new = grpo.token_logprobs(logits - 1.0 * logits.grad, ids)
    before = grpo.token_logprobs(torch.zeros(2, 3, 5), ids)
    assert torch.all(new[0] > before[0]) and torch.all(new[1] < before[1])
