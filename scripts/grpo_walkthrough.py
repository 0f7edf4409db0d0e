"""The math of GRPO (LENS paper eqs. 6-10) on one group of 8 rollouts, as a script.

Exported from notebooks/01_grpo_advantage_math.ipynb by `python -m lenslib.export`: edit the notebook,
not this file (tests/test_export.py fails when the two disagree).

Launch: python scripts/grpo_walkthrough.py [--std bessel] [--group-size 8]
"""

import argparse

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument('--group-size', type=int, default=8, help='G: rollouts sampled per prompt (Table A2)')
parser.add_argument('--eps-low', type=float, default=0.2, help='lower clipping range of eq. 8')
parser.add_argument('--eps-high', type=float, default=0.2, help='upper clipping range of eq. 8')
parser.add_argument('--beta', type=float, default=0.04, help='weight of the KL penalty, eq. 10')
parser.add_argument('--std', type=str, default='population', choices=['population', 'bessel'], help='eq. 6 (paper) or "bessel" (TRL / authors\' code) (choices: population, bessel)')
args = parser.parse_args()
group_size = args.group_size
eps_low = args.eps_low
eps_high = args.eps_high
beta = args.beta
std = args.std

# --- notebook cell 3 ---
import torch

from lenslib import grpo, rewards

torch.set_printoptions(precision=3, sci_mode=False)

# --- notebook cell 5 ---
r_format = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
r_box = torch.tensor([0.82, 0.10, 0.65, 0.00, 0.91, 0.40, 0.77, 0.55])
r_seg = torch.tensor([0.88, 0.05, 0.70, 0.12, 0.93, 0.35, 0.80, 0.60])
reward = rewards.unified_reward(r_format, r_box, r_seg)  # eq. 11
advantage = grpo.group_advantages(reward, group_size, std=std)  # eqs. 6-7

print(" i  format  box   seg   R      A")
for i in range(group_size):
    print(f"{i:2d}  {r_format[i]:.0f}     {r_box[i]:.2f}  {r_seg[i]:.2f}  {reward[i]:.2f}  {advantage[i]:+.2f}")

# --- notebook cell 9 ---
assert abs(advantage.sum().item()) < 1e-5
assert torch.equal(advantage.argsort(), reward.argsort())
assert advantage.argmin().item() == 3 and advantage.argmax().item() == 4
print("mean reward:", round(reward.mean().item(), 4), " population std:", round(reward.std(unbiased=False).item(), 4))

# --- notebook cell 11 ---
pop = grpo.group_advantages(reward, group_size, std="population")
bessel = grpo.group_advantages(reward, group_size, std="bessel")
ratio = (bessel / pop).mean().item()
print(f"bessel / population = {ratio:.4f}   sqrt(7/8) = {(7 / 8) ** 0.5:.4f}")
assert abs(ratio - (7 / 8) ** 0.5) < 1e-3

# --- notebook cell 13 ---
spread = torch.tensor([0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0])
easy = 2.9 + 0.01 * spread  # rewards in [2.90, 2.97]
hard = 0.3 + 0.10 * spread  # rewards in [0.30, 1.00]
same = torch.full((8,), 1.7)  # every rollout equally good
both = torch.cat([easy, hard, same])
scaled = grpo.group_advantages(both, group_size, scale="group")
unscaled = grpo.group_advantages(both, group_size, scale="none")
print("centred only, easy :", unscaled[:8])
print("centred only, hard :", unscaled[8:16])
print("std-scaled,   easy :", scaled[:8])
print("std-scaled,   hard :", scaled[8:16])
print("std-scaled,   same :", scaled[16:])
assert torch.allclose(scaled[:8], scaled[8:16], atol=1e-2)  # same ranking -> same advantages
assert unscaled[8:16].abs().max() > 9 * unscaled[:8].abs().max()
assert torch.equal(scaled[16:], torch.zeros(8))

# --- notebook cell 16 ---
def gradient_at(ratio: float, a: float) -> float:
    lp = torch.tensor([[ratio]]).log().requires_grad_(True)
    objective, _ = grpo.clipped_surrogate(lp, torch.zeros(1, 1), torch.tensor([a]), eps_low, eps_high)
    objective.sum().backward()
    return lp.grad.item()


