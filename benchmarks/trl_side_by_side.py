"""Stage 2 side by side: seconds per GRPO step of TRL's GRPOTrainer and of lenslib's grpo_step.

    .venv/bin/python benchmarks/trl_side_by_side.py [--steps 6] [--warmup 1] [--prompts 4]
        [--group-size 8] [--threads 2]

Three trainers start from the committed toy bases (`lenslib.toy.load_bases`, world v1) and take
turns, one step each, in ONE process, so that the load of the machine hits all three alike:

    TRL       GRPOTrainer (trl 1.16) training the toy MLLM alone, reward = box IoU
    plain     lenslib's `grpo_step` (MLLM + context queries + connector + SAM's decoder)
    shared    the same with `share_prompt` (each prompt computed once per group)

All use the same prompts of the toy world (the same `--prompts` every step), G rollouts each,
and the toy preset's stage-2 settings: sampling (temperature, top_p, top_k), the completion cap,
beta, the GRPO loss ("grpo"), the MLLM's lr. TRL's step is timed from its `on_step_begin` to its
`on_step_end` callback (generation, reference and policy log-probs, loss, backward, optimizer
step); a lenslib step is the `grpo_step` call. The first `--warmup` steps of each are left out;
the script prints each one's timed steps, their mean and median (the median resists a step that
another process on the machine slowed down), the ratios to TRL and the load average.
lenslib does more per step than TRL (the context queries, the connector and SAM's decoder, the
masks and R_seg): the ratio is the price of LENS's segmentation plus whatever either wastes.
"""

import argparse
import dataclasses
import os
import platform
import statistics
import time

import torch
from PIL import Image
from transformers import TrainerCallback

from lenslib.answers import parse_answer
from lenslib.model import mllm_image_size, to_original_frame
from lenslib.presets import build_lens, get_preset, toy_split
from lenslib.prompts import chat_messages
from lenslib.rewards import box_reward
from lenslib.rl import frozen_reference, grpo_step, parameter_groups
from lenslib.toy import load_bases
from lenslib.training import make_accelerator, make_scheduler


def box_iou_reward(processor):
    """TRL reward function: R_box (eq. 11) of each completion, its box parsed in the MLLM's
    frame and brought back to the image's, as lenslib scores it."""

    def reward(completions, box, size, **kwargs):
        scores = []
        for completion, target, (height, width) in zip(completions, box, size):
            text = completion[0]["content"] if isinstance(completion, list) else completion
            seen = mllm_image_size(processor, height, width)
            pred = parse_answer(text, image_size=(seen[1], seen[0])).box
            pred = None if pred is None else to_original_frame(pred, seen, (height, width))
            scores.append(box_reward(pred, target))
        return scores

    reward.__name__ = "box_iou"
    return reward


class Turns(TrainerCallback):
    """Times each TRL step, then lets lenslib's trainers take their step before TRL's next."""

    def __init__(self, others):
        self.others, self.times, self.lengths, self.start = others, [], [], 0.0
        self.trainer = None  # set once the trainer exists, to read its completion lengths

    def on_step_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter() - self.start)
        self.lengths.append(self.trainer._metrics["train"]["completions/mean_length"][-1])
        order = self.others if state.global_step % 2 else self.others[::-1]  # alternate
        for step in order:
            step()


def trl_trainer(samples, preset, args, callback):
    """GRPOTrainer on the toy MLLM with lenslib's toy stage-2 settings."""
    from datasets import Dataset
    from trl import GRPOConfig as TRLConfig
    from trl import GRPOTrainer

    rl = preset.rl
    mllm, processor, _ = load_bases()
    dataset = Dataset.from_list([
        {"prompt": chat_messages(s.text), "image": Image.fromarray(s.image), "box": s.box,
         "size": s.image.shape[:2]}
        for s in samples
    ])  # fmt: skip
    config = TRLConfig(
        output_dir="/tmp/trl_side_by_side", use_cpu=True, bf16=False, report_to="none",
        logging_strategy="no", save_strategy="no", max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.prompts * args.group_size,
        num_generations=args.group_size, max_completion_length=rl.max_new_tokens,
        temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k, beta=rl.beta,
        loss_type=rl.aggregation, scale_rewards=rl.scale_rewards, epsilon=rl.eps_low,
        learning_rate=rl.mllm_lr or rl.lr, lr_scheduler_type=rl.scheduler, use_vllm=False,
        gradient_checkpointing=rl.gradient_checkpointing,  # (TRL's default: on; the toy's: off)
        disable_tqdm=True, dataloader_num_workers=0, seed=0,
    )  # fmt: skip
    return GRPOTrainer(
        model=mllm, reward_funcs=box_iou_reward(processor), args=config,
        train_dataset=dataset, processing_class=processor, callbacks=[callback],
    )  # fmt: skip


