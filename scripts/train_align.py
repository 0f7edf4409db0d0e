"""Stage 1 of LENS, pretraining alignment (paper eq. 5, Table A1): train the context queries and the connector between a frozen MLLM and a frozen SAM2.

Exported from notebooks/03_alignment_training.ipynb by `python -m lenslib.export`: edit the notebook,
not this file (tests/test_export.py fails when the two disagree).

Launch: accelerate launch --config_file configs/accelerate/zero2.yaml scripts/train_align.py --preset full --data-root data --output-dir runs/align [--resume]
"""

import argparse

from lenslib.presets import add_setting_flags
from lenslib.settings import changed

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--preset', type=str, default='toy', choices=['toy', 'full'], help='model and data scale (choices: toy, full)')
parser.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False, help='continue from the newest checkpoint in output_dir')
parser.add_argument('--cpu', action=argparse.BooleanOptionalAction, default=False, help='force CPU (also for two CPU processes under accelerate launch)')
setting_names = add_setting_flags(parser, 'align')
args = parser.parse_args()
preset = args.preset
settings = changed(args, setting_names)
resume = args.resume
cpu = args.cpu

# --- notebook cell 3 ---
import torch

from lenslib.align import teacher_forced_metrics
from lenslib.evaluate import evaluate
from lenslib.pipeline import train_stage
from lenslib.presets import build_lens, get_preset, train_val_data
from lenslib.training import make_accelerator, save_model, take

torch.manual_seed(0)
accelerator = make_accelerator(cpu=cpu)
config = get_preset(preset, "align", **settings)  # config.align holds stage 1's settings
model = build_lens(config, device=accelerator.device)
train, val = train_val_data(config)
accelerator.print(f"{config.name}: {len(train)} training samples, {len(val)} validation samples")

# --- notebook cell 12 ---
# NBVAL_IGNORE_OUTPUT
probe = take(val, config.align.eval_samples)
if not config.align.dry_run:  # a dry run only times 2 steps: no evaluation
    untrained = evaluate(model, probe, max_new_tokens=config.align.max_new_tokens, accelerator=accelerator)
    tf_untrained = teacher_forced_metrics(model, probe, accelerator=accelerator)
    accelerator.print("untrained context module, greedy:", {k: round(v, 3) for k, v in untrained.items()})
    accelerator.print("untrained context module, teacher forced:", {k: round(v, 3) for k, v in tf_untrained.items()})

# --- notebook cell 14 ---
# NBVAL_IGNORE_OUTPUT
history = train_stage(model, config, "align", accelerator, (train, val), resume=resume)
if not config.align.dry_run:  # a dry run saves and evaluates nothing
    save_model(model, f"{config.align.output_dir}/final", accelerator)
    final = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")}
    tf_final = teacher_forced_metrics(model, probe, accelerator=accelerator)
    accelerator.print("after stage 1, greedy:", {k: round(v, 3) for k, v in final.items()})
    accelerator.print("after stage 1, teacher forced:", {k: round(v, 3) for k, v in tf_final.items()})
