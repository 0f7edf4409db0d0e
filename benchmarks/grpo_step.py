"""Stage 2 at toy scale: seconds per GRPO step and their split, and peak memory.

    .venv/bin/python benchmarks/grpo_step.py [--steps 10] [--prompts 4] [--group-size 8] [--pretrained]
        [--threads 1] [--rollout-micro-batch 8] [--gradient-checkpointing] [--token-chunk 4096]
        [--share-prompt]

Each step logs its generation / scoring (one forward per rollout + rewards) / update times
(`lenslib.rl.grpo_step` measures them). Generation is ONE batched call for all prompts x G.
The memory options (rollout micro-batches, gradient checkpointing, the size of the pieces of
`grpo.token_logprobs`) change only memory and time: run once per option to see the time.
So does `--share-prompt` (each prompt computed once per group; `trl_side_by_side.py` times it
against the plain step and TRL in one run).
"""

import argparse
import platform
import resource
import time

import torch

from lenslib import grpo
from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.rl import GRPOConfig, frozen_reference, grpo_step
from lenslib.training import make_accelerator, make_scheduler, set_gradient_checkpointing


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--pretrained", action="store_true", help="use the committed toy bases")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (None: torch's)")
    parser.add_argument(
        "--rollout-micro-batch", type=int, default=None, help="GRPOConfig.rollout_micro_batch"
    )
    parser.add_argument(
        "--gradient-checkpointing", action="store_true", help="LoopConfig.gradient_checkpointing"
    )
    parser.add_argument(
        "--token-chunk", type=int, default=grpo.TOKEN_CHUNK, help="positions per log-prob piece"
    )
    parser.add_argument("--share-prompt", action="store_true", help="GRPOConfig.share_prompt")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    grpo.TOKEN_CHUNK = args.token_chunk
    torch.manual_seed(0)
    preset = get_preset("toy")
    model = build_lens(preset, pretrained=args.pretrained)
    cfg = GRPOConfig(
        group_size=args.group_size, max_new_tokens=preset.max_completion_length,
        rollout_micro_batch=args.rollout_micro_batch, share_prompt=args.share_prompt,
    )  # fmt: skip
    ref = frozen_reference(model)
    model.set_stage("rl")
    model.train()
    set_gradient_checkpointing(model, args.gradient_checkpointing)
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
    options = f"micro-batch {args.rollout_micro_batch}, checkpointing "
    options += f"{'on' if args.gradient_checkpointing else 'off'}, token chunk {args.token_chunk}"
    options += f", shared prompt {'on' if args.share_prompt else 'off'}"
    print(f"{args.prompts} prompts x G={args.group_size} ({options}): {mean['total']:.2f} s/step")
    for key in ("time_generate", "time_score", "time_update"):
        print(f"  {key[5:]:9s} {mean[key]:.2f} s ({100 * mean[key] / mean['total']:.0f}%)")
    print(f"  mean completion length {mean['completion_length']:.1f} tokens")
    print(
        f"peak resident memory {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    main()
