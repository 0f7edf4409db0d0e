"""gIoU and cIoU exactly as the LISA evaluation protocol, which LENS reports.

For each sample (one mask per sentence) take the foreground intersection I_i and union U_i,
ignoring pixels labelled 255 in the target. Then

    gIoU = mean_i  I_i / (U_i + 1e-5), where a sample with U_i = 0 scores 1.0
           (an empty prediction on an empty target is perfect);
    cIoU = sum_i I_i / (sum_i U_i + 1e-10), over the whole split.

gIoU weighs every sample equally; cIoU weighs samples by their size, so large objects dominate.
`IoUAccumulator` keeps the four running sums (sum I, sum U, sum per-sample IoU, count) so that
several processes can each evaluate a shard and then all-reduce the sums before dividing.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lenslib.data.sample import IGNORE_LABEL

SAMPLE_EPS = 1e-5  # LISA: acc_iou = intersection / (union + 1e-5)
DATASET_EPS = 1e-10  # LISA: ciou = intersection_sum / (union_sum + 1e-10)


def intersection_union(pred: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Foreground intersection and union per sample, ignoring target pixels == 255.

    pred: (B, H, W) or (H, W), bool or {0,1} (threshold logits at 0 before calling).
    target: same shape, values {0, 1, 255}. Returns (I, U) as float64 tensors of shape (B,) or ().
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    valid = target != IGNORE_LABEL
    p = pred.bool() & valid
    t = (target == 1) & valid
    inter = (p & t).flatten(-2).sum(-1).double()
    union = (p | t).flatten(-2).sum(-1).double()
    return inter, union


def per_sample_iou(inter: Tensor, union: Tensor) -> Tensor:
    """I / (U + 1e-5), with 1.0 where U == 0 (LISA's `acc_iou[union == 0] = 1.0`)."""
    iou = inter / (union + SAMPLE_EPS)
    return torch.where(union == 0, torch.ones_like(iou), iou)


class IoUAccumulator:
    """Streaming gIoU / cIoU over a split; sums can be all-reduced across processes."""

    def __init__(self) -> None:
        # [sum I, sum U, sum per-sample IoU, number of samples], float64 for exact large sums
        self.sums = torch.zeros(4, dtype=torch.float64)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add a batch (B, H, W) or a single (H, W) prediction / target pair."""
        if pred.dim() == 2:
            pred, target = pred.unsqueeze(0), target.unsqueeze(0)
        inter, union = intersection_union(pred.cpu(), target.cpu())
        self.sums += torch.stack(
            [inter.sum(), union.sum(), per_sample_iou(inter, union).sum(), torch.tensor(len(inter))]
        ).double()

    def all_reduce(self, reduce_sum: Callable[[Tensor], Tensor]) -> None:
        """Replace the local sums by their sum over processes.

        `reduce_sum` is e.g. `accelerator.reduce` (with reduction="sum") or a function around
        `torch.distributed.all_reduce`. Call it once, after the last `update`.
        """
        self.sums = reduce_sum(self.sums.clone()).double().cpu()

    def compute(self) -> dict[str, float]:
        """{'giou', 'ciou', 'count'}; raises if nothing was added (no silent 0 or NaN)."""
        inter, union, iou_sum, count = self.sums.tolist()
        if count == 0:
            raise ValueError("IoUAccumulator.compute() called before any update()")
        return {"giou": iou_sum / count, "ciou": inter / (union + DATASET_EPS), "count": int(count)}
