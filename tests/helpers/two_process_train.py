"""Run by tests/test_training.py under `accelerate launch` with 2 CPU processes (gloo):
both stages for two steps, then each rank writes what the test compares."""

import json
import sys

import torch

from lenslib.align import AlignConfig, train_alignment
from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.rl import GRPOConfig, grpo_step, train_grpo
from lenslib.training import make_accelerator

out_dir = sys.argv[1]
accelerator = make_accelerator(cpu=True)
preset = get_preset("toy", num_queries=4)
model = build_lens(preset, pretrained=False)
train, val = toy_split(preset, "train", 16), toy_split(preset, "val", 2)

# record what grpo_step saw: this rank's rewards and advantages
seen = []
original = grpo_step.__globals__["grpo"].group_advantages


def spy(rewards, group_size, **kw):
    adv = original(rewards, group_size, **kw)
    seen.append({"gathered": rewards.tolist(), "advantages": adv.tolist()})
    return adv


grpo_step.__globals__["grpo"].group_advantages = spy
common = dict(epochs=1, eval_samples=2, max_new_tokens=6, output_dir=f"{out_dir}/ckpt")
train_alignment(
    model, train, val, AlignConfig(batch_size=4, lr=1e-3, max_steps=2, **common), accelerator
)
rl_cfg = GRPOConfig(
    batch_size=2, group_size=2, lr=1e-4, max_steps=2, scale_rewards="batch", **common
)
train_grpo(model, train, val, rl_cfg, accelerator)

lens = accelerator.unwrap_model(model)
digest = float(sum((p.double() * (i + 1)).sum() for i, p in enumerate(lens.parameters())))
record = {"rank": accelerator.process_index, "world": accelerator.num_processes, "digest": digest}
record["grpo"] = seen
with open(f"{out_dir}/rank{accelerator.process_index}.json", "w") as f:
    json.dump(record, f)
torch.distributed.barrier() if accelerator.num_processes > 1 else None
