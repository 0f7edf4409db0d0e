"""The unified reward of LENS, paper eq. 11: R = l1 * R_format + l2 * R_box + l3 * R_seg.

- `lenslib.answers.parse_answer` reads a completion (tolerant; `box=None` when there is none).
- `format_reward` is 1 when the completion has the paper's `<think>...</think><answer>...</answer>`
  structure, else 0 (the answer's content is judged by R_box, not here).
- `box_reward` is the IoU of the parsed box with the ground-truth box (torchvision.ops.box_iou).
- `seg_reward` is the IoU of the predicted mask with the ground-truth mask (255 = ignore).
- The authors square both IoUs (`square=True`); the paper's text uses plain IoU (the default).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import box_iou

from lenslib.answers import Box
from lenslib.metrics import intersection_union
from lenslib.prompts import FORMAT_PATTERN

_FORMAT_RE = re.compile(FORMAT_PATTERN, re.DOTALL)


def format_reward(text: str) -> float:
    """R_format of eq. 11: 1.0 if `<think>.*?</think>\\s*<answer>.*?</answer>` is found, else 0.0."""
    return 1.0 if isinstance(text, str) and _FORMAT_RE.search(text) else 0.0


def box_iou_single(pred: Box | None, target: Box) -> float:
    """IoU of two (x1, y1, x2, y2) boxes through torchvision.ops.box_iou; 0 for a missing box.

    A degenerate pair (zero union) scores 0, never NaN.
    """
    if pred is None:
        return 0.0
    a = torch.tensor([pred], dtype=torch.float64)
    b = torch.tensor([list(target)], dtype=torch.float64)
    iou = box_iou(a, b)[0, 0].item()
    return 0.0 if math.isnan(iou) else float(iou)


def box_reward(pred: Box | None, target: Box, square: bool = False) -> float:
    """R_box of eq. 11: IoU(pred, target) in [0, 1]; the authors square it (`square=True`)."""
    iou = box_iou_single(pred, target)
    return iou * iou if square else iou


def mask_iou(pred: Tensor, target: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of binary masks I / (U + eps), ignoring target pixels labelled 255.

    pred: (..., H, W) bool or {0,1}; target: the same shape, values {0, 1, 255}.
    Returns (...) IoU per mask. I and U are `lenslib.metrics.intersection_union`'s.
    """
    inter, union = intersection_union(pred, target)
    return inter / (union + eps)


def seg_reward(pred: Tensor, target: Tensor, square: bool = False) -> Tensor:
    """R_seg of eq. 11: mask IoU in [0, 1] per rollout; the authors square it (`square=True`)."""
    iou = mask_iou(pred, target)
    return iou * iou if square else iou


@dataclass(frozen=True)
class RewardWeights:
    """lambda_1..3 of eq. 11 (all 1.0 in Table A2)."""

    format: float = 1.0
    box: float = 1.0
    seg: float = 1.0


def unified_reward(
    r_format: Tensor, r_box: Tensor, r_seg: Tensor, weights: RewardWeights = RewardWeights()
) -> Tensor:
    """Eq. 11: R_unified = l1 * R_format + l2 * R_box + l3 * R_seg, per rollout (B,)."""
    return weights.format * r_format + weights.box * r_box + weights.seg * r_seg
