"""Stage 2 at toy scale: seconds per GRPO step and their split, and peak memory.

    .venv/bin/python benchmarks/grpo_step.py [--steps 10] [--prompts 4] [--group-size 8] [--pretrained]

Each step logs its generation / scoring (one forward per rollout + rewards) / update times
(`lenslib.rl.grpo_step` measures them). Generation is ONE batched call for all prompts x G.
"""

import argparse
import platform
import resource
import time

import torch

from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.rl import GRPOConfig, frozen_reference, grpo_step
from lenslib.training import make_accelerator, make_scheduler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--pretrained", action="store_true", help="use the committed toy bases")
    args = parser.parse_args()
    torch.manual_seed(0)
    preset = get_preset("toy")
    model = build_lens(preset, pretrained=args.pretrained)
    cfg = GRPOConfig(group_size=args.group_size, max_new_tokens=preset.max_completion_length)
    ref = frozen_reference(model)
    model.set_stage("rl")
    accelerator = make_accelerator(cpu=True)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    scheduler = make_scheduler("linear", optimizer, args.steps)
    train = toy_split(preset, "train", args.steps * args.prompts)
    records = []
    for s in range(args.steps):
        batch = [train[i] for i in range(s * args.prompts, (s + 1) * args.prompts)]
        start = time.perf_counter()
        record = grpo_step(model, ref, batch, accelerator, optimizer, scheduler, cfg)
        record["total"] = time.perf_counter() - start
        records.append(record)
    steady = records[1:] or records  # the first step warms up
    mean = {k: sum(r[k] for r in steady) / len(steady) for k in ("total", "time_generate",
            "time_score", "time_update", "completion_length")}  # fmt: skip
    print(f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    print(f"{args.prompts} prompts x G={args.group_size}: {mean['total']:.2f} s/step")
    for key in ("time_generate", "time_score", "time_update"):
        print(f"  {key[5:]:9s} {mean[key]:.2f} s ({100 * mean[key] / mean['total']:.0f}%)")
    print(f"  mean completion length {mean['completion_length']:.1f} tokens")
    print(
        f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
