"""Does the toy world show why LENS works? The paper's argument, measured on toy world v2.

The paper argues that a box carries WHERE an object is but not WHICH object is meant, so a
box-prompted SAM (Seg-Zero, Fig. 1b) turns grounding errors into mask errors, while LENS's
context tokens carry what the MLLM understood (Fig. A4), and a mask reward tells apart answers
a box reward cannot (Table 5, "+ R_seg"). World v2 has scenes where that is true (two shapes in
one box, a shape inside a ring, occluders: the `ambiguous` split) beside plain ones.

Per seed s (`preset.init_seed = s`: a fresh draw of the toy world and of the context module's
first weights; torch's seed s for the data order and the sampled answers):

    base models -----------------------------> Seg-Zero-style: MLLM's greedy box -> frozen SAM
    stage 1 (preset.align) ------------------> LENS after stage 1
      |-- stage 2 (preset.rl) ----------------> LENS after stage 1 + 2        ("lens")
      |     `-- misguided box: ground-truth answers with the box shifted by d box sizes:
      |         SAM prompted by the shifted box vs LENS reading the shifted answer (Fig. A4)
      |-- stage 2 without R_seg --------------> Table 5's row before "+ R_seg"
      `-- stage 1 continued for as many steps as stage 2 took -> the same-compute control

Stage 1 never changes the MLLM, so the Seg-Zero-style row and LENS after stage 1 read the SAME
greedy answers: their difference is box -> SAM against context tokens -> SAM. Every model is
scored on `samples` samples of each split by cIoU, gIoU, box IoU and the share of answers whose
rationale settles on another shape than the target ("wrong name", what only RL can change).

`run_seed` writes `seed_<s>.json` into the output folder as it goes; `merge` gathers the seeds
into fidelity.json (`lenslib/assets/tables/fidelity.json` is the committed one).

`reward_gaps` asks why stage 2 moves a model so little: do its sampled answers ever name the
target when the greedy one does not (pass@G), and do the rewards pay the answers that name it
more than those that do not (R_box and R_seg within the groups that hold both kinds)?
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator

from lenslib.data.sample import SegSample
from lenslib.evaluate import evaluate, evaluate_answers
from lenslib.metrics import IoUAccumulator
from lenslib.model import LensModel, Rollouts
from lenslib.pipeline import train_stage
from lenslib.presets import Preset, build_lens, toy_split
from lenslib.rl import score_rollouts
from lenslib.tables import QUIET, box_prompt_baseline, mean_std, sam_box_masks, short_alignment
from lenslib.toy.rationales import names_target
from lenslib.training import ground_truth_answer, save_model, take

# the committed results of `scripts/reproduce_tables.py --experiments fidelity`
COMMITTED_FIDELITY = Path(__file__).parent / "assets" / "tables" / "fidelity.json"
MODELS = ("seg_zero_style", "lens_stage1", "lens", "lens_no_rseg", "control")


@dataclass
class FidelityConfig:
    """What the fidelity experiments train and score (the stages use the preset's settings)."""

    seeds: tuple[int, ...] = (0, 1, 2)
    splits: tuple[str, ...] = ("val", "ambiguous")
    samples: int = 256  # per split
    shifts: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)  # misguided box, in box sizes
    misguided_split: str = "val"
    stage2: bool = True  # False: only the Seg-Zero-style row and LENS after stage 1
    without_rseg: bool = True  # also train stage 2 without R_seg (Table 5's row before it)


