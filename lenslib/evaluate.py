"""Evaluation: gIoU / cIoU (LISA protocol), mean box IoU and format rate of greedy answers.

Each process evaluates its own shard (sample i goes to process i % N); the metric sums are
all-reduced before dividing, so the numbers are the same with 1 or N processes.

`evaluate` scores greedy answers, `evaluate_answers` given ones (teacher forcing);
`write_reports` saves the numbers as ``metrics.json`` and a ``metrics.md`` table in the style
of the paper's tables (percentages, one decimal). Named splits (``refcoco:testA``) are in
`lenslib.splits`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from accelerate import Accelerator

from lenslib.data.sample import SegSample
from lenslib.metrics import IoUAccumulator
from lenslib.model import LensModel, Rollouts
from lenslib.rewards import box_iou_single, format_reward
from lenslib.sharding import deepspeed_engine, zero3_gathered

# (column title, metric key) of the Markdown table; all but "samples" are percentages
TABLE_COLUMNS = (
    ("gIoU", "giou"),
    ("cIoU", "ciou"),
    ("box IoU", "box_iou"),
    ("format rate", "format_rate"),
    ("samples", "count"),
)


@torch.no_grad()
def evaluate(
    model: LensModel,
    samples: Sequence[SegSample],
    batch_size: int = 16,
    max_new_tokens: int = 768,
    accelerator: Accelerator | None = None,
    on_batch: Callable[[Sequence[SegSample], Rollouts], None] | None = None,
) -> dict[str, float]:
    """{'giou', 'ciou', 'box_iou', 'format_rate', 'count'} over `samples`, greedy decoding.

    `on_batch(samples, rollouts)` sees each batch's greedy answers (e.g. to read their
    rationales); it runs on every process for that process's shard."""
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    shard = [samples[i] for i in range(rank, len(samples), world)]
    was_training = model.training
    model.eval()
    masks = IoUAccumulator()
    box_sum, format_sum = 0.0, 0.0
    with zero3_gathered(model.parameters(), deepspeed_engine(accelerator, model)):  # ZeRO-3 only
        for start in range(0, len(shard), batch_size):
            batch = shard[start : start + batch_size]
            rollouts, pred = model.predict(
                [s.image for s in batch], [s.text for s in batch], max_new_tokens=max_new_tokens
            )
            for sample, mask, box, text in zip(batch, pred, rollouts.boxes, rollouts.texts):
                masks.update(mask.cpu(), torch.from_numpy(sample.mask))
                box_sum += box_iou_single(box, sample.box)
                format_sum += format_reward(text)
            if on_batch is not None:
                on_batch(batch, rollouts)
    model.train(was_training)
    extra = torch.tensor([box_sum, format_sum], dtype=torch.float64)
    if accelerator is not None and world > 1:
        masks.all_reduce(lambda t: accelerator.reduce(t.to(accelerator.device), "sum"))
        extra = accelerator.reduce(extra.to(accelerator.device), "sum").cpu()
    result = masks.compute()
    n = result["count"]
    return result | {"box_iou": extra[0].item() / n, "format_rate": extra[1].item() / n}


@torch.no_grad()
def evaluate_answers(
    model: LensModel,
    samples: Sequence[SegSample],
    answers: Sequence[str],
    batch_size: int = 16,
    accelerator: Accelerator | None = None,
) -> dict[str, float]:
    """{'giou', 'ciou', 'count'} of the masks LENS makes from GIVEN answers (teacher forced).

    With the ground-truth answers (`lenslib.align.teacher_forced_metrics`) this measures what
    stage 1 trains, the alignment of MLLM and SAM, apart from how good the MLLM's own answers
    are; `evaluate` measures the two together.
    """
    if len(answers) != len(samples):
        raise ValueError(f"{len(answers)} answers for {len(samples)} samples")
    rank = accelerator.process_index if accelerator else 0
    world = accelerator.num_processes if accelerator else 1
    shard = list(range(rank, len(samples), world))
    was_training = model.training
    model.eval()
    masks = IoUAccumulator()
    with zero3_gathered(model.parameters(), deepspeed_engine(accelerator, model)):  # ZeRO-3 only
        for start in range(0, len(shard), batch_size):
            batch = [samples[i] for i in shard[start : start + batch_size]]
            given = [answers[i] for i in shard[start : start + batch_size]]
            out = model.forward_answers([s.image for s in batch], [s.text for s in batch], given)
            for sample, logits in zip(batch, out.mask_logits):
                masks.update((logits > 0).cpu(), torch.from_numpy(sample.mask))
    model.train(was_training)
    if accelerator is not None and world > 1:
        masks.all_reduce(lambda t: accelerator.reduce(t.to(accelerator.device), "sum"))
    return masks.compute()


# -------------------------------------------------------------------------------------- reports


def markdown_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown table, one row per split: gIoU, cIoU, box IoU and format rate in percent
    with one decimal (as in the paper's tables), then the number of samples."""
    header = "| split | " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(TABLE_COLUMNS)
    rows = [header, rule]
    for split, metrics in results.items():
        missing = [key for _, key in TABLE_COLUMNS if key not in metrics]
        if missing:
            raise ValueError(f"split {split!r}: metrics miss {missing}, got {sorted(metrics)}")
        cells = [f"{100 * metrics[key]:.1f}" for _, key in TABLE_COLUMNS[:-1]]
        cells.append(str(int(metrics["count"])))
        name = split.replace("|", r"\|")  # a "|" in a path would end the cell
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_reports(
    results: dict[str, dict[str, float]], folder: str | Path, meta: dict | None = None
) -> tuple[Path, Path]:
    """Write ``metrics.json`` ({"meta", "splits"}) and ``metrics.md`` (title, meta as a bullet
    list, `markdown_table`) into `folder`, created if needed; returns (json path, md path).

    Meta values JSON cannot hold (e.g. a Path) are written as their str().
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = meta or {}
    table = markdown_table(results)  # checks the metrics before anything is written
    json_path, md_path = folder / "metrics.json", folder / "metrics.md"
    report = {"meta": meta, "splits": results}
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
    bullets = [f"- {key}: {value}" for key, value in meta.items()]
    lines = ["# LENS evaluation", "", *bullets, *([""] if bullets else []), table, ""]
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return json_path, md_path
