"""What can GRPO learn from? Right-name vs wrong-name answers in the rollout groups.

    .venv/bin/python benchmarks/reward_gaps.py [--init runs/toy/align/final] \
        [--splits val ambiguous] [--samples 48] [--seed 0] [--threads 1]

Loads a toy LENS model (stage 1 or 2; made with the toy preset first if `--init` holds none)
and, per split, samples G answers per prompt with stage 2's rollout settings
(`lenslib.fidelity.reward_gaps`). Prints the share of greedy answers whose rationale names the
target, of sampled answers, of prompts where at least one of the G does (pass@G), of groups
holding both kinds, and, over those mixed groups, how much more R_box and R_seg pay the
answers that name the target. A small greedy share with a large pass@G says the right answer
is there to be reinforced; a small gap says the reward hardly tells it apart.
"""

import argparse
import json
import platform
import time

import torch

from lenslib.fidelity import reward_gaps
from lenslib.pipeline import aligned_model
from lenslib.presets import get_preset, toy_split
from lenslib.training import make_accelerator, take


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--init", default="runs/toy/align/final")
    parser.add_argument("--splits", nargs="+", default=["val", "ambiguous"])
    parser.add_argument("--samples", type=int, default=48, help="prompts per split")
    parser.add_argument(
        "--seed", type=int, default=0, help="the toy world (init_seed) and sampling"
    )
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset("toy").override(init_seed=args.seed)
    model = aligned_model(preset, args.init, make_accelerator(cpu=True))
    model.eval()
    start = time.perf_counter()
    for split in args.splits:
        torch.manual_seed(args.seed)
        samples = take(toy_split(preset, split, args.samples), args.samples)
        gaps = reward_gaps(model, samples, preset)
        print(split, json.dumps({k: round(v, 3) for k, v in gaps.items()}), flush=True)
    minutes = (time.perf_counter() - start) / 60
    where = f"{args.threads} thread(s), {platform.processor() or platform.machine()}"
    print(
        f"G = {preset.rl.group_size}, {args.samples} prompts per split, {minutes:.1f} min on {where}"
    )


if __name__ == "__main__":
    main()
