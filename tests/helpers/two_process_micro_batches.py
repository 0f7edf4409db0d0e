"""Run by tests/test_memory_options.py under `accelerate launch` with 2 CPU processes (gloo, DDP):
one GRPO step's gradient, all rollouts in one pass or in micro-batches (DDP synchronises only on
the last one), written by each rank for the test to compare."""

import json
import sys

import torch

from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.rl import GRPOConfig, frozen_reference, grpo_step
from lenslib.training import make_accelerator

out_dir = sys.argv[1]
accelerator = make_accelerator(cpu=True)
preset = get_preset("toy", num_queries=4)
torch.manual_seed(0)
lens = build_lens(preset)  # the committed toy bases: real answers, so advantages are not all 0
ref = frozen_reference(lens)
with torch.no_grad():  # a reference unlike the policy: the KL term has a gradient too
    for p in ref.parameters():
        p.add_(0.02 * torch.randn_like(p))
lens.set_stage("rl")
model = accelerator.prepare(lens)
model.train()
train = toy_split(preset, "train", 4)
samples = [train[2 * accelerator.process_index + i] for i in range(2)]  # 2 prompts per rank


class Recorder:
    """Stands in for the optimizer: keeps the (synchronised) gradients, changes nothing."""

    def __init__(self):
        self.params = [p for p in lens.parameters() if p.requires_grad]
        self.grads = None

    def step(self):
        self.grads = [
            torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in self.params
        ]

    def zero_grad(self, set_to_none=True):
        for p in self.params:
            p.grad = None


class NoSchedule:
    def step(self):
        pass


grads = {}
for micro in (None, 4):  # 6 rollouts per rank: micro-batches of 4 cut the groups of 3
    cfg = GRPOConfig(
        group_size=3,
        max_new_tokens=48,
        output_dir="unused",
        reward_weights=(1.0, 1.0, 0.0),
        rollout_micro_batch=micro,
    )
    recorder = Recorder()
    torch.manual_seed(100 + accelerator.process_index)
    grpo_step(model, ref, samples, accelerator, recorder, NoSchedule(), cfg)
    grads[str(micro)] = torch.cat([g.flatten() for g in recorder.grads])

whole, split = grads["None"], grads["4"]
record = {
    "rank": accelerator.process_index,
    "world": accelerator.num_processes,
    "relative_difference": ((split - whole).norm() / whole.norm()).item(),
    "max_difference": ((split - whole).abs().max() / whole.abs().max()).item(),
    "digest": float((whole.double() * torch.arange(len(whole), dtype=torch.float64)).sum()),
    "norm": whole.norm().item(),
}
with open(f"{out_dir}/rank{accelerator.process_index}.json", "w") as f:
    json.dump(record, f)
torch.distributed.barrier() if accelerator.num_processes > 1 else None
