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
their size; the paper's numbers stand beside them. Every row is trained once per seed s (a
fresh draw of the toy world and of the context module's first weights, `preset.init_seed = s`,
and torch's seed s) and reported as mean and sample std over the seeds; out/tables_seed_<s>.json
keeps each seed's rows as they finish, so an interrupted run resumes at the next row.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
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
from lenslib.training import save_model, take

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
    eval_samples: int = 256
    query_counts: tuple[int, ...] = (1, 16, 32, 64, 128)
    connectors: tuple[str, ...] = ("mlp", "vit")
    seeds: tuple[int, ...] = (0, 1, 2)


QUIET = dict(eval_every=0, eval_at_end=False, checkpoint_every=0)  # rows are scored on testA


def short_alignment(preset: Preset, steps: int, out: Path) -> Preset:
    """`preset` with stage 1 (eq. 5) cut to `steps` optimiser steps (enough epochs for them),
    saving to `out`, without validation or checkpoints."""
    epochs = max(1, -(-steps * preset.align.batch_size // preset.toy_train_size))
    return preset.override("align", epochs=epochs, max_steps=steps, output_dir=str(out), **QUIET)


def aligned(
    preset: Preset, cfg: TableConfig, seed: int, accelerator: Accelerator, out: Path
) -> LensModel:
    """A fresh LENS model of `preset` after `cfg.align_steps` steps of stage 1 (eq. 5)."""
    torch.manual_seed(seed)
    preset = short_alignment(preset, cfg.align_steps, out)
    model = build_lens(preset, device=accelerator.device)
    return run_pipeline(preset, accelerator, stages=("align",), model=model)[0]


def reinforced(
    model: LensModel,
    preset: Preset,
    weights: tuple[float, float, float],
    cfg: TableConfig,
    seed: int,
    accelerator: Accelerator,
    out: Path,
) -> LensModel:
    """`model` after `cfg.rl_steps` GRPO steps (eqs. 6-12) with reward weights
    (lambda_format, lambda_box, lambda_seg) of eq. 11."""
    torch.manual_seed(seed)
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


def run_seed(
    preset: Preset, cfg: TableConfig, seed: int, out: str | Path, accelerator: Accelerator
) -> dict[str, dict[str, float]]:
    """Every row for one seed: {table: {row: cIoU %}}. Writes out/tables_seed_<seed>.json after
    each row and skips the rows already in it, so an interrupted seed resumes where it stopped.
    The stage-1 model of the preset's own M and connector serves Tables 3, 4 and 5's aligned
    rows (trained once, saved in out/seed_<seed>_aligned)."""
    out = Path(out)
    path = out / f"tables_seed_{seed}.json"
    rows = json.loads(path.read_text())["tables"] if path.exists() else {t: {} for t in TITLES}
    preset = preset.override(init_seed=seed)
    test = take(toy_split(preset, cfg.eval_split, cfg.eval_samples), cfg.eval_samples)
    own = (preset.lens.num_queries, preset.lens.connector_kind)
    saved = out / f"seed_{seed}_aligned"

    def record(table: str, name: str, value: float) -> None:
        rows[table][name] = round(value, 2)
        out.mkdir(parents=True, exist_ok=True)
        record_cfg = asdict(cfg) | {"seeds": [seed]}
        path.write_text(
            json.dumps({"seed": seed, "config": record_cfg, "tables": rows}, indent=2) + "\n"
        )
        accelerator.print(f"seed {seed} {table}: {name}: {value:.1f}")

    def stage1(m: int, kind: str) -> LensModel:
        if (m, kind) == own and (saved / "lens_config.json").exists():
            return LensModel.from_pretrained(saved, device=accelerator.device)
        changed = preset.override(num_queries=m, connector_kind=kind)
        model = aligned(changed, cfg, seed, accelerator, out / f"seed_{seed}_q{m}_{kind}")
        if (m, kind) == own:
            save_model(model, saved, accelerator)
        return model

    for m in cfg.query_counts:
        if f"M = {m}" not in rows["table3"]:
            record("table3", f"M = {m}", ciou(stage1(m, own[1]), test, preset))
    for kind in cfg.connectors:
        same = rows["table3"].get(f"M = {own[0]}") if kind == own[1] else None
        if kind not in rows["table4"]:
            value = same if same is not None else ciou(stage1(own[0], kind), test, preset)
            record("table4", kind, value)
    for i, (name, context, align, weights, _) in enumerate(TABLE5_ROWS):
        if name in rows["table5"]:
            continue
        torch.manual_seed(seed)
        if not context:
            model = build_lens(preset, device=accelerator.device)
            record(
                "table5",
                name,
                100 * box_prompt_baseline(model, test, preset.max_completion_length)["ciou"],
            )
            continue
        model = stage1(*own) if align else build_lens(preset, device=accelerator.device)
        model = reinforced(
            model, preset, weights, cfg, seed, accelerator, out / f"seed_{seed}_table5_{i}"
        )
        record("table5", name, ciou(model, test, preset))
    return rows


def merge(seeds: Sequence[dict], cfg: TableConfig) -> dict[str, list[dict]]:
    """The per-seed rows gathered, in table order: {table: [{"row", "toy_ciou" (mean over
    seeds), "toy_std" (sample std, 0 for one seed), "toy_per_seed", "seeds", "paper_ciou"}]}."""
    names = {
        "table3": [(f"M = {m}", PAPER_TABLE3.get(m)) for m in cfg.query_counts],
        "table4": [(kind, PAPER_TABLE4.get(kind)) for kind in cfg.connectors],
        "table5": [(row[0], row[4]) for row in TABLE5_ROWS],
    }
    seeds = sorted(seeds, key=lambda r: r["seed"])
    results: dict[str, list[dict]] = {}
    for table, table_rows in names.items():
        results[table] = []
        for name, paper in table_rows:
            have = [r for r in seeds if name in r["tables"].get(table, {})]
            if not have:
                continue
            values = [r["tables"][table][name] for r in have]
            mean, std = mean_std(values)
            results[table].append({
                "row": name, "toy_ciou": round(mean, 1), "toy_std": round(std, 1),
                "toy_per_seed": values, "seeds": [r["seed"] for r in have], "paper_ciou": paper,
            })  # fmt: skip
    return results


def run_tables(
    preset: Preset, cfg: TableConfig, out: str | Path, accelerator: Accelerator
) -> dict[str, list[dict]]:
    """Train and score every row for every seed of `cfg` (`run_seed`), then merge every seed
    found in `out` (seeds run by other processes included) and write out/tables.json and
    out/tables.md; returns the merged tables."""
    out = Path(out)
    for seed in cfg.seeds:
        run_seed(preset, cfg, seed, out, accelerator)
    seeds = [json.loads(p.read_text()) for p in sorted(out.glob("tables_seed_*.json"))]
    results = merge(seeds, cfg)
    save_results(results, replace(cfg, seeds=tuple(r["seed"] for r in seeds)), out)
    return results


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


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
    """The three tables in Markdown, toy cIoU (mean ± std over n seeds where there are
    several) beside the paper's (— where it has none)."""
    parts = []
    for table, rows in results.items():
        parts += [
            f"### {TITLES[table]}",
            "",
            "| row | toy | seeds | paper |",
            "|---|---:|---:|---:|",
        ]
        for r in rows:
            paper = "—" if r["paper_ciou"] is None else f"{r['paper_ciou']:.1f}"
            n = len(r.get("seeds", [0]))
            toy = f"{r['toy_ciou']:.1f}" + (f" ± {r['toy_std']:.1f}" if n > 1 else "")
            parts.append(f"| {r['row']} | {toy} | {n} | {paper} |")
        parts.append("")
    return "\n".join(parts).rstrip()
