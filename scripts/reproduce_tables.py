"""The paper's ablations in miniature: Table 3 (query count), Table 4 (connector), Table 5 (components) and a Seg-Zero-style baseline, trained and scored on the toy world, beside the paper's numbers; and the world-v2 experiments over seeds (Seg-Zero-style vs LENS on val and ambiguous, the misguided box, + R_seg, stage 2 against a same-compute control).

Exported from notebooks/06_reproducing_the_tables.ipynb by `python -m lenslib.export`: edit the notebook,
not this file (tests/test_export.py fails when the two disagree).

Launch: python scripts/reproduce_tables.py --preset toy --output-dir runs/toy/tables --experiments fidelity --seeds 0
"""

import argparse

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--preset', type=str, default='toy', choices=['toy', 'full'], help='model and data scale (choices: toy, full)')
parser.add_argument('--output-dir', type=str, default='runs/toy/tables', help='tables.json and tables.md; fidelity/ for the world-v2 experiments')
parser.add_argument('--experiments', nargs="+", type=str, default=['tables', 'fidelity'], choices=['tables', 'fidelity'], help='what to run (choices: tables, fidelity)')
parser.add_argument('--align-steps', type=int, default=256, help='stage-1 steps of every row')
parser.add_argument('--rl-steps', type=int, default=40, help='stage-2 steps of every Table 5 row')
parser.add_argument('--eval-samples', type=int, default=256, help='testA samples each row is scored on')
parser.add_argument('--query-counts', nargs="+", type=int, default=[1, 16, 32, 64, 128], help="Table 3's M values")
parser.add_argument('--seeds', nargs="+", type=int, default=[0, 1, 2], help='one run per seed (a fresh world draw and context-module init) of every table row and of the fidelity experiments')
parser.add_argument('--fidelity-samples', type=int, default=256, help='fidelity experiments: samples per split (val, ambiguous)')
parser.add_argument('--fidelity-stage2', action=argparse.BooleanOptionalAction, default=True, help='fidelity experiments: also stage 2, its control and the misguided box (False: stage 1 only)')
parser.add_argument('--train-rows', action=argparse.BooleanOptionalAction, default=True, help='train every row; False: read the committed results (lenslib/assets/tables)')
parser.add_argument('--cpu', action=argparse.BooleanOptionalAction, default=False, help='force CPU')
args = parser.parse_args()
preset = args.preset
output_dir = args.output_dir
experiments = args.experiments
align_steps = args.align_steps
rl_steps = args.rl_steps
eval_samples = args.eval_samples
query_counts = args.query_counts
seeds = args.seeds
fidelity_samples = args.fidelity_samples
fidelity_stage2 = args.fidelity_stage2
train_rows = args.train_rows
cpu = args.cpu

# --- notebook cell 4 ---
from pathlib import Path

from lenslib import fidelity, tables
from lenslib.presets import get_preset
from lenslib.training import make_accelerator

accelerator = make_accelerator(cpu=cpu)
config = get_preset(preset)
table_cfg = tables.TableConfig(align_steps=align_steps, rl_steps=rl_steps, eval_samples=eval_samples,
                               query_counts=tuple(query_counts), seeds=tuple(seeds))
fidelity_cfg = fidelity.FidelityConfig(seeds=tuple(seeds), samples=fidelity_samples, stage2=fidelity_stage2)
results, fid = None, None
if "tables" in experiments:
    if train_rows:
        results = tables.run_tables(config, table_cfg, output_dir, accelerator)
    else:
        results = tables.load_results(tables.COMMITTED_RESULTS)
    accelerator.print(tables.markdown(results))
if "fidelity" in experiments:
    if train_rows:
        fid = fidelity.run_fidelity(config, fidelity_cfg, Path(output_dir) / "fidelity", accelerator)
    else:
        fid = fidelity.load_fidelity(fidelity.COMMITTED_FIDELITY)
    accelerator.print(fidelity.summary(fid))
