"""Named evaluation splits: split specs such as ``refcoco:testA@100`` turned into data sets.

Benchmarks are named by *split specs*, ``<dataset>:<split>[@N]``::

    toy:val  toy:testA@200  refcoco:testB  refcoco+:val  refcocog:test  reasonseg:val@50
    groundingsuite:data/GroundingSuite/GroundingSuite-Eval.jsonl

``@N`` keeps the first N samples. `evaluate_splits` runs `lenslib.evaluate.evaluate` on each;
`lenslib.evaluate.write_reports` saves the numbers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

from accelerate import Accelerator
from torch.utils.data import Subset
from tqdm.auto import tqdm

from lenslib.data.groundingsuite import GroundingSuiteDataset
from lenslib.data.reasonseg import ReasonSegDataset
from lenslib.data.refer import ReferDataset, count_warning, expected_count
from lenslib.data.sample import SegSample
from lenslib.evaluate import evaluate
from lenslib.model import LensModel
from lenslib.presets import Preset, toy_split

# data set -> the splits a spec may name (the evaluation splits of the LISA protocol)
EVAL_SPLITS: dict[str, tuple[str, ...]] = {
    "toy": ("val", "testA", "testB", "ambiguous"),  # ambiguous: world v2 only
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
    each image (``reasonseg_texts="all"``: every query), and samples with an empty
    segmentation are kept as all-zero masks (``empty_masks="skip"``: leave them out, the
    training loaders' default).
    """
    parsed = parse_spec(spec, preset)
    if parsed.dataset == "toy":
        return toy_split(preset, parsed.split, parsed.limit or preset.toy_val_size)
    if parsed.dataset == "groundingsuite":
        data = GroundingSuiteDataset(parsed.split)
    elif parsed.dataset == "reasonseg":
        data = ReasonSegDataset(
            preset.data_root, parsed.split, texts=reasonseg_texts, empty_masks=empty_masks
        )
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
        if main:
            check_count(spec, samples, preset)
        results[spec] = evaluate(model, samples, batch_size, tokens, accelerator)
    return results


def check_count(spec: str, samples: Sequence[SegSample], preset: Preset) -> str | None:
    """Print a whole benchmark split's sample count next to the count the LISA protocol
    evaluates (RefCOCO/+/g), and warn when they differ: published cIoU is over those samples.
    Returns the warning, or None."""
    parsed = parse_spec(spec, preset)
    expected = expected_count(parsed.dataset, parsed.split)
    if expected is None or parsed.limit is not None:
        return None
    print(f"{spec}: {len(samples):,} samples (LISA protocol: {expected:,})")
    message = count_warning(
        parsed.dataset, parsed.split, len(samples), skipped=getattr(samples, "skipped", None)
    )
    if message:
        warnings.warn(message, stacklevel=2)
    return message
