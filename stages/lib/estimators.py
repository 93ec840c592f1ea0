"""PPO's advantage estimators as a table: what the loop in stages/ppo.py needs to know of each, and nothing else.

    estimator     critic  replies per prompt  advantages (B, T)                                        KL to the ref
    gae           yes     1                   GAE(lambda) of the KL-penalised per-token rewards,       per-token reward
                                              whitened (Schulman et al. 2016; Ziegler et al. 2019)
    rloo          no      G                   R_i - mean_{j != i} R_j with R = score - kl_coef sum k1  in R
                                              (Ahmadian et al. 2024)
    grpo          no      G                   (s_i - mean s) / std s within the prompt's group         k3 loss term
                                              (Shao et al. 2024)
    reinforce_pp  no      1                   returns-to-go of the KL-penalised per-token rewards,     per-token reward
                                              whitened over the batch (Hu 2025)

The math is in stages/lib/rl_math.py; an estimator only picks it and says how the rollout is laid out. Adding one is
a function and a row in `ESTIMATORS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from stages.lib import rl_math as pm


@dataclass(frozen=True)
class Batch:
    """What an estimator reads of one scored rollout (B rollouts, T response tokens)."""

    rewards: torch.Tensor  # (B, T) -kl_coef * k1_t, plus the score on the last token
    non_score: torch.Tensor  # (B, T) the KL part of `rewards` alone
    scores: torch.Tensor  # (B,) the reward model's normalised score
    values: torch.Tensor  # (B, T) the critic's V(s_t) (zeros without a critic)
    mask: torch.Tensor  # (B, T) 1 up to and including the first EOS
    gamma: float
    lam: float
    group_size: int  # G consecutive rows share a prompt (1 for the ungrouped estimators)


Advantages = Callable[[Batch], tuple[torch.Tensor, torch.Tensor]]  # -> (advantages (B, T), critic returns (B, T))


@dataclass(frozen=True)
class Estimator:
    name: str
    critic: bool  # a value model is trained beside the policy (one model more to hold and update)
    grouped: bool  # G replies per prompt: the batch holds batch_size / G prompts, each repeated G times in a row
    kl_in_loss: bool  # the KL to the reference is a k3 loss term, not a per-token reward penalty
    advantages: Advantages

    def replies_per_prompt(self, group_size: int) -> int:
        return group_size if self.grouped else 1


def _gae(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    advantages, returns = pm.gae(b.rewards, b.values, b.mask, b.gamma, b.lam)
    return pm.masked_whiten(advantages, b.mask), returns


def _rloo(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    sequence = pm.rloo_advantages(b.scores + b.non_score.sum(1), b.group_size)  # (B,), R includes the KL
    return sequence[:, None] * b.mask, torch.zeros_like(b.rewards)


def _grpo(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    sequence = pm.grpo_advantages(b.scores, b.group_size)  # (B,), the KL is a loss term instead
    return sequence[:, None] * b.mask, torch.zeros_like(b.rewards)


def _reinforce_pp(b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    return pm.reinforce_pp_advantages(b.rewards, b.mask, b.gamma), torch.zeros_like(b.rewards)


ESTIMATORS: dict[str, Estimator] = {
    e.name: e
    for e in (
        Estimator("gae", critic=True, grouped=False, kl_in_loss=False, advantages=_gae),
        Estimator("rloo", critic=False, grouped=True, kl_in_loss=False, advantages=_rloo),
        Estimator("grpo", critic=False, grouped=True, kl_in_loss=True, advantages=_grpo),
        Estimator("reinforce_pp", critic=False, grouped=False, kl_in_loss=False, advantages=_reinforce_pp),
    )
}