for r_, a in [(1.1, 1), (1.5, 1), (0.5, 1), (1.5, -1), (0.5, -1)]:
    print(f"r = {r_:.1f}, A = {a:+d}: d objective / d log pi = {gradient_at(r_, a):+.3f}")
assert gradient_at(1.5, +1) == 0.0  # A > 0, already more likely than 1 + eps: stop
assert gradient_at(0.5, -1) == 0.0  # A < 0, already less likely than 1 - eps: stop
assert gradient_at(0.5, +1) > 0 and gradient_at(1.5, -1) < 0  # moving back is never clipped

# --- notebook cell 20 ---
p = torch.tensor([0.40, 0.25, 0.15, 0.12, 0.08])  # pi_theta
uniform = torch.full((5,), 0.2)
shifts = torch.linspace(0, 1, 11)
true_kl, mean_k3, std_k3, std_k1 = [], [], [], []
for s in shifts:
    q = (1 - s) * p + s * torch.tensor([0.02, 0.08, 0.2, 0.3, 0.4])  # pi_ref
    k3 = grpo.k3_kl(p.log(), q.log())  # per token
    k1 = p.log() - q.log()
    true_kl.append((p * (p / q).log()).sum().item())
    mean_k3.append((p * k3).sum().item())
    std_k3.append((p * (k3 - mean_k3[-1]) ** 2).sum().sqrt().item())
    std_k1.append((p * (k1 - true_kl[-1]) ** 2).sum().sqrt().item())
    assert (k3 >= 0).all()
print("shift  true KL  E[k3]   std k3  std k1")
for row in zip(shifts.tolist(), true_kl, mean_k3, std_k3, std_k1):
    print("{:.1f}    {:.4f}   {:.4f}  {:.4f}  {:.4f}".format(*row))
assert all(abs(a - b) < 1e-5 for a, b in zip(true_kl, mean_k3))  # unbiased
assert all(s3 <= s1 + 1e-6 for s3, s1 in zip(std_k3[1:6], std_k1[1:6]))  # less noisy near pi_ref

# --- notebook cell 25 ---
mask = torch.tensor([[1, 1, 0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]])
weights = {}
for aggregation in ("grpo", "bnpo", "dr_grpo", "dapo"):
    per_token = torch.ones(2, 8, requires_grad=True)
    grpo.aggregate(per_token, mask, aggregation, max_completion_length=8, num_items_in_batch=10).backward()
    weights[aggregation] = (per_token.grad[0, 0].item(), per_token.grad[1, 0].item())
    print(f"{aggregation:8s} token of the short answer: {weights[aggregation][0]:.4f}   of the long one: {weights[aggregation][1]:.4f}")
assert weights["grpo"][0] == 4 * weights["grpo"][1]  # 1/(2*2) vs 1/(2*8)
for other in ("bnpo", "dr_grpo", "dapo"):
    assert weights[other][0] == weights[other][1]  # token-level: every token equal

# --- notebook cell 27 ---
torch.manual_seed(0)
logits = torch.randn(2, 3, 6, requires_grad=True)  # (rollouts, tokens, vocabulary)
tokens = torch.tensor([[1, 2, 3], [4, 4, 5]])
reference = grpo.token_logprobs(logits.detach(), tokens)
before = grpo.token_logprobs(logits.detach(), tokens).sum(1)
out = grpo.grpo_loss(
    grpo.token_logprobs(logits, tokens), None, reference, torch.tensor([1.0, -1.0]),
    torch.ones(2, 3), beta=beta, eps_low=eps_low, eps_high=eps_high,
)
out.loss.backward()
with torch.no_grad():
    after = grpo.token_logprobs(logits - 0.5 * logits.grad, tokens).sum(1)
print("log-prob of each rollout before:", before, " after one step:", after)
print(f"loss {out.loss.item():+.4f}, KL {out.mean_kl.item():.4f}, clipped fraction {out.clip_fraction.item():.2f}")
assert abs(out.loss.item()) < 1e-6 and logits.grad.abs().sum() > 0
assert after[0] > before[0] and after[1] < before[1]
