"""Evaluation: gIoU / cIoU (LISA protocol), mean box IoU and format rate of greedy answers.

Each process evaluates its own shard (sample i goes to process i % N); the metric sums are
all-reduced before dividing, so the numbers are the same with 1 or N processes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from accelerate import Accelerator

from lenslib.data.sample import SegSample
from lenslib.metrics import IoUAccumulator
from lenslib.model import LensModel
from lenslib.rewards import box_iou_single, format_reward


@torch.no_grad()
def evaluate(
    model: LensModel,
    samples: Sequence[SegSample],
    batch_size: int = 16,
    max_new_tokens: int = 768,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """{'giou', 'ciou', 'box_iou', 'format_rate', 'count'} over `samples`, greedy decoding."""
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    shard = [samples[i] for i in range(rank, len(samples), world)]
    was_training = model.training
    model.eval()
    masks = IoUAccumulator()
    box_sum, format_sum = 0.0, 0.0
    for start in range(0, len(shard), batch_size):
        batch = shard[start : start + batch_size]
        rollouts, pred = model.predict(
            [s.image for s in batch], [s.text for s in batch], max_new_tokens=max_new_tokens
        )
        for sample, mask, box, text in zip(batch, pred, rollouts.boxes, rollouts.texts):
            masks.update(mask.cpu(), torch.from_numpy(sample.mask))
            box_sum += box_iou_single(box, sample.box)
            format_sum += format_reward(text)
    model.train(was_training)
    extra = torch.tensor([box_sum, format_sum], dtype=torch.float64)
    if accelerator is not None and world > 1:
        masks.all_reduce(lambda t: accelerator.reduce(t.to(accelerator.device), "sum"))
        extra = accelerator.reduce(extra.to(accelerator.device), "sum").cpu()
    result = masks.compute()
    n = result["count"]
    return result | {"box_iou": extra[0].item() / n, "format_rate": extra[1].item() / n}