def shifted_box(
    box: Sequence[float], shift: float, angle: float, size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """`box` moved by `shift` times its own width / height along direction `angle` (radians),
    then clipped to the image (height, width); a box pushed off the image keeps >= 1 pixel."""
    x1, y1, x2, y2 = box
    dx, dy = shift * (x2 - x1) * math.cos(angle), shift * (y2 - y1) * math.sin(angle)
    h, w = size
    nx1, nx2 = min(max(x1 + dx, 0.0), w - 1.0), min(max(x2 + dx, 1.0), float(w))
    ny1, ny2 = min(max(y1 + dy, 0.0), h - 1.0), min(max(y2 + dy, 1.0), float(h))
    return nx1, ny1, max(nx2, nx1 + 1.0), max(ny2, ny1 + 1.0)


@torch.no_grad()
def misguided_box(
    model: LensModel, samples: Sequence[SegSample], shifts: Sequence[float], seed: int
) -> dict[str, list[float]]:
    """Fig. A4: cIoU of SAM prompted by a shifted ground-truth box, and of LENS reading the
    ground-truth answer (rationale + that shifted box), for each shift (one random direction
    per sample, the same at every shift). Returns {'shift', 'seg_zero_style', 'lens'}."""
    angles = np.random.default_rng(seed).uniform(0, 2 * math.pi, len(samples))
    result = {"shift": list(shifts), "seg_zero_style": [], "lens": []}
    for shift in shifts:
        moved = [
            replace(s, box=shifted_box(s.box, shift, a, s.image.shape[:2]))
            for s, a in zip(samples, angles)
        ]
        boxes = IoUAccumulator()
        for start in range(0, len(samples), 16):
            part = moved[start : start + 16]
            masks = sam_box_masks(model, [s.image for s in part], [s.box for s in part])
            for sample, mask in zip(samples[start : start + 16], masks):
                boxes.update(mask.cpu(), torch.from_numpy(sample.mask))
        answers = [ground_truth_answer(model, s) for s in moved]
        result["seg_zero_style"].append(boxes.compute()["ciou"])
        result["lens"].append(evaluate_answers(model, samples, answers)["ciou"])
    return result


def names(sample: SegSample, answer: str, preset: Preset) -> bool:
    """Does `answer`'s rationale settle on the sample's target shape?"""
    shapes, target = sample.meta["shapes"], sample.meta["target_index"]
    return names_target(answer, shapes, target, preset.toy_world)


def score(model: LensModel, samples: Sequence[SegSample], preset: Preset) -> dict[str, float]:
    """cIoU, gIoU, box IoU, format rate and the wrong-name share of greedy answers."""
    right = []

    def check(batch: Sequence[SegSample], rollouts: Rollouts) -> None:
        right.extend(names(sample, text, preset) for sample, text in zip(batch, rollouts.texts))

    metrics = evaluate(model, samples, max_new_tokens=preset.max_completion_length, on_batch=check)
    return metrics | {"wrong_name": 1.0 - sum(right) / max(len(right), 1)}


@torch.no_grad()
def reward_gaps(
    model: LensModel, samples: Sequence[SegSample], preset: Preset, batch: int = 4
) -> dict[str, float]:
    """What GRPO (eqs. 6-11) has to learn from, per prompt: G sampled answers (the preset's
    rollout settings) and the greedy one. Returns the share of greedy answers and of sampled
    answers that name the target ("greedy", "one_sample"), of prompts where at least one of
    the G does ("pass_at_g"), of groups holding both kinds ("mixed"), and over those mixed
    groups the mean R_box / R_seg of the answers naming the target minus the others'
    ("box_gap", "seg_gap": what each reward pays for naming the right shape)."""
    if not samples:
        raise ValueError("reward_gaps: no samples to score")
    cfg, G = preset.rl, preset.rl.group_size
    greedy, sampled, any_right, gaps = [], [], [], {"box": [], "seg": []}
    for start in range(0, len(samples), batch):
        part = samples[start : start + batch]
        images, texts = [s.image for s in part], [s.text for s in part]
        best = model.generate(images, texts, max_new_tokens=cfg.max_new_tokens)
        greedy += [names(s, t, preset) for s, t in zip(part, best.texts)]
        rollouts = model.generate(
            images, texts, group_size=G, max_new_tokens=cfg.max_new_tokens, do_sample=True,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        )  # fmt: skip
        out = model(images, texts, rollouts.completion_ids, rollouts.completion_mask,
                    group_size=G, boxes=rollouts.boxes)  # fmt: skip
        rewards = score_rollouts(part, rollouts, out.mask_logits, cfg)
        for i, sample in enumerate(part):
            group = rollouts.texts[i * G : (i + 1) * G]
            right = torch.tensor([names(sample, text, preset) for text in group])
            sampled += right.tolist()
            any_right.append(bool(right.any()))
            if right.any() and not right.all():
                for key in gaps:
                    paid = rewards[key][i * G : (i + 1) * G]
                    gaps[key].append(float(paid[right].mean() - paid[~right].mean()))
    mixed = len(gaps["box"])
    return {
        "greedy": statistics.fmean(greedy), "one_sample": statistics.fmean(sampled),
        "pass_at_g": statistics.fmean(any_right), "mixed": mixed / len(samples),
        "box_gap": statistics.fmean(gaps["box"]) if mixed else math.nan,
        "seg_gap": statistics.fmean(gaps["seg"]) if mixed else math.nan,
    }  # fmt: skip


def seg_zero_style(
    model: LensModel, samples: Sequence[SegSample], preset: Preset
) -> dict[str, float]:
    """The Seg-Zero-style row: the MLLM's greedy box prompts the frozen SAM (Fig. 1b)."""
    return box_prompt_baseline(model, samples, preset.max_completion_length)


def continue_alignment(
    model: LensModel, preset: Preset, steps: int, accelerator: Accelerator, out: Path
) -> None:
    """The control: stage 1 (eq. 5) run `steps` more steps on `model`, with a fresh schedule."""
    train_stage(model, short_alignment(preset, steps, out), "align", accelerator)


def run_seed(
    preset: Preset, cfg: FidelityConfig, seed: int, out: str | Path, accelerator: Accelerator
) -> dict:
    """All experiments of one seed (see the module docstring); writes out/seed_<seed>.json
    after every model, so an interrupted seed keeps what it measured, and reuses the stage-1
    model it saved (out/seed_<seed>_stage1) when run again."""
    out = Path(out)
    preset = preset.override(init_seed=seed)
    data = {s: take(toy_split(preset, s, cfg.samples), cfg.samples) for s in cfg.splits}
    result: dict = {"seed": seed, "config": asdict(cfg), "models": {}, "minutes": {}}
    path = out / f"seed_{seed}.json"

    def record(name: str, fn, start: float) -> None:
        result["models"][name] = {split: fn(samples) for split, samples in data.items()}
        result["minutes"][name] = (time.perf_counter() - start) / 60
        out.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        ciou = {k: round(v["ciou"], 3) for k, v in result["models"][name].items()}
        accelerator.print(f"seed {seed} {name}: cIoU {ciou}")

    clock = time.perf_counter()
    torch.manual_seed(seed)
    model = build_lens(preset, device=accelerator.device)
    record("seg_zero_style", lambda s: seg_zero_style(model, s, preset), clock)
    clock = time.perf_counter()
    stage1 = out / f"seed_{seed}_stage1"
    if (stage1 / "lens_config.json").exists():  # an interrupted seed: stage 1 is saved
        model = LensModel.from_pretrained(stage1, device=accelerator.device)
    else:
        align = preset.override("align", output_dir=str(out / f"seed_{seed}_align"), **QUIET)
        train_stage(model, align, "align", accelerator)
        save_model(model, stage1, accelerator)
    record("lens_stage1", lambda s: score(model, s, preset), clock)
    if not cfg.stage2:
        result["done"] = True
        path.write_text(json.dumps(result, indent=2) + "\n")
        return result

    def stage2(name: str, weights: tuple[float, float, float]) -> LensModel:
        start = time.perf_counter()
        torch.manual_seed(seed)
        again = LensModel.from_pretrained(stage1, device=accelerator.device)
        rl = preset.override("rl", reward_weights=weights, output_dir=str(out / f"seed_{seed}_{name}"),
                             **QUIET)  # fmt: skip
        train_stage(again, rl, "rl", accelerator)
        record(name, lambda s: score(again, s, preset), start)
        return again

    lens = stage2("lens", preset.rl.reward_weights)
    clock = time.perf_counter()
    shifted = data.get(cfg.misguided_split) or take(
        toy_split(preset, cfg.misguided_split, cfg.samples), cfg.samples
    )
    result["misguided_box"] = misguided_box(lens, shifted, cfg.shifts, seed)
    result["minutes"]["misguided_box"] = (time.perf_counter() - clock) / 60
    if cfg.without_rseg:
        weights = preset.rl.reward_weights
        stage2("lens_no_rseg", (weights[0], weights[1], 0.0))
    clock = time.perf_counter()
    torch.manual_seed(seed)
    control = LensModel.from_pretrained(stage1, device=accelerator.device)
    steps = preset.rl.max_steps or 0
    continue_alignment(control, preset, steps, accelerator, out / f"seed_{seed}_control")
    record("control", lambda s: score(control, s, preset), clock)
    result["done"] = True
    path.write_text(json.dumps(result, indent=2) + "\n")
    return result


def merge(seeds: Sequence[dict]) -> dict:
    """The per-seed results gathered into fidelity.json's layout, cIoU as fractions:
    {"seeds", "splits", split: {model: [cIoU per seed]}, "model_seeds": {model: [seeds]},
     "stage2": {"seeds", "before", "after", "control"}, "misguided_box": {"shift",
     "seg_zero_style", "lens"} (means over seeds) and "per_seed", "details": {model: {split:
     {metric: [per seed]}}}}. A seed run without stage 2 counts only for the models it has."""
    seeds = sorted(seeds, key=lambda r: r["seed"])
    has = {m: [r for r in seeds if m in r["models"]] for m in MODELS}
    names = [m for m in MODELS if has[m]]
    splits = list(seeds[0]["models"][names[0]]) if names else []
    merged: dict = {"seeds": [r["seed"] for r in seeds], "splits": splits}
    merged["model_seeds"] = {m: [r["seed"] for r in has[m]] for m in names}
    for split in splits:
        merged[split] = {m: [r["models"][m][split]["ciou"] for r in has[m]] for m in names}
    full = [r for r in seeds if {"lens_stage1", "lens", "control"} <= set(r["models"])]
    if "val" in splits and full:
        merged["stage2"] = {
            "seeds": [r["seed"] for r in full],
            **{key: [r["models"][m]["val"]["ciou"] for r in full]
               for key, m in (("before", "lens_stage1"), ("after", "lens"), ("control", "control"))},
        }  # fmt: skip
    boxes = [r["misguided_box"] for r in seeds if "misguided_box" in r]
    if boxes:
        merged["misguided_box"] = {
            "shift": boxes[0]["shift"],
            "seg_zero_style": [statistics.fmean(v) for v in zip(*(b["seg_zero_style"] for b in boxes))],
            "lens": [statistics.fmean(v) for v in zip(*(b["lens"] for b in boxes))],
            "per_seed": boxes,
        }  # fmt: skip
    metrics = ("ciou", "giou", "box_iou", "wrong_name")
    merged["details"] = {
        m: {
            s: {
                k: [r["models"][m][s][k] for r in has[m] if k in r["models"][m][s]] for k in metrics
            }
            for s in splits
        }
        for m in names
    }
    merged["samples"] = seeds[0]["config"]["samples"] if seeds else 0
    return merged


def load_seeds(folder: str | Path) -> list[dict]:
    """Every seed_<s>.json in `folder` (finished or not)."""
    return [json.loads(p.read_text()) for p in sorted(Path(folder).glob("seed_*.json"))]


def run_fidelity(
    preset: Preset, cfg: FidelityConfig, out: str | Path, accelerator: Accelerator
) -> dict:
    """Run `cfg.seeds` (skipping seeds whose seed_<s>.json is finished), then merge every seed
    found in `out` into out/fidelity.json; returns the merged results."""
    out = Path(out)
    for seed in cfg.seeds:
        path = out / f"seed_{seed}.json"
        if path.exists() and json.loads(path.read_text()).get("done"):
            accelerator.print(f"seed {seed}: already done ({path})")
            continue
        run_seed(preset, cfg, seed, out, accelerator)
    merged = merge([r for r in load_seeds(out) if r.get("done")])
    out.mkdir(parents=True, exist_ok=True)
    (out / "fidelity.json").write_text(json.dumps(merged, indent=2) + "\n")
    return merged


def load_fidelity(path: str | Path = COMMITTED_FIDELITY) -> dict:
    """fidelity.json as `merge` wrote it (ValueError naming the file if it is not one)."""
    data = json.loads(Path(path).read_text())
    if "seeds" not in data:
        raise ValueError(f"{path}: no 'seeds' key; expected the output of lenslib.fidelity.merge")
    return data


def summary(merged: dict) -> str:
    """A Markdown table: cIoU mean +- std over the seeds that ran each model, per split."""
    splits = merged["splits"]
    lines = ["| model | seeds | " + " | ".join(splits) + " |", "|---|---|" + "---:|" * len(splits)]
    for model, seeds in merged["model_seeds"].items():
        cells = ["{:.3f} ± {:.3f}".format(*mean_std(merged[s][model])) for s in splits]
        lines.append(f"| {model} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