def lenslib_trainer(samples, preset, args, share: bool):
    """A closure that takes one `grpo_step` (and records its time) on its own LensModel."""
    cfg = dataclasses.replace(preset.rl, group_size=args.group_size, share_prompt=share)
    torch.manual_seed(0)
    model = build_lens(preset)
    ref = frozen_reference(model)
    model.set_stage("rl")
    model.train()
    accelerator = make_accelerator(cpu=True)
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr)
    scheduler = make_scheduler(cfg.scheduler, optimizer, args.warmup + args.steps)
    batch = [samples[i] for i in range(args.prompts)]
    times, lengths = [], []

    def step():
        start = time.perf_counter()
        record = grpo_step(model, ref, batch, accelerator, optimizer, scheduler, cfg)
        times.append(time.perf_counter() - start)
        lengths.append(record["completion_length"])

    return step, times, lengths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps of each trainer")
    parser.add_argument("--warmup", type=int, default=1, help="first steps left out of the mean")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    preset = get_preset("toy")
    samples = [toy_split(preset, "train", args.prompts)[i] for i in range(args.prompts)]

    plain_step, plain_times, plain_lengths = lenslib_trainer(samples, preset, args, share=False)
    shared_step, shared_times, shared_lengths = lenslib_trainer(samples, preset, args, share=True)
    turns = Turns([plain_step, shared_step])
    trainer = trl_trainer(samples, preset, args, turns)
    turns.trainer = trainer
    load_before = os.getloadavg()
    trainer.train()
    load_after = os.getloadavg()

    def summary(times):  # mean, median, std of the timed steps
        kept = times[args.warmup :]
        spread = statistics.stdev(kept) if len(kept) > 1 else 0.0
        return statistics.mean(kept), statistics.median(kept), spread

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"load average (1, 5, 15 min) before {load_before}, after {load_after}")
    print(f"{args.prompts} prompts x G={args.group_size}, completions <= "
          f"{preset.rl.max_new_tokens} tokens, {args.steps} timed steps after {args.warmup} "
          "warm-up, interleaved")  # fmt: skip
    times = {"TRL GRPOTrainer": turns.times, "lenslib plain": plain_times,
             "lenslib shared prompt": shared_times}  # fmt: skip
    rows = {name: summary(t) for name, t in times.items()}
    for name, (mean, median, spread) in rows.items():
        steps = " ".join(f"{t:.2f}" for t in times[name][args.warmup :])
        print(f"  {name:22s} mean {mean:6.2f} s/step, median {median:6.2f} (std {spread:.2f}): "
              f"{steps}")  # fmt: skip
    trl, plain, shared = rows.values()  # (mean, median, std) each
    print("  ratios of the means (medians)")
    for name, a, b in (("plain / TRL", plain, trl), ("shared / TRL", shared, trl),
                       ("shared / plain", shared, plain)):  # fmt: skip
        print(f"    {name:15s} {a[0] / b[0]:.2f} ({a[1] / b[1]:.2f})")
    lengths = [statistics.mean(x[args.warmup :]) for x in (turns.lengths, plain_lengths,
               shared_lengths)]  # fmt: skip
    print(f"  mean completion length: TRL {lengths[0]:.1f}, plain {lengths[1]:.1f}, "
          f"shared {lengths[2]:.1f} tokens")  # fmt: skip
    print(f"  TRL gradient checkpointing: {trainer.model.is_gradient_checkpointing}")


if __name__ == "__main__":
    main()
