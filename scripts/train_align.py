"""Stage 1 of LENS, pretraining alignment (paper eq. 5, Table A1): train the context queries and the connector between a frozen MLLM and a frozen SAM2.

Exported from notebooks/03_alignment_training.ipynb by `python -m lenslib.export`: edit the notebook,
not this file (tests/test_export.py fails when the two disagree).

Launch: accelerate launch --config_file configs/accelerate/zero2.yaml scripts/train_align.py --preset full --data-root data --output-dir runs/align [--resume]
"""

import argparse

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--preset', type=str, default='toy', choices=['toy', 'full'], help='model and data scale (choices: toy, full)')
parser.add_argument('--data-root', type=str, default=None, help='full scale: the folder holding refer_seg/ (LISA layout)')
parser.add_argument('--mllm', type=str, default=None, help="full scale: Qwen2.5-VL path or hub id; None: the preset's")
parser.add_argument('--sam-checkpoint', type=str, default=None, help="full scale: SAM2 checkpoint file; None: the preset's")
parser.add_argument('--output-dir', type=str, default='runs/toy/align', help='checkpoints and the aligned model (output_dir/final)')
parser.add_argument('--epochs', type=int, default=None, help="None: the preset's value (Table A1: 25)")
parser.add_argument('--batch-size', type=int, default=None, help="global batch size; None: the preset's (Table A1: 128)")
parser.add_argument('--lr', type=float, default=None, help="None: the preset's (Table A1: 3e-5)")
parser.add_argument('--num-queries', type=int, default=None, help="M (Table 3); None: the preset's (toy 16, full 64)")
parser.add_argument('--connector-kind', type=str, default=None, help='"vit" (paper) or "mlp" (Table 4); None: the preset\'s')
parser.add_argument('--loss-kind', type=str, default='bce', choices=['bce', 'focal'], help='pixel loss next to dice: "bce" (authors) or "focal" (choices: bce, focal)')
parser.add_argument('--max-steps', type=int, default=0, help='stop early after this many steps (0: run all epochs)')
parser.add_argument('--eval-every', type=int, default=None, help="steps between validation runs; None: the preset's")
parser.add_argument('--eval-samples', type=int, default=None, help="validation samples per run; None: the preset's")
parser.add_argument('--checkpoint-every', type=int, default=None, help="steps between checkpoints (0: none); None: the preset's")
parser.add_argument('--resume', action=argparse.BooleanOptionalAction, default=False, help='continue from the newest checkpoint in output_dir')
parser.add_argument('--cpu', action=argparse.BooleanOptionalAction, default=False, help='force CPU (also for two CPU processes under accelerate launch)')
args = parser.parse_args()
preset = args.preset
data_root = args.data_root
mllm = args.mllm
sam_checkpoint = args.sam_checkpoint
output_dir = args.output_dir
epochs = args.epochs
batch_size = args.batch_size
lr = args.lr
num_queries = args.num_queries
connector_kind = args.connector_kind
loss_kind = args.loss_kind
max_steps = args.max_steps
eval_every = args.eval_every
eval_samples = args.eval_samples
checkpoint_every = args.checkpoint_every
resume = args.resume
cpu = args.cpu

# --- notebook cell 3 ---
import torch

from lenslib.align import AlignConfig, save_aligned, teacher_forced_metrics, train_alignment
from lenslib.evaluate import evaluate
from lenslib.presets import build_lens, get_preset, train_val_data
from lenslib.training import make_accelerator, take

torch.manual_seed(0)
accelerator = make_accelerator(cpu=cpu)
config = get_preset(
    preset, data_root=data_root, mllm=mllm, sam_checkpoint=sam_checkpoint, num_queries=num_queries, connector_kind=connector_kind,
    align_epochs=epochs, align_batch_size=batch_size, align_lr=lr, eval_every=eval_every,
    eval_samples=eval_samples, checkpoint_every=checkpoint_every,
)
model = build_lens(config, device=accelerator.device)
train, val = train_val_data(config)
accelerator.print(f"{config.name}: {len(train)} training samples, {len(val)} validation samples")

# --- notebook cell 11 ---
# NBVAL_IGNORE_OUTPUT
untrained = evaluate(model, take(val, config.eval_samples), max_new_tokens=config.max_completion_length, accelerator=accelerator)
tf_untrained = teacher_forced_metrics(model, take(val, config.eval_samples), accelerator=accelerator)
accelerator.print("untrained context module, greedy:", {k: round(v, 3) for k, v in untrained.items()})
accelerator.print("untrained context module, teacher forced:", {k: round(v, 3) for k, v in tf_untrained.items()})

# --- notebook cell 13 ---
# NBVAL_IGNORE_OUTPUT
align_cfg = AlignConfig(
    epochs=config.align_epochs, batch_size=config.align_batch_size, lr=config.align_lr,
    scheduler=config.align_scheduler, seed=config.seed, loss_kind=loss_kind,
    eval_every=config.eval_every, eval_samples=config.eval_samples,
    max_new_tokens=config.max_completion_length, checkpoint_every=config.checkpoint_every,
    output_dir=output_dir, max_steps=max_steps or None,
)
history = train_alignment(model, train, val, align_cfg, accelerator, resume=resume)
save_aligned(model, f"{output_dir}/final", accelerator)
final = {k[4:]: v for k, v in history[-1].items() if k.startswith("val_")}
tf_final = teacher_forced_metrics(model, take(val, config.eval_samples), accelerator=accelerator)
accelerator.print("after stage 1, greedy:", {k: round(v, 3) for k, v in final.items()})
accelerator.print("after stage 1, teacher forced:", {k: round(v, 3) for k, v in tf_final.items()})
