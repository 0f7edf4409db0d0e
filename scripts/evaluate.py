"""Evaluate a trained LENS model on named splits (LISA gIoU / cIoU, box IoU, format rate) and write metrics.json and metrics.md.

Exported from notebooks/05_visualization.ipynb by `python -m lenslib.export`: edit the notebook,
not this file (tests/test_export.py fails when the two disagree).

Launch: accelerate launch --config_file configs/accelerate/ddp.yaml scripts/evaluate.py --preset full --model-dir runs/rl/final --data-root data --splits refcoco:val refcoco:testA refcoco:testB
"""

import argparse

from lenslib.presets import add_setting_flags
from lenslib.settings import changed

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--preset', type=str, default='toy', choices=['toy', 'full'], help='data scale (choices: toy, full)')
parser.add_argument('--model-dir', type=str, default='runs/toy/rl/final', help='a trained LENS model folder (notebook 04 / scripts/train_rl.py)')
parser.add_argument('--splits', nargs="+", type=str, default=['toy:val', 'toy:testA', 'toy:testB'], help='split specs: toy:val, refcoco:testA, reasonseg:val@100, groundingsuite:FILE.jsonl')
parser.add_argument('--batch-size', type=int, default=16, help='prompts per generate call')
parser.add_argument('--max-new-tokens', type=int, default=None, help="answer length limit; None: the preset's")
parser.add_argument('--output-dir', type=str, default='runs/toy/eval', help='where metrics.json and metrics.md go')
parser.add_argument('--cpu', action=argparse.BooleanOptionalAction, default=False, help='force CPU')
setting_names = add_setting_flags(parser, None)
args = parser.parse_args()
preset = args.preset
model_dir = args.model_dir
splits = args.splits
settings = changed(args, setting_names)
batch_size = args.batch_size
max_new_tokens = args.max_new_tokens
output_dir = args.output_dir
cpu = args.cpu

# --- notebook cell 4 ---
# NBVAL_IGNORE_OUTPUT
from lenslib.evaluate import markdown_table, write_reports
from lenslib.predict import load_model
from lenslib.presets import get_preset
from lenslib.splits import evaluate_splits
from lenslib.training import make_accelerator

accelerator = make_accelerator(cpu=cpu)
config = get_preset(preset, **settings)
model = load_model(model_dir, device=accelerator.device)  # a clear error if the folder is wrong
results = evaluate_splits(model, splits, config, batch_size, max_new_tokens, accelerator)
if accelerator.is_main_process:
    meta = {"model": model_dir, "preset": preset, "decoding": "greedy"}
    json_path, md_path = write_reports(results, output_dir, meta)
    print(markdown_table(results))
    print(f"reports: {json_path}, {md_path}")
