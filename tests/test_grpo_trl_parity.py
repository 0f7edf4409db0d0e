"""Parity of lenslib.grpo with TRL 1.16's GRPOTrainer._compute_loss.

TRL has no standalone loss function, so we build a bare trainer object, give it exactly the
attributes `_compute_loss` reads, patch its log-prob function to return our tensors, and
compare losses and gradients.
"""

from __future__ import annotations

import zlib
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

trl_grpo = pytest.importorskip("trl.trainer.grpo_trainer")
from trl.trainer.utils import nanstd  # noqa: E402

from lenslib import grpo  # noqa: E402

B, T, G, MAX_LEN = 8, 7, 4, 7


class _FakeAccelerator:
    num_processes = 1

    def gather(self, x):
        return x

    def gather_for_metrics(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x


def _bare_trainer(loss_type: str, beta: float, bias_correction: bool, logp: torch.Tensor):
    trainer = object.__new__(trl_grpo.GRPOTrainer)
    trainer.loss_type = loss_type
    trainer.beta = beta
    trainer.epsilon_low = 0.2
    trainer.epsilon_high = 0.28
    trainer.top_entropy_quantile = 1.0
    trainer.off_policy_mask_threshold = None
    trainer.importance_sampling_level = "token"
    trainer.use_vllm = False
    trainer.aux_loss_enabled = False
    trainer._entropy_bonus_enabled = False
    trainer.max_completion_length = MAX_LEN
    trainer.current_gradient_accumulation_steps = 1
    trainer.accelerator = _FakeAccelerator()
    trainer.model = SimpleNamespace(training=True)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer.args = SimpleNamespace(
        use_bias_correction_kl=bias_correction, delta=None, steps_per_generation=1
    )
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (
        logp,
        torch.zeros_like(logp),
        None,
    )
    return trainer


def _random_batch(seed: int):
    gen = torch.Generator().manual_seed(seed)
    logp = (-torch.rand(B, T, generator=gen, dtype=torch.float64) * 3).requires_grad_(True)
    old = (logp.detach() + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=0)
    ref = (logp.detach() + 0.3 * torch.randn(B, T, generator=gen, dtype=torch.float64)).clamp(max=0)
    adv = torch.randn(B, generator=gen, dtype=torch.float64)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T).expand(B, T) < lengths.unsqueeze(1)).to(torch.int64)
    return logp, old, ref, adv, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("bias_correction", [False, True])
def test_loss_and_gradient_match_trl(loss_type, beta, bias_correction):
    logp, old, ref, adv, mask = _random_batch(
        seed=zlib.crc32(f"{loss_type}{beta}{bias_correction}".encode())
    )
    num_items = mask.sum().to(torch.float64)

    trainer = _bare_trainer(loss_type, beta, bias_correction, logp)
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": num_items,
    }
    trl_loss = trainer._compute_loss(None, inputs)
    (trl_grad,) = torch.autograd.grad(trl_loss, logp)

    ours = grpo.grpo_loss(
        logp, old, ref, adv, mask, beta=beta, eps_low=0.2, eps_high=0.28,
        aggregation=loss_type, bias_correction_kl=bias_correction,
        max_completion_length=MAX_LEN, num_items_in_batch=num_items.item(),
    )  # fmt: skip
    (our_grad,) = torch.autograd.grad(ours.loss, logp)

    assert torch.allclose(ours.loss, trl_loss, atol=1e-6, rtol=0), (ours.loss, trl_loss)
    assert torch.allclose(our_grad, trl_grad, atol=1e-6, rtol=0)
    if beta:
        assert ours.mean_kl.item() == pytest.approx(trainer._metrics["train"]["kl"][-1], abs=1e-6)
    trl_clip = trainer._metrics["train"]["clip_ratio/region_mean"][-1]
    assert ours.clip_fraction.item() == pytest.approx(trl_clip, abs=1e-6)


def test_on_policy_old_logps_default_to_detached_current():
    """TRL (num_iterations = 1) and lenslib both use old = logp.detach(): ratio 1, grad = -A/|o|."""
    logp, _, ref, adv, mask = _random_batch(seed=3)
    trainer = _bare_trainer("grpo", 0.0, False, logp)
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": adv,
    }
    trl_loss = trainer._compute_loss(None, inputs)
    ours = grpo.grpo_loss(logp, None, None, adv, mask, beta=0.0, eps_low=0.2, eps_high=0.28)
    assert torch.allclose(ours.loss, trl_loss, atol=1e-12)
    (grad,) = torch.autograd.grad(ours.loss, logp)
    expected = -adv.unsqueeze(1) * mask / mask.sum(1, keepdim=True) / B
    assert torch.allclose(grad, expected, atol=1e-12)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_bessel_advantages_match_trl_formula(scale):
    """TRL's advantage code with nanstd (Bessel), re-stated from trl 1.16, on the same rewards."""
    rewards = torch.rand(4 * G, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
    if scale == "batch":
        std = nanstd(rewards).expand_as(rewards)
    else:
        std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    expected = rewards - mean
    if scale != "none":
        expected = expected / (std + 1e-4)
    ours = grpo.group_advantages(rewards, G, scale=scale, std="bessel")
    assert torch.allclose(ours, expected, atol=1e-12)
