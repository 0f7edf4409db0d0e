"""Stage 2 of LENS, GRPO with unified rewards (paper eqs. 6-12, Table A2): everything but SAM's image encoder learns from format, box and mask rewards plus a segmentation loss.

Exported from notebooks/04_rl_unified_rewards.ipynb by `python -m lenslib.export`: edit the notebook,
not this file (tests/test_export.py fails when the two disagree).

Launch: accelerate launch --config_file configs/accelerate/zero2.yaml scripts/train_rl.py --preset full --data-root data --init runs/align/final --output-dir runs/rl [--resume]
"""

import argparse

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--preset', type=str, default='toy', choices=['toy', 'full'], help='model and data scale (choices: toy, full)')
parser.add_argument('--data-root', type=str, default=None, help='full scale: the folder holding refer_seg/')
parser.add_argument('--init', type=str, default='runs/toy/align/final', help='the stage-1 model (made first if missing)')
parser.add_argument('--output-dir', type=str, default='runs/toy/rl', help='checkpoints and the final model (output_dir/final)')
parser.add_argument('--epochs', type=int, default=None, help="None: the preset's (Table A2: 16)")
parser.add_argument('--batch-size', type=int, default=None, help="prompts per step, global; None: the preset's (Table A2: 64)")
parser.add_argument('--group-size', type=int, default=None, help="G rollouts per prompt; None: the preset's (Table A2: 8)")
parser.add_argument('--lr', type=float, default=None, help="None: the preset's (Table A2: 3e-6)")
parser.add_argument('--mllm-lr', type=float, default=None, help="the MLLM's own lr; None: the preset's (full: lr, as Table A2; toy: 1e-5)")
parser.add_argument('--sam-lr', type=float, default=None, help="SAM decoder's own lr; None: the preset's (full: lr; toy: 1e-5)")
parser.add_argument('--beta', type=float, default=None, help="KL weight; None: the preset's (0.04)")
parser.add_argument('--alpha', type=float, default=None, help="seg-loss weight of eq. 12; None: the preset's (1.0)")
parser.add_argument('--square-iou', action=argparse.BooleanOptionalAction, default=False, help="square R_box and R_seg as the authors' code does")
parser.add_argument('--aggregation', type=str, default='grpo', choices=['grpo', 'bnpo', 'dr_grpo', 'dapo'], help='eq. 10 (choices: grpo, bnpo, dr_grpo, dapo)')
parser.add_argument('--std', type=str, default='population', choices=['population', 'bessel'], help='eq. 6, or Bessel as TRL / the authors (choices: population, bessel)')
parser.add_argument('--train-vision-tower', action=argparse.BooleanOptionalAction, default=True, help="False freezes the MLLM's vision tower too")
parser.add_argument('--max-steps', type=int, default=None, help="stop after this many steps (0: all epochs); None: the preset's (toy: 120)")
parser.add_argument('--eval-every', type=int, default=None, help="None: the preset's")
parser.add_argument('--eval-samples', type=int, default=None, help="None: the preset's")
parser.add_argument('--checkpoint-every', type=int, default=None, help="None: the preset's")
parser.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False, help='continue from the newest checkpoint in output_dir')
parser.add_argument('--cpu', action=argparse.BooleanOptionalAction, default=False, help='force CPU')
args = parser.parse_args()
preset = args.preset
data_root = args.data_root
init = args.init
output_dir = args.output_dir
epochs = args.epochs
batch_size = args.batch_size
group_size = args.group_size
lr = args.lr
mllm_lr = args.mllm_lr
sam_lr = args.sam_lr
beta = args.beta
alpha = args.alpha
square_iou = args.square_iou
aggregation = args.aggregation
std = args.std
train_vision_tower = args.train_vision_tower
max_steps = args.max_steps
eval_every = args.eval_every
eval_samples = args.eval_samples
checkpoint_every = args.checkpoint_every
resume = args.resume
cpu = args.cpu

# --- notebook cell 3 ---
import torch

from lenslib.align import aligned_model
from lenslib.evaluate import evaluate
from lenslib.presets import get_preset, train_val_data
from lenslib.rl import GRPOConfig, train_grpo
from lenslib.training import make_accelerator, save_model, take

torch.manual_seed(0)
accelerator = make_accelerator(cpu=cpu)
config = get_preset(
    preset, data_root=data_root, rl_epochs=epochs, rl_batch_size=batch_size, group_size=group_size,
    rl_lr=lr, rl_mllm_lr=mllm_lr, rl_sam_lr=sam_lr, beta=beta, alpha=alpha, eval_every=eval_every,
    eval_samples=eval_samples, checkpoint_every=checkpoint_every, rl_max_steps=max_steps,
)
model = aligned_model(config, init, accelerator)
train, val = train_val_data(config)
rl_cfg = GRPOConfig.from_preset(
    config, square_iou=square_iou, std=std, aggregation=aggregation,
    train_vision_tower=train_vision_tower, eval_every=config.eval_every,
    eval_samples=config.eval_samples, checkpoint_every=config.checkpoint_every,
    output_dir=output_dir,
)
print({k: getattr(rl_cfg, k) for k in ("lr", "mllm_lr", "sam_lr", "batch_size", "group_size", "max_steps")})

# --- notebook cell 13 ---
# NBVAL_IGNORE_OUTPUT
before = evaluate(model, take(val, config.eval_samples), max_new_tokens=config.max_completion_length, accelerator=accelerator)
accelerator.print("after stage 1:", {k: round(v, 3) for k, v in before.items()})
history = train_grpo(model, train, val, rl_cfg, accelerator, resume=resume)
save_model(model, f"{output_dir}/final", accelerator)  # every process: ZeRO-3 gathers the shards
final = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")}
accelerator.print("after stage 2:", {k: round(v, 3) for k, v in final.items()})
