"""Stage 2 of LENS, GRPO with unified rewards (paper eqs. 6-12, Table A2): everything but SAM's image encoder learns from format, box and mask rewards plus a segmentation loss.

Exported from notebooks/04_rl_unified_rewards.ipynb by `python -m lenslib.export`: edit the notebook,
not this file (tests/test_export.py fails when the two disagree).

Launch: accelerate launch --config_file configs/accelerate/zero2.yaml scripts/train_rl.py --preset full --data-root data --init runs/align/final --output-dir runs/rl [--resume]
"""

import argparse

from lenslib.presets import add_setting_flags
from lenslib.settings import changed

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--preset', type=str, default='toy', choices=['toy', 'full'], help='model and data scale (choices: toy, full)')
parser.add_argument('--init', type=str, default='runs/toy/align/final', help='the stage-1 model (toy: made first if missing)')
parser.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False, help='continue from the newest checkpoint in output_dir')
parser.add_argument('--cpu', action=argparse.BooleanOptionalAction, default=False, help='force CPU')
setting_names = add_setting_flags(parser, 'rl')
args = parser.parse_args()
preset = args.preset
init = args.init
settings = changed(args, setting_names)
resume = args.resume
cpu = args.cpu

# --- notebook cell 3 ---
# NBVAL_IGNORE_OUTPUT
# (run on its own, without notebook 03's model, stage 1 runs first here and says so)
import torch

from lenslib.evaluate import evaluate
from lenslib.pipeline import aligned_model, train_stage
from lenslib.presets import get_preset, train_val_data
from lenslib.training import make_accelerator, save_model, take

torch.manual_seed(0)
accelerator = make_accelerator(cpu=cpu)
config = get_preset(preset, "rl", **settings)  # config.rl holds stage 2's settings
model = aligned_model(config, init, accelerator)
train, val = train_val_data(config)
print({k: getattr(config.rl, k) for k in ("lr", "mllm_lr", "sam_lr", "batch_size", "group_size", "max_steps")})

# --- notebook cell 19 ---
# NBVAL_IGNORE_OUTPUT
if not config.rl.dry_run:  # a dry run only times 2 steps: no evaluation, nothing saved
    before = evaluate(model, take(val, config.rl.eval_samples), max_new_tokens=config.rl.max_new_tokens, accelerator=accelerator)
    accelerator.print("after stage 1:", {k: round(v, 3) for k, v in before.items()})
history = train_stage(model, config, "rl", accelerator, (train, val), resume=resume)
if not config.rl.dry_run:
    save_model(model, f"{config.rl.output_dir}/final", accelerator)
    final = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")}
    accelerator.print("after stage 2:", {k: round(v, 3) for k, v in final.items()})
