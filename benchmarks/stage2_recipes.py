"""Stage 2 at toy scale: which recipe lifts the validation masks? (the table in notebook 04)

    .venv/bin/python benchmarks/stage2_recipes.py [--init runs/toy/align/final] \
        [--batch-size 16] [--mllm-lr 1e-4] [--lr 1e-6] [--sam-lr 1e-6] [--alpha 0.1] \
        [--seed 42] [--max-steps 64] [--scale-rewards group|none] [--eval-every 32] \
        [--eval-samples 256] [--threads 1]

Starts from a stage-1 model (made with the toy preset first if `--init` holds none), runs
stage 2 (`lenslib.pipeline.train_stage`) with the toy preset changed by the flags (every
stage-2 setting is a flag: `--help` lists them), and prints validation cIoU / gIoU / box IoU
before and every `--eval-every` steps, plus 16-step means of the training rewards; the final
model is saved in `--output-dir`/final.
`--max-steps` stops within the preset's one toy epoch (2048 samples / `--batch-size` steps).
`--seed` sets stage 2's data order only (the toy world comes from `--init-seed`). One run per
seed; compare recipes over several seeds (differences of 0.01-0.02 cIoU are seed noise at
this size).
"""

import argparse
import platform
import time
from pathlib import Path

import torch

from lenslib.evaluate import evaluate
from lenslib.pipeline import aligned_model, train_stage
from lenslib.presets import add_setting_flags, get_preset, toy_split
from lenslib.settings import changed
from lenslib.training import make_accelerator, save_model, take

VAL_KEYS = ("ciou", "giou", "box_iou", "format_rate")
REWARD_KEYS = ("reward", "reward_box", "reward_seg", "kl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", default="runs/toy/align/final")
    parser.add_argument("--threads", type=int, default=1)
    names = add_setting_flags(parser, "rl")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    accelerator = make_accelerator(cpu=True)
    defaults = dict(eval_every=32, eval_samples=256, output_dir="runs/toy/stage2_recipes")
    preset = get_preset("toy", "rl", **(defaults | changed(args, names)))
    preset = preset.override(toy_val_size=preset.rl.eval_samples)
    model = aligned_model(preset, args.init, accelerator)
    val = take(toy_split(preset, "val", preset.toy_val_size), preset.toy_val_size)
    before = evaluate(model, val, max_new_tokens=preset.max_completion_length)
    print("step 0", {k: round(before[k], 3) for k in VAL_KEYS}, flush=True)
    cfg = preset.rl
    shown = ("batch_size", "lr", "mllm_lr", "sam_lr", "alpha", "seed", "scale_rewards")
    print({k: getattr(cfg, k) for k in shown})
    rows, start = [], time.perf_counter()

    def on_log(record: dict) -> None:
        rows.append(record)
        if len(rows) % 16 == 0:
            window = rows[-16:]
            means = {k: round(sum(r[k] for r in window) / 16, 3) for k in REWARD_KEYS}
            print(f"steps {len(rows) - 15}-{len(rows)} training", means, flush=True)
        if "val_ciou" in record:
            print(f"step {len(rows)}", {k: round(record[f"val_{k}"], 3) for k in VAL_KEYS})

    train_stage(model, preset, "rl", accelerator, on_log=on_log)
    minutes = (time.perf_counter() - start) / 60
    final = Path(cfg.output_dir) / "final"
    save_model(model, final, accelerator)  # for benchmarks/reward_gaps.py --init
    where = f"{args.threads} thread(s), {platform.processor() or platform.machine()}"
    print(f"{len(rows)} steps in {minutes:.1f} min on {where}; final model in {final}")


if __name__ == "__main__":
    main()
