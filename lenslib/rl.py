"""Stage 2, GRPO with unified rewards (paper eqs. 6-12, Table A2).

Everything learns except SAM's image encoder. For each prompt the policy samples G answers; each
answer is scored by the unified reward (eq. 11); advantages compare the G answers of a prompt
(eqs. 6-7); the clipped surrogate with a KL penalty to the frozen stage-1 model (eqs. 8-10) is
combined with the segmentation loss (eq. 12):

    J_LENS = J_GRPO(R_unified, D_KL) + alpha * L_seg(P_seg, M_gt)             (eq. 12)

`grpo_step` is one optimiser step, top to bottom:

    1. rollouts     G sampled answers per prompt, ONE batched generate call   (eq. 1)
    2. reference    log-probs of the same tokens under the frozen model, first,
                    without gradients (no policy graph is alive yet)          (eq. 9)
    3. forward      ONE forward per rollout gives its token log-probs AND its mask (eqs. 2-4)
    4. rewards      R_format, R_box, R_seg -> R_unified                       (eq. 11)
    5. advantages   rewards gathered over all processes, grouped by prompt    (eqs. 6-7)
    6. loss         GRPO loss + alpha * L_seg, backward, step                 (eqs. 8-10, 12)

Memory (`rollout_micro_batch`): by default a process's P*G rollouts go through ONE forward and
ONE backward. With micro-batches of n rollouts, step 3 becomes a pass without gradients that
only draws the masks (R_seg needs every rollout's mask before any advantage exists), and step 6
runs the forward again n rollouts at a time, each with its own backward, the losses weighted to
sum to the unsplit one: the same gradient (within float rounding) for a fraction of the
activations. Gradient checkpointing (`gradient_checkpointing`, `LoopConfig`) trades compute
for memory once more.

Prompt sharing (`share_prompt`): steps 1-3 normally repeat each prompt (system + image +
question) for its G rollouts, so the prompt's tokens (and in steps 2-3 the vision tower) are
computed G times per pass. With the option, each prompt goes through the model once, its keys
and values (a KV cache) are repeated for its G completions, and only the completions (and the
queries) are computed per rollout (`lenslib.mllm.shared_prompt_prefill` for the rollouts,
`shared_prompt_forward` for the reference and the policy). Attention is causal, so the numbers
are the same (rollouts, log-probs, masks, gradients, within float rounding); the prompt's compute
and activations shrink G times, for the price of a second, small forward call. It needs the KV
cache, so it cannot be combined with gradient checkpointing, and a micro-batch that cuts a
group shares nothing.

With one update per batch of rollouts (as here and in the paper), the "old" policy equals the
current one, so the ratio is exactly 1 and clipping never bites; `grpo_loss` still computes
the full eq. 8 so that the same code serves several updates per batch.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from accelerate import Accelerator

from lenslib import grpo
from lenslib.data.sample import SegSample
from lenslib.losses import LossKind
from lenslib.mllm import completion_batch, shared_prompt_forward
from lenslib.model import LensModel
from lenslib.rewards import RewardWeights, box_reward, format_reward, seg_reward, unified_reward
from lenslib.settings import setting
from lenslib.sharding import zero3_gathered
from lenslib.training import (
    LoopConfig,
    SchedulerKind,
    deepspeed_precision,
    make_scheduler,
    mean_seg_loss,
    run_stage,
    run_steps,
    target_masks,
)


@dataclass(kw_only=True)
class GRPOConfig(LoopConfig):
    """Stage-2 settings; the defaults are the paper's (Table A2 and eqs. 6-12)."""

    epochs: int = setting(16, "passes over the training set (Table A2: 16)")
    batch_size: int = setting(
        64, "prompts per optimiser step, over all processes, each with G rollouts (Table A2: 64)"
    )
    lr: float = setting(3e-6, "AdamW learning rate (Table A2: 3e-6)")
    scheduler: SchedulerKind = setting("linear", "learning-rate schedule (Table A2: linear)")
    output_dir: str = setting(
        "runs/rl", "checkpoints, history and the final model (output_dir/final)"
    )
    mllm_lr: float | None = setting(
        None, "the MLLM's own lr (None: lr, one lr for every part as in the paper)"
    )
    sam_lr: float | None = setting(
        None, "the lr of SAM's prompt encoder and mask decoder (None: lr)"
    )
    group_size: int = setting(8, "G, rollouts sampled per prompt (Table A2: 8)")
    beta: float = setting(0.04, "KL weight of eq. 10 (0 skips the reference model)")
    alpha: float = setting(1.0, "weight of the segmentation loss in eq. 12")
    reward_weights: tuple[float, ...] = setting(
        (1.0, 1.0, 1.0), "lambda_1..3 of eq. 11: format, box, seg"
    )
    square_iou: bool = setting(False, "square R_box and R_seg, as the authors' code does")
    eps_low: float = setting(0.2, "lower clipping range of eq. 8")
    eps_high: float = setting(0.2, "upper clipping range of eq. 8")
    std: grpo.StdKind = setting(
        "population", "std of eq. 6 (population), or Bessel-corrected as TRL and the authors"
    )
    scale_rewards: grpo.ScaleKind = setting(
        "group", "divide advantages by the group's std, the batch's, or \"none\" (Dr. GRPO)"
    )
    aggregation: grpo.Aggregation = setting(
        "grpo", "how token losses are averaged (eq. 10 and TRL's variants)"
    )
    temperature: float = setting(0.9, "sampling temperature of the rollouts")
    top_p: float = setting(0.9, "nucleus sampling of the rollouts")
    top_k: int = setting(50, "top-k sampling of the rollouts")
    train_vision_tower: bool = setting(True, "False also freezes the MLLM's vision tower")
    loss_kind: LossKind = setting("bce", 'pixel loss beside dice in L_seg: "bce" or "focal"')
    rollout_micro_batch: int | None = setting(
        None,
        "rollouts per forward/backward on a process, gradients accumulated over the step's "
        "rollouts (None: all in one forward, the step's masks and log-probs from one pass)",
    )
    share_prompt: bool = setting(
        False,
        "compute each prompt (image included) once per group of G rollouts, its keys and values "
        "reused by the G completions, when sampling and in the reference's and the policy's "
        "forward: the same numbers for less compute (needs the KV cache: not with "
        "gradient_checkpointing)",
    )

    def __post_init__(self) -> None:
        if self.share_prompt and self.gradient_checkpointing:
            raise ValueError(
                "share_prompt needs the KV cache, which transformers drops under "
                "gradient_checkpointing: turn one of the two settings off"
            )


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


