"""The paper's ablations reproduced in miniature on the toy world (Tables 3, 4, 5 and Fig. 1b).

    python scripts/reproduce_tables.py --preset toy --out results/tables

Every row is a short training run of the SAME code as notebooks 03-04, evaluated by cIoU on
the toy testA split (the paper: RefCOCO testA):

* Table 3, query count M in {1, 16, 32, 64, 128}: stage 1 only (the paper's table is measured
  after the alignment stage).
* Table 4, connector "mlp" vs "vit": stage 1 only.
* Table 5, components added in turn: the context module without alignment trained by GRPO
  with R_box, then + R_format, then + the alignment stage, then + R_seg. The paper's first row
  is a LISA-like model (no context module); our first row is the Seg-Zero-style baseline of
  Fig. 1b instead: the MLLM's own box prompts the frozen SAM2 (`box_prompt_baseline`).
  The seg loss (alpha, eq. 12) stays on in every GRPO row; only the rewards change.

The toy runs are a few hundred steps on a CPU, so read the toy numbers for their ORDER, not
their size; `paper_rows` puts the paper's numbers beside them. One seed per row: differences
of a point or two are noise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from lenslib.answers import Box
from lenslib.data.sample import SegSample
from lenslib.evaluate import evaluate
from lenslib.metrics import IoUAccumulator
from lenslib.model import LensModel
from lenslib.pipeline import run_pipeline
from lenslib.presets import Preset, build_lens, toy_split
from lenslib.training import take

# the results of `scripts/reproduce_tables.py --preset toy`, committed (notebook 06 reads them)
COMMITTED_RESULTS = Path(__file__).parent / "assets" / "tables" / "tables.json"
# the paper's cIoU (%) on RefCOCO testA
PAPER_TABLE3 = {1: 85.9, 16: 87.4, 32: 87.8, 64: 87.9, 128: 87.2}
PAPER_TABLE4 = {"mlp": 72.8, "vit": 87.8}
# (row name, context module, alignment, (lambda_format, lambda_box, lambda_seg) or None, paper)
TABLE5_ROWS = (
    ("Seg-Zero-style: MLLM box -> frozen SAM (paper row: LISA-like)", False, False, None, 79.3),
    ("context + RL(R_box)", True, False, (0.0, 1.0, 0.0), None),
    ("context + RL(R_box, R_format)", True, False, (1.0, 1.0, 0.0), 72.3),
    ("context + align + RL(R_box, R_format)", True, True, (1.0, 1.0, 0.0), 81.9),
    ("context + align + RL(R_box, R_format, R_seg) = LENS", True, True, (1.0, 1.0, 1.0), 82.7),
)


@dataclass
class TableConfig:
    """How long each toy row trains and what it is scored on."""

    align_steps: int = 256
    rl_steps: int = 40
    eval_split: str = "testA"
    eval_samples: int = 64
    query_counts: tuple[int, ...] = (1, 16, 32, 64, 128)
    connectors: tuple[str, ...] = ("mlp", "vit")
    seed: int = 0


QUIET = dict(eval_every=0, eval_at_end=False, checkpoint_every=0)  # rows are scored on testA


def short_alignment(preset: Preset, steps: int, out: Path) -> Preset:
    """`preset` with stage 1 (eq. 5) cut to `steps` optimiser steps (enough epochs for them),
    saving to `out`, without validation or checkpoints."""
    epochs = max(1, -(-steps * preset.align.batch_size // preset.toy_train_size))
    return preset.override("align", epochs=epochs, max_steps=steps, output_dir=str(out), **QUIET)


def aligned(preset: Preset, cfg: TableConfig, accelerator: Accelerator, out: Path) -> LensModel:
    """A fresh LENS model of `preset` after `cfg.align_steps` steps of stage 1 (eq. 5)."""
    torch.manual_seed(cfg.seed)
    preset = short_alignment(preset, cfg.align_steps, out)
    model = build_lens(preset, device=accelerator.device)
    return run_pipeline(preset, accelerator, stages=("align",), model=model)[0]


def reinforced(
    model: LensModel,
    preset: Preset,
    weights: tuple[float, float, float],
    cfg: TableConfig,
    accelerator: Accelerator,
    out: Path,
) -> LensModel:
    """`model` after `cfg.rl_steps` GRPO steps (eqs. 6-12) with reward weights
    (lambda_format, lambda_box, lambda_seg) of eq. 11."""
    torch.manual_seed(cfg.seed)
    preset = preset.override(
        "rl", epochs=1, reward_weights=weights, max_steps=cfg.rl_steps, output_dir=str(out),
        **QUIET,
    )  # fmt: skip
    return run_pipeline(preset, accelerator, stages=("rl",), model=model)[0]


@torch.no_grad()
def sam_box_masks(
    model: LensModel, images: Sequence[np.ndarray], boxes: Sequence[Box | None]
) -> list[torch.Tensor]:
    """The frozen SAM2 prompted by one box per image (original pixels): (H, W) bool masks.
    A missing box (an answer without one) gives an empty mask."""
    sizes = [image.shape[:2] for image in images]
    prompts = torch.tensor(
        [box if box is not None else (0, 0, 0, 0) for box in boxes], dtype=torch.float32
    )  # (B, 4)
    out = model.sam.decode(model.sam.encode(images), boxes=prompts, orig_sizes=sizes)
    return [
        logits[0] > 0 if box is not None else torch.zeros_like(logits[0], dtype=torch.bool)
        for logits, box in zip(out.logits, boxes)
    ]


@torch.no_grad()
def box_prompt_baseline(
    model: LensModel, samples: Sequence[SegSample], max_new_tokens: int, batch_size: int = 16
) -> dict[str, float]:
    """Fig. 1b: the MLLM's greedy box alone prompts the frozen SAM2 (no context module).
    An answer without a box gets an empty mask. Returns {'ciou', 'giou', 'count'}."""
    model.eval()
    masks = IoUAccumulator()
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        images = [s.image for s in batch]
        rollouts = model.generate(images, [s.text for s in batch], max_new_tokens=max_new_tokens)
        for sample, pred in zip(batch, sam_box_masks(model, images, rollouts.boxes)):
            masks.update(pred.cpu(), torch.from_numpy(sample.mask))
    return masks.compute()


def ciou(model: LensModel, samples: Sequence[SegSample], preset: Preset) -> float:
    """cIoU (%) of `model` on `samples`, greedy answers (the tables' metric)."""
    return 100 * evaluate(model, samples, max_new_tokens=preset.max_completion_length)["ciou"]


def run_tables(
    preset: Preset, cfg: TableConfig, out: str | Path, accelerator: Accelerator
) -> dict[str, list[dict]]:
    """Train and score every row; returns {"table3": rows, "table4": rows, "table5": rows},
    each row {"row", "toy_ciou", "paper_ciou"}. Also writes out/tables.json after each row,
    so a long run shows its progress."""
    out = Path(out)
    test = take(toy_split(preset, cfg.eval_split, cfg.eval_samples), cfg.eval_samples)
    results: dict[str, list[dict]] = {"table3": [], "table4": [], "table5": []}

    def record(table: str, row: str, toy: float, paper: float | None) -> None:
        results[table].append({"row": row, "toy_ciou": round(toy, 1), "paper_ciou": paper})
        accelerator.print(f"{table}: {row}: toy {toy:.1f}, paper {paper}")
        save_results(results, cfg, out)

    models: dict[tuple[int, str], float] = {}
    for m in cfg.query_counts:
        model = aligned(preset.override(num_queries=m), cfg, accelerator, out / f"q{m}")
        models[(m, preset.lens.connector_kind)] = ciou(model, test, preset)
        record("table3", f"M = {m}", models[(m, preset.lens.connector_kind)], PAPER_TABLE3.get(m))
    for kind in cfg.connectors:
        if (preset.lens.num_queries, kind) not in models:
            changed = preset.override(connector_kind=kind)
            model = aligned(changed, cfg, accelerator, out / f"connector_{kind}")
            models[(preset.lens.num_queries, kind)] = ciou(model, test, preset)
        record("table4", kind, models[(preset.lens.num_queries, kind)], PAPER_TABLE4.get(kind))
    for i, (row, context, align, weights, paper) in enumerate(TABLE5_ROWS):
        torch.manual_seed(cfg.seed)
        if not context:
            model = build_lens(preset, device=accelerator.device)
            toy = 100 * box_prompt_baseline(model, test, preset.max_completion_length)["ciou"]
        else:
            if align:
                model = aligned(preset, cfg, accelerator, out / f"table5_{i}_align")
            else:
                model = build_lens(preset, device=accelerator.device)
            model = reinforced(model, preset, weights, cfg, accelerator, out / f"table5_{i}_rl")
            toy = ciou(model, test, preset)
        record("table5", row, toy, paper)
    return results


def save_results(results: dict[str, list[dict]], cfg: TableConfig, out: str | Path) -> Path:
    """Write out/tables.json ({"config", "tables"}) and out/tables.md; returns the json path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tables.json"
    path.write_text(json.dumps({"config": asdict(cfg), "tables": results}, indent=2) + "\n")
    (out / "tables.md").write_text(markdown(results) + "\n")
    return path


def load_results(path: str | Path) -> dict[str, list[dict]]:
    """The tables saved by `save_results` (ValueError naming the file if it is not one)."""
    data = json.loads(Path(path).read_text())
    if "tables" not in data:
        raise ValueError(f"{path}: no 'tables' key; expected the output of save_results")
    return data["tables"]


TITLES = {
    "table3": "Table 3: number of context queries (stage 1), cIoU %",
    "table4": "Table 4: connector (stage 1), cIoU %",
    "table5": "Table 5: components added in turn, cIoU %",
}


def markdown(results: dict[str, list[dict]]) -> str:
    """The three tables in Markdown, toy cIoU beside the paper's (— where it has none)."""
    parts = []
    for table, rows in results.items():
        parts += [f"### {TITLES[table]}", "", "| row | toy | paper |", "|---|---:|---:|"]
        for r in rows:
            paper = "—" if r["paper_ciou"] is None else f"{r['paper_ciou']:.1f}"
            parts.append(f"| {r['row']} | {r['toy_ciou']:.1f} | {paper} |")
        parts.append("")
    return "\n".join(parts).rstrip()
