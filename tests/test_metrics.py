"""lenslib.metrics against the LISA evaluation protocol.

`_lisa_reference` re-states LISA's `intersectionAndUnionGPU` (histogram over 2 classes with
ignore_index=255) and its gIoU / cIoU bookkeeping, so the test compares our streaming
accumulator with the protocol's own arithmetic on random masks.
"""

from __future__ import annotations

import pytest
import torch

from lenslib.metrics import IoUAccumulator, intersection_union, per_sample_iou


def _lisa_intersection_union(output, target, k=2, ignore_index=255):
    output = output.clone().view(-1)
    target = target.clone().view(-1)
    output[target == ignore_index] = ignore_index
    intersection = output[output == target]
    area_intersection = torch.histc(intersection.float(), bins=k, min=0, max=k - 1)
    area_output = torch.histc(output.float(), bins=k, min=0, max=k - 1)
    area_target = torch.histc(target.float(), bins=k, min=0, max=k - 1)
    area_union = area_output + area_target - area_intersection
    return area_intersection, area_union


def _lisa_reference(preds, targets):
    inter_sum, union_sum, acc_ious = torch.zeros(2), torch.zeros(2), []
    for pred, target in zip(preds, targets):
        i, u = _lisa_intersection_union(pred.long(), target.long())
        inter_sum += i
        union_sum += u
        acc_iou = i / (u + 1e-5)
        acc_iou[u == 0] += 1.0  # no-object target
        acc_ious.append(acc_iou)
    giou = torch.stack(acc_ious).mean(0)[1].item()
    ciou = (inter_sum / (union_sum + 1e-10))[1].item()
    return giou, ciou


def _random_masks(n, seed):
    gen = torch.Generator().manual_seed(seed)
    preds, targets = [], []
    for k in range(n):
        h, w = torch.randint(4, 20, (2,), generator=gen).tolist()
        target = (torch.rand(h, w, generator=gen) > 0.6).to(torch.uint8)
        target[torch.rand(h, w, generator=gen) > 0.9] = 255
        pred = torch.rand(h, w, generator=gen) > 0.5
        if k == 0:  # an empty prediction on an empty target
            target.zero_()
            pred.zero_()
        preds.append(pred)
        targets.append(target)
    return preds, targets


def test_matches_the_lisa_protocol():
    preds, targets = _random_masks(30, seed=0)
    acc = IoUAccumulator()
    for p, t in zip(preds, targets):
        acc.update(p, t)
    giou, ciou = _lisa_reference(preds, targets)
    out = acc.compute()
    assert out["count"] == 30
    assert out["giou"] == pytest.approx(giou, abs=1e-6)
    assert out["ciou"] == pytest.approx(ciou, abs=1e-6)


def test_empty_union_scores_one_and_ignore_pixels_do_not_count():
    target = torch.tensor([[0, 255], [0, 0]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1], [0, 0]], dtype=torch.bool)  # predicted only on an ignored pixel
    inter, union = intersection_union(pred, target)
    assert inter.item() == 0 and union.item() == 0
    assert per_sample_iou(inter, union).item() == 1.0


def test_giou_and_ciou_differ_by_weighting():
    big_t = torch.ones(10, 10, dtype=torch.uint8)
    big_p = torch.ones(10, 10, dtype=torch.bool)  # IoU 1 on 100 px
    small_t = torch.zeros(10, 10, dtype=torch.uint8)
    small_t[0, 0] = 1
    small_p = torch.zeros(10, 10, dtype=torch.bool)  # IoU 0 on 1 px
    acc = IoUAccumulator()
    acc.update(torch.stack([big_p, small_p]), torch.stack([big_t, small_t]))
    out = acc.compute()
    assert out["giou"] == pytest.approx(0.5, abs=1e-5)
    assert out["ciou"] == pytest.approx(100 / 101, abs=1e-6)


def test_sharded_sums_reduce_to_the_single_process_result():
    preds, targets = _random_masks(12, seed=1)
    whole = IoUAccumulator()
    shards = [IoUAccumulator(), IoUAccumulator(), IoUAccumulator()]
    for k, (p, t) in enumerate(zip(preds, targets)):
        whole.update(p, t)
        shards[k % 3].update(p, t)
    total = sum(s.sums for s in shards)
    for s in shards:
        s.all_reduce(lambda local, total=total: total.clone())  # what all-reduce(sum) returns
    assert shards[0].compute() == pytest.approx(whole.compute())


def test_errors_are_clear():
    with pytest.raises(ValueError, match="before any update"):
        IoUAccumulator().compute()
    with pytest.raises(ValueError, match="shape"):
        intersection_union(torch.zeros(2, 2), torch.zeros(3, 2))
