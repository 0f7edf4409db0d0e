"""The math of Group Relative Policy Optimization (GRPO), paper eqs. 6-10.

A training step of the RL stage does, for each prompt, G rollouts o_1..o_G, scores them with the
unified reward (eq. 11, `lenslib.rewards`), and then:

1. `group_advantages`     eqs. 6-7: A_i = (R_i - mean_G) / (std_G + delta)
2. `token_logprobs`       log pi(o_t | o_<t) of the sampled tokens, from logits / temperature
3. `clipped_surrogate`    eq. 8, per token: min(r * A, clip(r, 1 - eps_low, 1 + eps_high) * A)
4. `k3_kl`                eq. 9, per token: exp(ref - logp) - (ref - logp) - 1
5. `grpo_loss`            eq. 10: combine 3 and 4 and aggregate over tokens and sequences

Which completion tokens count (up to and including the first EOS) is the mask that
`lenslib.mllm.completion_mask` makes when the rollouts are generated.

Everything here is plain tensor math with no model in sight, checked against TRL's
GRPOTrainer (tests/test_grpo_trl_parity.py). Where the paper and common implementations
differ, the choice is an explicit argument:

- std: the paper's eq. 6 is the population std; TRL and the LENS authors' code use the
  Bessel-corrected `torch.std`. Default here: "population" (the paper).
- scale: "group" (eq. 7), "batch" (one std for the whole batch), or "none" (Dr. GRPO: no
  division by the std at all).
- aggregation: "grpo" (eq. 10: mean over each sequence's tokens, then over sequences), "bnpo",
  "dr_grpo" and "dapo" (token-level means with different normalisers).
- bias_correction_kl: TRL multiplies the k3 term by the importance ratio (off by default here,
  as in the paper).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

StdKind = Literal["population", "bessel"]
ScaleKind = Literal["group", "batch", "none"]
Aggregation = Literal["grpo", "bnpo", "dr_grpo", "dapo"]

DELTA = 1e-4  # delta of eq. 7, as in the authors' code and TRL


def group_std(grouped: Tensor, std: StdKind = "population") -> Tensor:
    """Standard deviation over the last axis: population (eq. 6) or Bessel-corrected (TRL)."""
    return grouped.std(dim=-1, unbiased=(std == "bessel"))


def group_advantages(
    rewards: Tensor,
    group_size: int,
    scale: ScaleKind = "group",
    std: StdKind = "population",
    delta: float = DELTA,
) -> Tensor:
    """Group-relative advantages, paper eqs. 6-7.

    rewards: (B,) flat, rollouts of one prompt contiguous: [p0_o1..p0_oG, p1_o1..p1_oG, ...].
    Returns (B,) advantages. A group whose rewards are all equal gets advantage exactly 0
    (it teaches nothing: no rollout was better than another), never NaN.
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be a flat (B,) vector, got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2 (GRPO compares rollouts), got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)  # (num_prompts, G)
    centred = grouped - grouped.mean(dim=1, keepdim=True)  # R_i - mean_G
    # A float mean of equal numbers can miss them by ~1e-8, which 1 / delta would blow up to
    # ~1e-4 or more: set groups with no spread to exactly zero advantage.
    no_spread = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    centred = torch.where(no_spread, torch.zeros_like(centred), centred)
    if scale == "none":
        return centred.reshape(-1)
    if scale == "group":
        sigma = group_std(grouped, std).unsqueeze(1)  # (num_prompts, 1)
    elif scale == "batch":
        sigma = group_std(rewards, std)  # one number for the whole batch
    else:
        raise ValueError(f"scale must be 'group', 'batch' or 'none', got {scale!r}")
    return (centred / (sigma + delta)).reshape(-1)


TOKEN_CHUNK = 4096  # (row, token) positions per piece of `token_logprobs`


def _chunk_logprobs(logits: Tensor, token_ids: Tensor, temperature: float) -> Tensor:
    """log_softmax(logits / temperature) at `token_ids`, as gather minus logsumexp, in fp32.
    logits: (n, V), token_ids: (n,). Only this piece is ever copied to fp32."""
    scaled = logits.float() / temperature
    picked = scaled.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(scaled, dim=-1)


