"""The RL math of PPO-RLHF as small pure tensor functions, each beside its formula.

Shapes: B = rollouts, T = response tokens. `mask` is 1 on response tokens up to and including EOS, 0 on padding.
References: Schulman et al. 2017 (PPO), Schulman 2016 (GAE), Ziegler et al. 2019 (KL penalty, adaptive controller),
Huang et al. 2022 "The N Implementation Details of RLHF with PPO", Schulman 2020 "Approximating KL divergence",
Ahmadian et al. 2024 (RLOO), Shao et al. 2024 (GRPO), Hu 2025 (REINFORCE++), Ouyang et al. 2022 (Bradley-Terry RM).
Critic-free estimators sample G replies per prompt: a batch of B = n_prompts * G rows holds each prompt's G replies
next to each other.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over positions where mask is 1."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over positions where mask is 1 (Bessel-corrected, as TRL's)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp_min(1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the mask. `shift_mean=False` adds the mean back: how rewards are whitened (their mean
    carries the signal), as in OpenAI's lm-human-preferences and TRL; advantages use the default."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log pi(token) under softmax(logits / temperature), the distribution the tokens were sampled from.

    logits (B, T, V), tokens (B, T) -> (B, T). Same temperature as sampling (Huang et al. 2022, "scale the logits by
    the sampling temperature"): otherwise the ratio and the KL are computed against a distribution that never
    generated the data.
    """
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return torch.gather(logp, 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) z, per position. (B, T, V) -> (B, T)."""
    z = logits.float() / temperature
    p = F.softmax(z, dim=-1)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log pi(a) - log pi_ref(a): unbiased, per token, can be negative on single samples (Schulman 2020)."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r - 1) - log r with r = pi_ref(a) / pi(a): unbiased and always >= 0 (Schulman 2020)."""
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


def per_token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, kl_coef: float, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """r_t = -kl_coef * KL_t on every response token, plus the RM score on the last one (Ziegler et al. 2019).

    scores (B,), kl (B, T), mask (B, T) -> (rewards (B, T), non_score_reward (B, T)).
    """
    non_score_reward = -kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp_min(0)  # index of the last response token (EOS, or the truncation point)
    rewards = non_score_reward.clone()
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, non_score_reward


def gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, vectorised (Schulman et al. 2016).

        delta_t = r_t + gamma * V_{t+1} - V_t          (V beyond the last response token is 0)
        A_t     = sum_{l >= t} (gamma * lam)^(l - t) * delta_l
        R_t     = A_t + V_t

    rewards, values, mask (B, T) -> advantages (B, T), returns (B, T); zero on padding. The discounted suffix sum is
    one matmul with the upper-triangular matrix D[l, t] = (gamma * lam)^(l - t) for l >= t.
    """
    values = values * mask
    rewards = rewards * mask
    next_values = torch.cat([values[:, 1:], torch.zeros_like(values[:, :1])], dim=1)
    deltas = (rewards + gamma * next_values - values) * mask
    T = rewards.shape[1]
    idx = torch.arange(T, device=rewards.device)
    power = (idx[:, None] - idx[None, :]).to(rewards.dtype)  # [l, t] = l - t
    discount = torch.where(power >= 0, (gamma * lam) ** power.clamp_min(0), torch.zeros_like(power))
    advantages = (deltas @ discount) * mask
    return advantages, (advantages + values) * mask


def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out (Ahmadian et al. 2024, "Back to Basics"): each reply's baseline is the mean reward of
    the other replies to the same prompt.

        A_i = R_i - 1/(G-1) * sum_{j != i} R_j

    rewards (B,) sequence-level (score minus the KL penalty), B = n_prompts * G -> advantages (B,).
    """
    r = rewards.view(-1, group_size)
    return (r - (r.sum(1, keepdim=True) - r) / (group_size - 1)).reshape(-1)


def grpo_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024, DeepSeekMath's GRPO): the reward standardised within its group.

        A_i = (R_i - mean_group(R)) / (std_group(R) + eps)

    rewards (B,), B = n_prompts * G -> advantages (B,). GRPO keeps the KL out of the reward and puts it in the loss.
    """
    r = rewards.view(-1, group_size)
    return ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + eps)).reshape(-1)


def reinforce_pp_advantages(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): returns-to-go of the KL-penalised per-token rewards, whitened over the whole batch
    (a global baseline instead of a critic or a group).

        G_t = sum_{l >= t} gamma^(l - t) r_l;     A = whiten(G) over all response tokens of the batch

    rewards, mask (B, T) -> advantages (B, T), zero on padding.
    """
    T = rewards.shape[1]
    idx = torch.arange(T, device=rewards.device)
    power = (idx[:, None] - idx[None, :]).to(rewards.dtype)  # [l, t] = l - t
    discount = torch.where(power >= 0, gamma ** power.clamp_min(0), torch.zeros_like(power))
    returns = ((rewards * mask) @ discount) * mask
    return masked_whiten(returns, mask)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """The reward model's loss (Ouyang et al. 2022, eq. 1; what TRL's RewardTrainer minimises):

        L = -mean( log sigmoid(r_chosen - r_rejected - margin) )

    r_chosen, r_rejected (B,) -> ().
    """
    return -F.logsigmoid(r_chosen - r_rejected - margin).mean()


@dataclass(frozen=True)
class PolicyLoss:
    loss: torch.Tensor
    clipfrac: torch.Tensor
    approxkl: torch.Tensor
    ratio: torch.Tensor


def clipped_policy_loss(
    logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, cliprange: float
) -> PolicyLoss:
    """PPO's clipped surrogate (Schulman et al. 2017, eq. 7), as a loss to minimise:

        ratio = exp(logp - logp_old)
        L = mean( max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)) )

    All (B, T) -> scalars. approxkl = mean(0.5 * (logp - logp_old)^2), the early-stopping diagnostic.
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    pg_loss1 = -advantages * ratio
    pg_loss2 = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.max(pg_loss1, pg_loss2), mask)
    clipfrac = masked_mean((pg_loss2 > pg_loss1).float(), mask)
    approxkl = 0.5 * masked_mean(log_ratio**2, mask)
    return PolicyLoss(loss, clipfrac, approxkl, masked_mean(ratio, mask))


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, cliprange_value: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss (Huang et al. 2022, "value function loss clipping"; OpenAI's baselines PPO2):

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L_V = 0.5 * mean( max((V - R)^2, (V_clip - R)^2) )

    All (B, T) -> (loss, clipfrac).
    """
    v_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    vf_loss1 = (values - returns) ** 2
    vf_loss2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(vf_loss1, vf_loss2), mask)
    clipfrac = masked_mean((vf_loss2 > vf_loss1).float(), mask)
    return loss, clipfrac


class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, kl_coef: float) -> None:
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = state["value"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. 2019, section 2.2: steer the KL toward `target` with a proportional controller.

    e = clip(KL / target - 1, -0.2, 0.2);   beta <- beta * (1 + e * n_steps / horizon)
    """

    def __init__(self, kl_coef: float, target: float, horizon: float) -> None:
        super().__init__(kl_coef)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
