"""Segmentation losses on mask logits: L_seg of eqs. 5 and 12.

The authors train with dice + "focal" at weight 1:1, but their "focal" loss is in fact plain
pixel-mean binary cross-entropy (a focal loss with gamma = 0 and no alpha weighting is exactly
BCE). The paper says "e.g., dice loss, focal loss". lenslib offers both: `kind="bce"` (the
authors' code) and `kind="focal"` (a real sigmoid focal loss, torchvision's).

All functions take logits (B, H, W) and targets (B, H, W) with values {0, 1, 255}; pixels
labelled 255 are ignored. Each returns the mean over the batch.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.ops import sigmoid_focal_loss

from lenslib.data.sample import IGNORE_LABEL

LossKind = Literal["bce", "focal"]  # the pixel loss beside dice


def _valid_and_target(target: Tensor) -> tuple[Tensor, Tensor]:
    """(valid pixel mask as float, target as float in {0, 1}); both (B, H, W)."""
    valid = (target != IGNORE_LABEL).float()
    return valid, (target == 1).float()


def dice_loss(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """1 - (2 sum(p t) + s) / (sum(p) + sum(t) + s) per mask, p = sigmoid(logits), mean over B."""
    valid, t = _valid_and_target(target)
    p = torch.sigmoid(logits.float()) * valid
    t = t * valid
    inter = (p * t).flatten(1).sum(1)
    denom = p.flatten(1).sum(1) + t.flatten(1).sum(1)
    return (1 - (2 * inter + smooth) / (denom + smooth)).mean()


def bce_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Pixel-mean binary cross-entropy per mask (ignored pixels excluded), mean over B."""
    valid, t = _valid_and_target(target)
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), t, reduction="none")
    return ((per_pixel * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)).mean()


def focal_loss(logits: Tensor, target: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Sigmoid focal loss (Lin et al. 2017) via torchvision, pixel-mean per mask, mean over B.

    alpha < 0 disables the class weighting; with gamma = 0 and alpha < 0 it equals `bce_loss`.
    """
    valid, t = _valid_and_target(target)
    per_pixel = sigmoid_focal_loss(logits.float(), t, alpha=alpha, gamma=gamma, reduction="none")
    return ((per_pixel * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp(min=1)).mean()


def seg_loss(
    logits: Tensor,
    target: Tensor,
    kind: LossKind = "bce",
    dice_weight: float = 1.0,
    pixel_weight: float = 1.0,
    alpha: float = 0.25,
    gamma: float = 2.0,
) -> Tensor:
    """L_seg = dice_weight * dice + pixel_weight * (BCE or focal); eqs. 5 and 12."""
    if kind == "bce":
        pixel = bce_loss(logits, target)
    elif kind == "focal":
        pixel = focal_loss(logits, target, alpha=alpha, gamma=gamma)
    else:
        raise ValueError(f"seg loss kind must be 'bce' or 'focal', got {kind!r}")
    return dice_weight * dice_loss(logits, target) + pixel_weight * pixel
