"""Stage 2, GRPO with unified rewards (paper eqs. 6-12, Table A2).

Everything learns except SAM's image encoder. For each prompt the policy samples G answers; each
answer is scored by the unified reward (eq. 11); advantages compare the G answers of a prompt
(eqs. 6-7); the clipped surrogate with a KL penalty to the frozen stage-1 model (eqs. 8-10) is
combined with the segmentation loss (eq. 12):

    J_LENS = J_GRPO(R_unified, D_KL) + alpha * L_seg(P_seg, M_gt)             (eq. 12)

`grpo_step` is one optimiser step, top to bottom:

    1. rollouts     G sampled answers per prompt, ONE batched generate call   (eq. 1)
    2. forward      ONE forward per rollout gives its token log-probs AND its mask (eqs. 2-4)
    3. rewards      R_format, R_box, R_seg -> R_unified                       (eq. 11)
    4. advantages   rewards gathered over all processes, grouped by prompt    (eqs. 6-7)
    5. reference    log-probs of the same tokens under the frozen model      (eq. 9)
    6. loss         GRPO loss + alpha * L_seg, backward, step                 (eqs. 8-10, 12)

With one update per batch of rollouts (as here and in the paper), the "old" policy equals the
current one, so the ratio is exactly 1 and clipping never bites; `grpo_loss` still computes
the full eq. 8 so that the same code serves several updates per batch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from lenslib import grpo
from lenslib.data.sample import SegSample
from lenslib.mllm import append_completions, build_inputs, repeat_batch
from lenslib.model import LensModel, zero3_gathered
from lenslib.rewards import RewardWeights, box_reward, format_reward, seg_reward, unified_reward
from lenslib.training import (
    deepspeed_precision,
    make_scheduler,
    mean_seg_loss,
    run_stage,
    run_steps,
    target_masks,
)


@dataclass
class GRPOConfig:
    """Stage-2 hyperparameters (Table A2 values in the "full" preset)."""

    epochs: int = 16
    batch_size: int = 64  # prompts per step, global over all processes (x G rollouts)
    group_size: int = 8  # G
    lr: float = 3e-6
    mllm_lr: float | None = None  # the MLLM's own lr (None: `lr`, one lr for all, as the paper)
    sam_lr: float | None = None  # SAM's prompt encoder + mask decoder lr (None: `lr`)
    scheduler: str = "linear"
    seed: int = 42
    beta: float = 0.04  # KL weight (eq. 10); 0 skips the reference model
    alpha: float = 1.0  # segmentation-loss weight (eq. 12)
    reward_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)  # lambda_1..3 (eq. 11)
    square_iou: bool = False  # the authors square R_box and R_seg
    eps_low: float = 0.2
    eps_high: float = 0.2
    std: str = "population"  # eq. 6; "bessel" = TRL / authors
    scale_rewards: str = "group"
    aggregation: str = "grpo"  # eq. 10; or "bnpo", "dr_grpo", "dapo"
    temperature: float = 0.9
    top_p: float = 0.9
    top_k: int = 50
    max_new_tokens: int = 768
    train_vision_tower: bool = True
    loss_kind: str = "bce"
    eval_every: int = 0
    eval_samples: int = 64
    checkpoint_every: int = 0
    output_dir: str = "runs/rl"
    max_steps: int | None = None

    @classmethod
    def from_preset(cls, preset, **changes) -> GRPOConfig:
        """The stage-2 settings of a `lenslib.presets.Preset` (Table A2 in "full"); `changes`
        override single fields (evaluation and checkpoints keep this class's defaults)."""
        values = dict(
            epochs=preset.rl_epochs, batch_size=preset.rl_batch_size,
            group_size=preset.group_size, lr=preset.rl_lr, scheduler=preset.rl_scheduler,
            mllm_lr=preset.rl_mllm_lr or None, sam_lr=preset.rl_sam_lr or None,
            seed=preset.seed, beta=preset.beta, alpha=preset.alpha,
            reward_weights=preset.reward_weights, temperature=preset.temperature,
            top_p=preset.top_p, top_k=preset.top_k, max_new_tokens=preset.max_completion_length,
            max_steps=preset.rl_max_steps or None,
        )  # fmt: skip
        return cls(**(values | changes))


def frozen_reference(model: LensModel, accelerator: Accelerator | None = None) -> torch.nn.Module:
    """pi_ref of eq. 9: a frozen copy of the MLLM at the start of stage 2 (only the MLLM's
    token log-probs enter the KL, so the rest of LENS is not copied).

    Under DeepSpeed the copy is handed to DeepSpeed too, as TRL does (`prepare_deepspeed`): an
    inference engine in the policy's precision, sharded under ZeRO-3 (copied from the gathered
    weights), whole on every process otherwise (stage 0)."""
    with zero3_gathered(model.mllm.parameters()):
        ref = copy.deepcopy(model.mllm).eval()
    ref.requires_grad_(False)
    plugin = accelerator.state.deepspeed_plugin if accelerator is not None else None
    if plugin is None:
        return ref
    import deepspeed

    config = copy.deepcopy(plugin.deepspeed_config)
    for training_only in ("optimizer", "scheduler"):
        config.pop(training_only, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    if config["zero_optimization"]["stage"] != 3:
        config["zero_optimization"]["stage"] = 0
    engine, *_ = deepspeed.initialize(model=ref, config=config)
    engine.eval()  # (DeepSpeedEngine.eval returns None, not the engine)
    return engine


@torch.no_grad()
def reference_logprobs(
    ref: torch.nn.Module, lens: LensModel, samples, completion_ids, completion_mask, cfg
) -> torch.Tensor:
    """(N, T) log-probs of the rollouts' tokens under the reference MLLM."""
    prompt = repeat_batch(
        build_inputs(lens.processor, [s.image for s in samples], [s.text for s in samples]),
        cfg.group_size,
    )
    batch = append_completions(prompt, completion_ids.cpu(), completion_mask.cpu())
    batch = {k: v for k, v in batch.items() if k != "labels"}
    T = completion_ids.shape[1]
    logits = ref(**{k: v.to(lens.device) for k, v in batch.items()}, logits_to_keep=T + 1).logits
    return grpo.token_logprobs(logits[:, :-1], completion_ids.to(lens.device), cfg.temperature)


def score_rollouts(
    samples: Sequence[SegSample], rollouts, mask_logits, cfg: GRPOConfig
) -> dict[str, torch.Tensor]:
    """R_format, R_box, R_seg and R_unified (eq. 11) for the N = P*G rollouts, each (N,)."""
    G = cfg.group_size
    r_format = torch.tensor([format_reward(t) for t in rollouts.texts])
    r_box = torch.tensor(
        [box_reward(b, samples[i // G].box, cfg.square_iou) for i, b in enumerate(rollouts.boxes)]
    )
    r_seg = torch.stack(
        [
            seg_reward((m > 0).cpu(), torch.from_numpy(samples[i // G].mask), cfg.square_iou)
            for i, m in enumerate(mask_logits)
        ]
    ).float()
    weights = RewardWeights(*cfg.reward_weights)
    return {
        "format": r_format,
        "box": r_box,
        "seg": r_seg,
        "unified": unified_reward(r_format, r_box, r_seg, weights),
    }


def grpo_step(
    model: torch.nn.Module,
    ref: torch.nn.Module | None,
    samples: Sequence[SegSample],
    accelerator: Accelerator,
    optimizer: torch.optim.Optimizer,
    scheduler,
    cfg: GRPOConfig,
) -> dict[str, float]:
    """One GRPO optimiser step on this process's prompts (see the module docstring)."""
    lens: LensModel = accelerator.unwrap_model(model)
    images, texts = [s.image for s in samples], [s.text for s in samples]
    G = cfg.group_size
    clock = [time.perf_counter()]  # phase boundaries, for the time shares in the log

    # 1. rollouts: G sampled answers per prompt, in one batched call (rows a1..aG, b1..bG, ...)
    #    (ZeRO-3: the weights are gathered once for the whole generation, not on every token)
    with zero3_gathered(lens.parameters(), engine=model):
        rollouts = lens.generate(
            images, texts, group_size=G, max_new_tokens=cfg.max_new_tokens, do_sample=True,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
        )  # fmt: skip
    ids, mask = rollouts.completion_ids, rollouts.completion_mask  # (P*G, T)
    clock.append(time.perf_counter())

    # 2. one forward per rollout: its token log-probs and its own mask
    out = model(images, texts, ids, mask, group_size=G, boxes=rollouts.boxes)
    logp = grpo.token_logprobs(out.logits, ids.to(out.logits.device), cfg.temperature)  # (N, T)

    # 3. unified rewards (eq. 11)
    rewards = score_rollouts(samples, rollouts, out.mask_logits, cfg)

    # 4. advantages over the rewards of ALL processes (groups never straddle processes: each
    #    process samples all G answers of its prompts), then this process's slice
    local = rewards["unified"].to(accelerator.device)
    everyone = accelerator.gather(local)  # (world * P * G,)
    advantages = grpo.group_advantages(everyone, G, scale=cfg.scale_rewards, std=cfg.std)
    start = accelerator.process_index * len(local)
    advantages = advantages[start : start + len(local)]

    # 5. reference log-probs for the KL term (eq. 9)
    ref_logp = None
    if cfg.beta != 0.0 and ref is not None:
        ref_logp = reference_logprobs(ref, lens, samples, ids, mask, cfg)

    clock.append(time.perf_counter())

    # 6. GRPO loss (eqs. 8-10) + alpha * segmentation loss on every rollout's mask (eq. 12)
    mask = mask.to(logp.device)
    policy = grpo.grpo_loss(
        logp, None, ref_logp, advantages, mask, beta=cfg.beta, eps_low=cfg.eps_low,
        eps_high=cfg.eps_high, aggregation=cfg.aggregation,
        max_completion_length=cfg.max_new_tokens,
        num_items_in_batch=accelerator.gather(mask.sum()).sum().item() / accelerator.num_processes,
    )  # fmt: skip
    targets = [t for t in target_masks(samples, accelerator.device) for _ in range(G)]
    l_seg = mean_seg_loss(out.mask_logits, targets, cfg.loss_kind)
    loss = policy.loss + cfg.alpha * l_seg
    accelerator.backward(loss)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    clock.append(time.perf_counter())

    grouped = everyone.view(-1, G)
    stats = torch.stack(
        [
            rewards["format"].mean(), rewards["box"].mean(), rewards["seg"].mean(),
            rewards["unified"].mean(), policy.mean_kl.cpu(), policy.clip_fraction.cpu(),
            mask.sum(1).float().mean().cpu(), l_seg.detach().cpu(), loss.detach().cpu(),
        ]
    ).to(accelerator.device)  # fmt: skip
    stats = accelerator.reduce(stats, "mean").tolist()
    names = ["reward_format", "reward_box", "reward_seg", "reward", "kl", "clip_fraction"]
    names += ["completion_length", "seg_loss", "loss"]
    record = dict(zip(names, stats))
    record["format_rate"] = record["reward_format"]
    record["advantage_spread"] = grouped.std(dim=1).mean().item()  # 0 = groups teach nothing
    phases = (
        "time_generate",
        "time_score",
        "time_update",
    )  # rollouts | forward+rewards | loss+step
    record |= {name: b - a for name, a, b in zip(phases, clock, clock[1:])}
    return record


def parameter_groups(model: LensModel, cfg: GRPOConfig) -> list[dict]:
    """AdamW groups: the MLLM's trainable weights at `cfg.mllm_lr`, SAM's trainable weights
    (prompt encoder, mask decoder) at `cfg.sam_lr`, the context queries and the connector at
    `cfg.lr`; a part whose lr is None uses `cfg.lr` (the paper's single lr)."""
    groups: dict[str, list[torch.nn.Parameter]] = {"mllm": [], "sam": [], "context": []}
    for name, param in model.named_parameters():
        if param.requires_grad:
            part = name.split(".")[0]
            groups[part if part in ("mllm", "sam") else "context"].append(param)
    lrs = {"mllm": cfg.mllm_lr, "sam": cfg.sam_lr, "context": None}
    return [
        {"params": params, "lr": cfg.lr if lrs[part] is None else lrs[part], "name": part}
        for part, params in groups.items()
        if params
    ]


def train_grpo(
    model: LensModel,
    train: Sequence[SegSample],
    val: Sequence[SegSample],
    cfg: GRPOConfig,
    accelerator: Accelerator,
    resume: bool = False,
    on_log: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Run stage 2 from an aligned model; returns the log (one dict per step)."""
    deepspeed_precision(model, accelerator)  # (DeepSpeed only)
    ref = frozen_reference(model, accelerator) if cfg.beta != 0.0 else None
    counts = model.set_stage("rl", train_vision_tower=cfg.train_vision_tower)
    accelerator.print(f"stage 2 trains {counts}")
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.lr)
    steps = run_steps(len(train), cfg.batch_size, cfg.epochs, cfg.max_steps)
    scheduler = make_scheduler(cfg.scheduler, optimizer, steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    def step_fn(samples: Sequence[SegSample]) -> dict[str, float]:
        return grpo_step(model, ref, samples, accelerator, optimizer, scheduler, cfg)

    return run_stage(model, step_fn, scheduler, train, val, cfg, accelerator, resume, on_log)