def token_logprobs(
    logits: Tensor, token_ids: Tensor, temperature: float = 1.0, chunk: int | None = None
) -> Tensor:
    """log pi(token | context) for the tokens that were sampled, as fp32 (B, T).

    logits: (B, T, V) already aligned so that logits[:, t] predicts token_ids[:, t], in any
    dtype (bf16 stays bf16). token_ids: (B, T). Returns (B, T).
    The logits are divided by the sampling temperature first, so the log-probs are those of the
    distribution the rollouts were actually drawn from (the authors' code skips this).

    Memory: `log_softmax(logits.float())` would copy the whole (B, T, V) block to fp32 (at
    Qwen's V = 151,936, 768 tokens and 8 rollouts that is 3.7 GB, and autograd keeps it). Here
    the positions are taken `chunk` at a time: gather minus logsumexp, in fp32, per piece, and
    with gradients each piece is recomputed in the backward pass (`torch.utils.checkpoint`)
    rather than kept, so at most one piece of fp32 logits exists at a time (`chunk` positions,
    default `TOKEN_CHUNK`). TRL's
    `selective_log_softmax` does the same loop per row.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    chunk = max(1, chunk or TOKEN_CHUNK)
    B, T, V = logits.shape
    flat, ids = logits.reshape(B * T, V), token_ids.reshape(B * T)
    keep_graph = torch.is_grad_enabled() and logits.requires_grad
    pieces = []
    for start in range(0, B * T, chunk):
        piece = (flat[start : start + chunk], ids[start : start + chunk], temperature)
        if keep_graph:
            pieces.append(checkpoint(_chunk_logprobs, *piece, use_reentrant=False))
        else:
            pieces.append(_chunk_logprobs(*piece))
    if not pieces:
        return logits.new_zeros((B, T), dtype=torch.float32)
    return torch.cat(pieces).view(B, T)


def clipped_surrogate(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, eps_low: float, eps_high: float
) -> tuple[Tensor, Tensor]:
    """Per-token clipped surrogate objective O_clip of eq. 8 (to be MAXIMISED).

    logp, old_logp: (B, T); advantages: (B,). Returns (objective (B, T), clipped (B, T) bool),
    where `clipped` marks tokens whose ratio left [1 - eps_low, 1 + eps_high] in the direction
    that the min() cuts off (those tokens get no gradient).
    """
    ratio = torch.exp(logp - old_logp)  # r = pi_theta / pi_old
    adv = advantages.unsqueeze(1)  # (B, 1)
    unclipped = ratio * adv
    clipped_obj = torch.clamp(ratio, 1 - eps_low, 1 + eps_high) * adv
    objective = torch.min(unclipped, clipped_obj)
    clipped = clipped_obj < unclipped
    return objective, clipped


def k3_kl(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """Per-token k3 estimator of KL(pi_theta || pi_ref), eq. 9: exp(d) - d - 1 with d = ref - logp.

    Always >= 0, unbiased for the true KL when tokens are sampled from pi_theta.
    """
    d = ref_logp - logp
    return torch.exp(d) - d - 1


@dataclass
class GRPOLossOutput:
    """The loss to minimise and what a training log wants to see."""

    loss: Tensor  # scalar, = -J(theta) of eq. 10 (plus beta * KL)
    mean_kl: Tensor  # mean k3 KL over completion tokens (0 when beta == 0 and no ref given)
    clip_fraction: Tensor  # fraction of completion tokens whose ratio was clipped


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    aggregation: Aggregation = "grpo",
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
) -> Tensor:
    """Reduce a per-token loss (B, T) to a scalar over the completion tokens in `mask`.

    grpo    (eq. 10): mean over each sequence's tokens (1/|o_i|), then mean over sequences.
                      Every rollout weighs the same, so a long answer's tokens each weigh less.
    bnpo:             sum over all tokens / number of tokens in this batch.
    dr_grpo:          sum over all tokens / (B * max_completion_length): a constant normaliser.
    dapo:             sum over all tokens / `num_items_in_batch`, the completion-token count over
                      all processes and the whole generation batch, divided by the number of
                      processes (the caller computes it; defaults to this batch's count).
    """
    mask = mask.to(per_token.dtype)
    total = (per_token * mask).sum()
    if aggregation == "grpo":
        per_seq = (per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_seq.mean()
    if aggregation == "bnpo":
        return total / mask.sum().clamp(min=1.0)
    if aggregation == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("aggregation 'dr_grpo' needs max_completion_length")
        return total / (per_token.size(0) * max_completion_length)
    if aggregation == "dapo":
        normaliser = mask.sum() if num_items_in_batch is None else num_items_in_batch
        return total / max(float(normaliser), 1.0)
    raise ValueError(f"unknown aggregation {aggregation!r}")


def micro_batch_weight(
    aggregation: Aggregation, micro_mask: Tensor, full_mask: Tensor, num_items_in_batch=None
) -> float:
    """The factor that turns `aggregate` over a micro-batch of rows into its share of
    `aggregate` over all rows, so that the weighted micro-batch losses SUM to the unsplit loss
    (gradient accumulation over a step's rollouts, `lenslib.rl.grpo_step`).

    grpo, dr_grpo: a mean over rows (of per-row means, or of sums / max length): rows_k / rows.
    bnpo:          a sum over tokens / this batch's tokens: tokens_k / tokens (each clamped to
                   >= 1 exactly as `aggregate` clamps them).
    dapo:          a sum over tokens / `num_items_in_batch`, a normaliser that does not depend on
                   the split: 1 (when it is None `aggregate` uses the micro-batch's own token
                   count, so the factor is tokens_k / tokens as for bnpo).
    """
    if aggregation in ("grpo", "dr_grpo"):
        return micro_mask.shape[0] / full_mask.shape[0]
    if aggregation == "bnpo" or (aggregation == "dapo" and num_items_in_batch is None):
        micro = max(float(micro_mask.sum()), 1.0)
        return micro / max(float(full_mask.sum()), 1.0)
    if aggregation == "dapo":
        return 1.0
    raise ValueError(f"unknown aggregation {aggregation!r}")


def grpo_loss(
    logp: Tensor,
    old_logp: Tensor | None,
    ref_logp: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    beta: float = 0.04,
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    aggregation: Aggregation = "grpo",
    bias_correction_kl: bool = False,
    max_completion_length: int | None = None,
    num_items_in_batch: float | None = None,
) -> GRPOLossOutput:
    """The GRPO loss, minus eq. 10's objective: -(O_clip - beta * D_KL), aggregated.

    logp: (B, T) log-probs of the sampled tokens under the current policy (with grad).
    old_logp: (B, T) under the policy that sampled them; None means "on-policy, one update per
              batch" (old = logp detached, so the ratio is exactly 1 and its gradient is A).
    ref_logp: (B, T) under the frozen reference (needed when beta > 0).
    advantages: (B,) from `group_advantages`. mask: (B, T) from `lenslib.mllm.completion_mask`.
    bias_correction_kl: multiply the k3 term by the ratio (TRL's `use_bias_correction_kl`).
    """
    if old_logp is None:
        old_logp = logp.detach()
    objective, clipped = clipped_surrogate(logp, old_logp, advantages, eps_low, eps_high)
    per_token = -objective  # (B, T)
    kl = torch.zeros_like(logp)
    if beta != 0.0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp (log-probs under the reference model)")
        kl = k3_kl(logp, ref_logp)
        if bias_correction_kl:
            kl = kl * torch.exp(logp - old_logp)
        per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, aggregation, max_completion_length, num_items_in_batch)
    fmask = mask.to(logp.dtype)
    n_tokens = fmask.sum().clamp(min=1.0)
    return GRPOLossOutput(
        loss=loss,
        mean_kl=((kl * fmask).sum() / n_tokens).detach(),
        clip_fraction=((clipped.to(logp.dtype) * fmask).sum() / n_tokens).detach(),
    )
