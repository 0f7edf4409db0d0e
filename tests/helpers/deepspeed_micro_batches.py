"""Run by tests/test_memory_options.py under `accelerate launch` with a DeepSpeed config and
2 CPU processes (DS_ACCELERATOR=cpu): one stage-2 step from the same start, all rollouts in one
pass or one rollout per micro-batch; each rank writes how far each run moved the parameters.
A DeepSpeed engine that stepped after every micro-batch would move them about twice as far.

AdamW's first step is lr * g / (|g| + eps): about lr * sign(g), which hides a wrong gradient, so
here eps = lr = 1000 and no weight decay make the step the (clipped) gradient itself."""

import json
import sys

import torch

from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.rl import GRPOConfig, train_grpo
from lenslib.sharding import zero3_gathered
from lenslib.training import make_accelerator

out_dir = sys.argv[1]
import deepspeed  # noqa: E402,F401  (it subclasses torch's AdamW on import: before the swap)


class LinearAdamW(torch.optim.AdamW):
    def __init__(self, params, lr=1e-3, **kwargs):
        super().__init__(params, lr=lr, eps=1000.0, weight_decay=0.0)


torch.optim.AdamW = LinearAdamW  # what lenslib.rl.train_grpo builds
preset = get_preset("toy", num_queries=4)
train, val = toy_split(preset, "train", 4), toy_split(preset, "val", 1)


def flat(model):
    with zero3_gathered(list(model.parameters())):
        return torch.cat([p.detach().float().flatten().clone() for p in model.parameters()])


deltas = {}
for micro in (None, 1):
    torch.manual_seed(0)
    model = build_lens(preset, pretrained=False)
    before = flat(model).to(torch.bfloat16).float()  # DeepSpeed bf16 starts from bf16 weights
    cfg = GRPOConfig(epochs=1, batch_size=4, group_size=2, lr=1000.0, max_new_tokens=6, beta=0.0,
                     max_steps=1, eval_at_end=False, output_dir=f"{out_dir}/run_{micro}",
                     rollout_micro_batch=micro)  # fmt: skip
    torch.manual_seed(1)
    accelerator = make_accelerator(cpu=True)  # one per engine: accelerate ties it to the first
    train_grpo(model, train, val, cfg, accelerator)
    deltas[str(micro)] = flat(model) - before

whole, split = deltas["None"], deltas["1"]
record = {
    "rank": accelerator.process_index,
    "whole_norm": whole.norm().item(),
    "split_norm": split.norm().item(),
    "relative_difference": ((split - whole).norm() / whole.norm()).item(),
}
with open(f"{out_dir}/rank{accelerator.process_index}.json", "w") as f:
    json.dump(record, f)
torch.distributed.barrier() if accelerator.num_processes > 1 else None
