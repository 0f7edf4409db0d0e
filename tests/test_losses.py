"""Unit tests of lenslib.losses (L_seg of eqs. 5 and 12)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lenslib import losses


def _pair(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(3, 8, 8, generator=gen)
    target = (torch.rand(3, 8, 8, generator=gen) > 0.5).to(torch.uint8)
    return logits, target


def test_dice_by_hand_and_perfect_prediction():
    logits = torch.tensor([[[0.0, 0.0]]])  # p = 0.5, 0.5
    target = torch.tensor([[[1, 0]]], dtype=torch.uint8)
    assert losses.dice_loss(logits, target).item() == pytest.approx(1 - (2 * 0.5 + 1) / (1 + 1 + 1))
    perfect = torch.where(target == 1, 50.0, -50.0).float()
    assert losses.dice_loss(perfect, target).item() == pytest.approx(0.0, abs=1e-6)


def test_bce_equals_torch_when_nothing_is_ignored():
    logits, target = _pair()
    expected = F.binary_cross_entropy_with_logits(logits, target.float())
    assert losses.bce_loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)


def test_focal_with_gamma0_and_no_alpha_is_bce():
    """The authors' 'focal' loss is plain BCE: exactly focal with gamma = 0 and no alpha."""
    logits, target = _pair(1)
    focal = losses.focal_loss(logits, target, alpha=-1, gamma=0.0)
    assert focal.item() == pytest.approx(losses.bce_loss(logits, target).item(), rel=1e-6)
    assert losses.focal_loss(logits, target).item() < losses.bce_loss(logits, target).item()


def test_ignored_pixels_change_nothing():
    logits, target = _pair(2)
    flipped = logits.clone()
    target = target.clone()
    target[:, 0, :] = 255
    flipped[:, 0, :] = -flipped[:, 0, :] * 10
    for fn in (losses.dice_loss, losses.bce_loss, losses.focal_loss):
        assert fn(logits, target).item() == pytest.approx(fn(flipped, target).item(), rel=1e-6)


def test_seg_loss_combines_and_has_gradients():
    logits, target = _pair(3)
    logits.requires_grad_(True)
    total = losses.seg_loss(logits, target, kind="bce")
    assert total.item() == pytest.approx(
        (losses.dice_loss(logits, target) + losses.bce_loss(logits, target)).item()
    )
    total.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kind"):
        losses.seg_loss(logits, target, kind="l2")
