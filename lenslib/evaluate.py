"""Evaluation: gIoU / cIoU (LISA protocol), mean box IoU and format rate of greedy answers.

Each process evaluates its own shard (sample i goes to process i % N); the metric sums are
all-reduced before dividing, so the numbers are the same with 1 or N processes.

Benchmarks are named by *split specs*, ``<dataset>:<split>[@N]``::

    toy:val  toy:testA@200  refcoco:testB  refcoco+:val  refcocog:test  reasonseg:val@50
    groundingsuite:data/GroundingSuite/GroundingSuite-Eval.jsonl

``@N`` keeps the first N samples. `evaluate_splits` runs `evaluate` on each and
`write_reports` saves the numbers as ``metrics.json`` and a ``metrics.md`` table in the
style of the paper's tables (percentages, one decimal).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import Subset
from tqdm.auto import tqdm

from lenslib.data.groundingsuite import GroundingSuiteDataset
from lenslib.data.reasonseg import ReasonSegDataset
from lenslib.data.refer import ReferDataset
from lenslib.data.sample import SegSample
from lenslib.metrics import IoUAccumulator
from lenslib.model import LensModel, zero3_gathered
from lenslib.presets import Preset, toy_split
from lenslib.rewards import box_iou_single, format_reward

# data set -> the splits a spec may name (the evaluation splits of facts section 7)
EVAL_SPLITS: dict[str, tuple[str, ...]] = {
    "toy": ("val", "testA", "testB"),
    "refcoco": ("val", "testA", "testB"),
    "refcoco+": ("val", "testA", "testB"),
    "refcocog": ("val", "test"),
    "reasonseg": ("val", "test"),
}
ACCEPTED_SPECS = (
    "toy:val|testA|testB, refcoco:val|testA|testB, refcoco+:val|testA|testB, "
    "refcocog:val|test, reasonseg:val|test, groundingsuite:<path to jsonl>; "
    "any of them may end in @N (the first N samples, N >= 1)"
)
# (column title, metric key) of the Markdown table; all but "samples" are percentages
TABLE_COLUMNS = (
    ("gIoU", "giou"),
    ("cIoU", "ciou"),
    ("box IoU", "box_iou"),
    ("format rate", "format_rate"),
    ("samples", "count"),
)


def deepspeed_engine(accelerator: Accelerator | None, model: torch.nn.Module):
    """The DeepSpeed engine `accelerator.prepare` wrapped around `model` (None without
    DeepSpeed or before `prepare`): the stages prepare the model inside, so their callers
    hold the LensModel, not its engine."""
    prepared = getattr(accelerator, "_models", [])
    engines = [m for m in prepared if getattr(m, "module", None) is model]
    return engines[-1] if engines and hasattr(engines[-1], "optimizer") else None


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


# ---------------------------------------------------------------------------------- split specs


@dataclass(frozen=True)
class SplitSpec:
    """A parsed split spec: ``refcoco:testA@100`` -> ("refcoco", "testA", 100).

    For groundingsuite, `split` is the path of the jsonl file. `limit` None = every sample.
    """

    dataset: str
    split: str
    limit: int | None = None


def _bad_spec(spec: str, problem: str) -> ValueError:
    return ValueError(f"bad split spec {spec!r}: {problem}; accepted: {ACCEPTED_SPECS}")


def parse_spec(spec: str, preset: Preset) -> SplitSpec:
    """Check a spec's syntax, and that `preset.data_root` is set where the data set needs it.

    Reads no file, so `evaluate_splits` can reject every bad spec before evaluating any.
    The text after the LAST ``@`` must be N, so a groundingsuite path holding an ``@`` needs
    an ``@N`` suffix.
    """
    body, at, count = spec.strip().rpartition("@")
    if not at:
        body, limit = spec.strip(), None
    elif count.isdigit() and int(count) >= 1:
        limit = int(count)
    else:
        raise _bad_spec(spec, f"@{count} is not a positive whole number of samples")
    dataset, colon, split = body.partition(":")
    if not colon:
        raise _bad_spec(spec, "no ':' between data set and split")
    if dataset == "groundingsuite":
        if not split:
            raise _bad_spec(spec, "groundingsuite needs the path of its jsonl file")
        return SplitSpec(dataset, split, limit)
    if dataset not in EVAL_SPLITS:
        raise _bad_spec(spec, f"unknown data set {dataset!r}")
    if split not in EVAL_SPLITS[dataset]:
        raise _bad_spec(spec, f"{dataset} has no evaluation split {split!r}")
    if dataset != "toy" and preset.data_root is None:
        raise _bad_spec(spec, f"{dataset} is read from preset.data_root, which is None")
    return SplitSpec(dataset, split, limit)


def eval_dataset(
    spec: str, preset: Preset, *, reasonseg_texts: str = "first", empty_masks: str = "keep"
) -> Sequence[SegSample]:
    """The samples a split spec names (see the module docstring); ValueError on a bad spec.

    Toy splits have `preset.toy_val_size` samples unless ``@N`` asks for N. The defaults follow
    LISA's evaluation, which gives the reported numbers: ReasonSeg uses the first query of
    each image (``reasonseg_texts="all"``: every query) and RefCOCO/+/g keep refs with an
    empty segmentation as all-zero masks (``empty_masks="skip"``: leave them out, the
    training loader's default).
    """
    parsed = parse_spec(spec, preset)
    if parsed.dataset == "toy":
        return toy_split(preset, parsed.split, parsed.limit or preset.toy_val_size)
    if parsed.dataset == "groundingsuite":
        data = GroundingSuiteDataset(parsed.split)
    elif parsed.dataset == "reasonseg":
        data = ReasonSegDataset(preset.data_root, parsed.split, texts=reasonseg_texts)
    else:
        data = ReferDataset(preset.data_root, parsed.dataset, parsed.split, empty_masks=empty_masks)
    if parsed.limit is None or parsed.limit >= len(data):
        return data  # fewer samples than @N asks for: all of them (the report shows the count)
    return Subset(data, range(parsed.limit))


def evaluate_splits(
    model: LensModel,
    specs: Sequence[str],
    preset: Preset,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    accelerator: Accelerator | None = None,
) -> dict[str, dict[str, float]]:
    """{spec: `evaluate`'s metrics} for every split spec, in order.

    Every spec is checked before the first evaluation; `max_new_tokens` None means
    `preset.max_completion_length`. The progress bar (over splits) shows on the main process.
    """
    if len(set(specs)) != len(specs):
        raise ValueError(f"split specs repeat: {list(specs)}")
    for spec in specs:
        parse_spec(spec, preset)
    tokens = preset.max_completion_length if max_new_tokens is None else max_new_tokens
    main = accelerator is None or accelerator.is_main_process
    results = {}
    for spec in tqdm(specs, desc="evaluating splits", unit="split", disable=not main):
        samples = eval_dataset(spec, preset)
        results[spec] = evaluate(model, samples, batch_size, tokens, accelerator)
    return results


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