def row_chunks(num_rows: int, size: int | None) -> list[tuple[int, int]]:
    """[start, stop) row ranges of at most `size` rows (None or 0: one range for all)."""
    size = num_rows if not size else size
    return [(a, min(a + size, num_rows)) for a in range(0, num_rows, size)] or [(0, 0)]


def rows_inputs(samples: Sequence[SegSample], start: int, stop: int, group_size: int):
    """(images, texts, group_size) of rollout rows [start, stop) (rows a1..aG, b1..bG, ...):
    whole groups keep their prompt once per group; a range that cuts a group names each
    row's prompt (group size 1), which computes the same rows."""
    G = group_size
    if start % G == 0 and stop % G == 0:
        part = [samples[p] for p in range(start // G, stop // G)]
        return [s.image for s in part], [s.text for s in part], G
    rows = [samples[i // G] for i in range(start, stop)]
    return [s.image for s in rows], [s.text for s in rows], 1


@torch.no_grad()
def reference_logprobs(
    ref: torch.nn.Module, lens: LensModel, samples, completion_ids, completion_mask, cfg
) -> torch.Tensor:
    """(N, T) log-probs of the rollouts' tokens under the reference MLLM.

    Run before the policy's forward (no policy graph is alive yet), without gradients, in the
    reference's own dtype (bf16 at full scale), `cfg.rollout_micro_batch` rows at a time; only
    `grpo.token_logprobs`'s pieces are ever fp32. With `cfg.share_prompt`, each prompt once per
    group (`shared_prompt_forward`), unless a micro-batch cuts a group (then nothing is shared)."""
    T = completion_ids.shape[1]
    pieces = []
    for start, stop in row_chunks(len(completion_ids), cfg.rollout_micro_batch):
        images, texts, g = rows_inputs(samples, start, stop, cfg.group_size)
        batch = completion_batch(
            lens.processor, images, texts, completion_ids[start:stop],
            completion_mask[start:stop], g,
        ).to(lens.device)  # fmt: skip
        if cfg.share_prompt and g > 1:
            mllm = getattr(ref, "module", ref)  # (a DeepSpeed engine holds the MLLM in .module)
            L = batch["input_ids"].shape[1]
            hidden = shared_prompt_forward(mllm.model, batch, g, L - T)  # (n, L, C)
            logits = mllm.lm_head(hidden[:, L - T - 1 : L - 1])  # (n, T, V)
            del hidden
        else:
            logits = ref(**batch, logits_to_keep=T + 1).logits[:, :-1]  # (n, T, V)
        ids = completion_ids[start:stop].to(lens.device)
        pieces.append(grpo.token_logprobs(logits, ids, cfg.temperature))
        del logits
    return torch.cat(pieces)


@contextmanager
def accumulating(accelerator: Accelerator, model: torch.nn.Module, sync: bool):
    """Around a micro-batch's forward and backward: unless `sync` (the step's last
    micro-batch), gradients only accumulate locally: DDP skips its all-reduce
    (`accelerator.no_sync`) and DeepSpeed is told this is no accumulation boundary (accelerate
    passes `sync_gradients` on to `engine.set_gradient_accumulation_boundary`, and steps the
    engine only at a boundary), as `accelerator.accumulate` does for a DataLoader's batches."""
    if sync:
        yield
        return
    state = accelerator.gradient_state
    state._set_sync_gradients(False)
    try:
        with accelerator.no_sync(model):
            yield
    finally:
        state._set_sync_gradients(True)


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
            share_prompt=cfg.share_prompt,
        )  # fmt: skip
    ids, mask = rollouts.completion_ids, rollouts.completion_mask  # (P*G, T)
    clock.append(time.perf_counter())
    N = len(ids)
    chunks = row_chunks(N, cfg.rollout_micro_batch)

    # 2. reference log-probs for the KL term (eq. 9), first: no policy graph is alive yet
    ref_logp = None
    if cfg.beta != 0.0 and ref is not None:
        ref_logp = reference_logprobs(ref, lens, samples, ids, mask, cfg)

    # 3. one forward per rollout: its token log-probs and its own mask. Without micro-batches
    #    this forward is also the one the loss backpropagates through; with them, R_seg needs
    #    EVERY rollout's mask before any advantage exists, so a first pass without gradients
    #    draws the masks and the gradient passes (step 6) run the forward again, per micro-batch
    def forward(start: int, stop: int):
        part_images, part_texts, g = rows_inputs(samples, start, stop, G)
        return model(part_images, part_texts, ids[start:stop], mask[start:stop], group_size=g,
                     boxes=rollouts.boxes[start:stop], share_prompt=cfg.share_prompt)  # fmt: skip

    out = None
    if len(chunks) == 1:
        out = forward(0, N)
        mask_logits = out.mask_logits
    else:
        mask_logits = []
        with torch.no_grad():
            for start, stop in chunks:
                mask_logits.extend(m.detach() for m in forward(start, stop).mask_logits)

    # 4. unified rewards (eq. 11)
    rewards = score_rollouts(samples, rollouts, mask_logits, cfg)
    del mask_logits

    # 5. advantages over the rewards of ALL processes (groups never straddle processes: each
    #    process samples all G answers of its prompts), then this process's slice
    local = rewards["unified"].to(accelerator.device)
    everyone = accelerator.gather(local)  # (world * P * G,)
    advantages = grpo.group_advantages(everyone, G, scale=cfg.scale_rewards, std=cfg.std)
    start = accelerator.process_index * len(local)
    advantages = advantages[start : start + len(local)]

    clock.append(time.perf_counter())

    # 6. GRPO loss (eqs. 8-10) + alpha * segmentation loss on every rollout's mask (eq. 12),
    #    one backward per micro-batch, each loss weighted so that they SUM to the unsplit loss
    #    (`grpo.micro_batch_weight`); gradients are synchronised only on the last one
    mask = mask.to(accelerator.device)
    num_items = accelerator.gather(mask.sum()).sum().item() / accelerator.num_processes
    targets = [t for t in target_masks(samples, accelerator.device) for _ in range(G)]
    all_tokens = mask.sum().float().clamp(min=1.0)
    totals = torch.zeros(4, device=accelerator.device)  # loss, L_seg, KL, clip fraction
    for k, (a, b) in enumerate(chunks):
        with accumulating(accelerator, model, sync=k == len(chunks) - 1):
            part = out if out is not None else forward(a, b)
            logp = grpo.token_logprobs(part.logits, ids[a:b].to(part.logits.device),
                                       cfg.temperature)  # (n, T)  # fmt: skip
            policy = grpo.grpo_loss(
                logp, None, None if ref_logp is None else ref_logp[a:b], advantages[a:b],
                mask[a:b], beta=cfg.beta, eps_low=cfg.eps_low, eps_high=cfg.eps_high,
                aggregation=cfg.aggregation, max_completion_length=cfg.max_new_tokens,
                num_items_in_batch=num_items,
            )  # fmt: skip
            l_seg = mean_seg_loss(part.mask_logits, targets[a:b], cfg.loss_kind)
            weight = grpo.micro_batch_weight(cfg.aggregation, mask[a:b], mask, num_items)
            rows = (b - a) / N
            loss = weight * policy.loss + cfg.alpha * rows * l_seg
            accelerator.backward(loss)
        tokens = mask[a:b].sum().float().clamp(min=1.0) / all_tokens
        totals += torch.stack(
            [loss.detach(), rows * l_seg.detach(), tokens * policy.mean_kl,
             tokens * policy.clip_fraction]
        ).float()  # fmt: skip
        del part, logp, loss
    out = None
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    clock.append(time.perf_counter())

    grouped = everyone.view(-1, G)
    stats = torch.stack(
        [
            rewards["format"].mean(), rewards["box"].mean(), rewards["seg"].mean(),
            rewards["unified"].mean(), totals[2].cpu(), totals[3].cpu(),
            mask.sum(1).float().mean().cpu(), totals[1].cpu(), totals[0].cpu(),
        ]
    ).to(accelerator.device)  # fmt: skip
    stats = accelerator.reduce(stats, "mean").tolist()
    names = ["reward_format", "reward_box", "reward_seg", "reward", "kl", "clip_fraction"]
    names += ["completion_length", "seg_loss", "loss"]
    record = dict(zip(names, stats))
    record["format_rate"] = record["reward_format"]
    record["advantage_spread"] = grouped.std(dim=1).mean().item()  # 0 = groups teach nothing
    # rollouts | reference + forward (+ the no-grad mask pass) + rewards | loss + backward + step
    phases = ("time_generate", "time_score", "time_update")
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
