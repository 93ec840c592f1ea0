"""PPO stage: the policy climbs the reward model with a per-token KL penalty to the frozen SFT reference.

Follows "The N Implementation Details of RLHF with PPO" (Huang et al. 2022) and TRL's last PPOTrainer, departing
where noted: the KL guard (stop and roll back when KL runs away, a distinct outcome rather than a crash), exact
resume (RNG, optimiser, scheduler, KL controller and data position are checkpointed), and a vectorised GAE.

    rewards_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t))   (+ RM score on the last token)
    loss      = clipped surrogate + vf_coef * clipped value loss - ent_coef * entropy

One PPO step, as the loop in `train` numbers it: 1. generate, 2. score, 3. KL-penalise, 4. GAE, 5. PPO epochs,
6. metrics, 7. KL guard. Shapes: B rollouts in this process, T response tokens, Lq query tokens, L = Lq + T.

Runs in one process by default and unchanged on several: `accelerate launch --multi_gpu --num_processes 2
--num_machines 1 --mixed_precision no --dynamo_backend no -m stages.ppo` on CPUs (accelerate's `--cpu` flag alone
silently starts one process); rollouts are split across processes and gradients averaged by DDP over gloo.
"""

from __future__ import annotations

import csv
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from stages.lib import context, estimators, modeling, rewards
from stages.lib import rl_math as pm
from stages.lib.checkpoints import Checkpointer, fingerprint, rng_state, set_rng_state
from stages.lib.estimators import ESTIMATORS, Batch, Estimator
from stages.lib.heldout import Sampling, better_beyond_noise, monitor_scores
from stages.lib.io import read_jsonl, staged_dir, write_json, write_jsonl
from stages.lib.judge import GoldJudge, Judge, load_judge
from stages.lib.modeling import (
    LoraSettings,
    autocast,
    fuse_gelu,
    peft_config,
    position_ids,
    use_hardware,
)
from stages.lib.outcome import ArgumentParser, BadInput, GateFailed, NonFinite, stage_main
from stages.lib.params import (
    AT_LEAST_ONE,
    FRACTION,
    NON_NEGATIVE,
    POSITIVE,
    Allowed,
    config_from,
    load_params,
    one_of,
)
from stages.lib.plots import line_plot
from stages.lib.rewards import RewardEnsemble, RewardModel
from stages.lib.tracking import NullTracker, Tracker, mlflow_run


@dataclass(frozen=True)
class KLGuardConfig:
    """The KL budget: `patience` consecutive steps over it stop the run and restore the last step within it."""

    max_kl: float  # objective/kl: mean over rollouts of the summed per-token k1 KL (nats)
    max_approxkl: float  # policy/approxkl_avg: how far one update moved the policy
    patience: int

    SECTION: ClassVar[str] = "ppo.kl_guard"
    RANGES: ClassVar[dict] = {"max_kl": POSITIVE, "max_approxkl": POSITIVE, "patience": AT_LEAST_ONE}


@dataclass(frozen=True)
class PPOConfig:
    """params.yaml: ppo. Defaults follow the N implementation details, scaled to the tiny default task."""

    seed: int
    num_steps: int  # PPO batches: rollout, score, update
    batch_size: int  # rollouts per step, over all processes
    num_mini_batches: int
    ppo_epochs: int
    learning_rate: float
    response_length: int
    temperature: float
    top_k: int
    top_p: float
    missing_eos_penalty: float  # subtracted from the score of a response that never ends
    ensemble_penalty: float  # with a reward ensemble: the score is the members' mean minus this times their spread
    kl_coef: float
    adaptive_kl: bool
    kl_target: float  # adaptive controller (Ziegler et al. 2019)
    kl_horizon: float
    gamma: float
    lam: float
    cliprange: float
    cliprange_value: float
    vf_coef: float
    ent_coef: float
    max_grad_norm: float
    whiten_rewards: bool
    value_init: str  # reward | sft: where the critic starts (gae only)
    estimator: str  # gae (PPO's critic) | rloo | grpo | reinforce_pp (critic-free: no value model at all)
    group_size: int  # rloo, grpo: replies sampled per prompt (the batch holds batch_size / group_size prompts)
    keep: str  # best: the checkpoint with the best held-out judge score (all are within the KL budget); last
    checkpoint_every: int
    keep_checkpoints: int  # full checkpoints kept (policy, critic, optimiser); older ones are pruned
    checkpoint_dir: str
    resume: str  # auto: continue from the last checkpoint of the same run; never: start over
    sample_every: int
    n_monitor: int  # distinct held-out prompts scored by the RM and the judge at every checkpoint ...
    monitor_samples: int  # ... with this many replies each: the over-optimisation monitor and keep: best
    keep_z: float  # keep: best keeps an earlier checkpoint only if it beats the last by more than z standard errors
    threads: int  # torch threads per process (0: torch's default)
    kl_guard: KLGuardConfig
    lora: LoraSettings  # LoRA policy; its frozen base is the reference

    SECTION: ClassVar[str] = "ppo"
    RANGES: ClassVar[dict] = {
        "seed": NON_NEGATIVE,
        "num_steps": AT_LEAST_ONE,
        "batch_size": AT_LEAST_ONE,
        "num_mini_batches": AT_LEAST_ONE,
        "ppo_epochs": AT_LEAST_ONE,
        "learning_rate": POSITIVE,
        "response_length": AT_LEAST_ONE,
        "temperature": POSITIVE,  # log-probs are divided by it
        "top_k": NON_NEGATIVE,
        "top_p": Allowed(0, 1, low_open=True),
        "missing_eos_penalty": NON_NEGATIVE,
        "ensemble_penalty": NON_NEGATIVE,
        "kl_coef": NON_NEGATIVE,
        "kl_target": POSITIVE,
        "kl_horizon": POSITIVE,
        "gamma": FRACTION,
        "lam": FRACTION,
        "cliprange": POSITIVE,
        "cliprange_value": POSITIVE,
        "vf_coef": NON_NEGATIVE,
        "ent_coef": NON_NEGATIVE,
        "max_grad_norm": POSITIVE,
        "value_init": one_of("reward", "sft"),
        "checkpoint_every": AT_LEAST_ONE,
        "keep_checkpoints": AT_LEAST_ONE,
        "resume": one_of("auto", "never"),
        "sample_every": AT_LEAST_ONE,
        "n_monitor": NON_NEGATIVE,
        "monitor_samples": AT_LEAST_ONE,
        "keep_z": NON_NEGATIVE,
        "threads": NON_NEGATIVE,
        "estimator": one_of(*ESTIMATORS),
        "group_size": AT_LEAST_ONE,
        "keep": one_of("best", "last"),
    }

    def __post_init__(self) -> None:
        if ESTIMATORS[self.estimator].grouped and (self.group_size < 2 or self.batch_size % self.group_size):
            raise ValueError(
                f"ppo.group_size {self.group_size} must be at least 2 and divide ppo.batch_size "
                f"{self.batch_size} for {self.estimator}"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------------------


class PolicyAndValue(nn.Module):
    """One module for DDP: the policy's logits and, for GAE, the critic's per-token values in one forward. The
    critic-free estimators have no value model (`value_model=None`): one model less to hold and update."""

    def __init__(self, policy: nn.Module, value_model: nn.Module | None) -> None:
        super().__init__()
        self.policy = policy
        self.has_critic = value_model is not None
        if value_model is not None:
            self.critic_backbone = getattr(value_model, value_model.base_model_prefix)
            self.critic_head = value_model.score

    def forward(self, input_ids, attention_mask, position_ids, keep: int = 0):  # noqa: ANN001
        """Logits of the last `keep` positions (0: all; the responses' only: the lm_head skips the prompt, whose
        logits PPO never reads) and the critic's values at every position."""
        logits = self.policy(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=keep
        ).logits
        return logits, self.values(input_ids, attention_mask, position_ids)

    def values(self, input_ids, attention_mask, position_ids):  # noqa: ANN001
        """The critic alone: V(s_t) per token, (B, L) -> (B, L); zeros without a critic."""
        if not self.has_critic:
            return torch.zeros(input_ids.shape, dtype=torch.float32, device=input_ids.device)
        hidden = self.critic_backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
        ).last_hidden_state
        return self.critic_head(hidden).squeeze(-1)


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratios and KL assume deterministic forwards (Huang et al. 2022, "disable dropout")."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def accelerator_options() -> dict[str, bool]:
    """Accelerate on the stage's device (params.yaml `device`): the CPU said explicitly, else the process's GPU."""
    return {"cpu": modeling.current_device().type == "cpu"}


def load_models(
    config: PPOConfig, sft_dir: Path, rm_dir: Path, norm_file: Path, start_dir: Path | None = None
) -> tuple[PolicyAndValue, nn.Module | None, RewardModel, Any]:
    """(trainable policy + critic, the frozen reference or None when LoRA's base serves, the frozen RM, tokenizer).
    The policy starts from `start_dir` (a later round: the previous round's policy) or SFT; the reference is SFT."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    policy, tokenizer = modeling.load_causal_lm(start_dir or sft_dir)
    lora = config.lora
    if lora.enabled and start_dir is not None:
        raise BadInput(
            "ppo.lora with several rounds: the adapter's frozen base would be the previous round's policy, "
            "not the SFT reference; set comparisons.rounds: 1 or ppo.lora.enabled: false"
        )
    if lora.enabled:  # the frozen base doubles as the reference: no second full copy
        from peft import get_peft_model

        policy, ref_policy = get_peft_model(policy, peft_config(lora, "CAUSAL_LM", policy)), None
    else:
        ref_policy = AutoModelForCausalLM.from_pretrained(sft_dir, use_safetensors=True)
        ref_policy = modeling.to_device(ref_policy.requires_grad_(False).eval())
    value_model = None
    if ESTIMATORS[config.estimator].critic:
        value_src = rm_dir if config.value_init == "reward" else sft_dir
        value_model = AutoModelForSequenceClassification.from_pretrained(value_src, num_labels=1, use_safetensors=True)
    rm = RewardEnsemble.load_all(rm_dir, norm_file, config.ensemble_penalty)
    for m in (policy, value_model, *rm.models, ref_policy):
        if m is not None:
            disable_dropout(m)
            fuse_gelu(m)
    return PolicyAndValue(policy, value_model), ref_policy, rm, tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# One PPO step, phase by phase
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """Sampled responses and everything the update needs about them (B rollouts, T response tokens)."""

    prompts: list[str]
    responses: torch.Tensor  # (B, T), padded after the first EOS
    mask: torch.Tensor  # (B, T) 1 up to and including the first EOS
    has_eos: torch.Tensor  # (B,)
    seq: torch.Tensor  # (B, L) query + response
    attn: torch.Tensor  # (B, L)
    pos: torch.Tensor  # (B, L) positions that skip the left padding
    query_len: int  # Lq
    gen_logits: torch.Tensor  # (B, T, V) the raw logits each token was sampled from

    @property
    def logits_kept(self) -> int:
        """T + 1: the positions Lq-1 .. L-1 whose logits a forward keeps (`logits_to_keep`): each response token's,
        and one more; the lm_head skips the prompt, whose logits PPO never reads."""
        return self.responses.shape[1] + 1


def first_eos_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over tokens up to and including the first EOS, whether an EOS occurred). (B, T) -> (B, T), (B,)."""
    is_eos = responses == eos_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).float(), is_eos.any(1)


@torch.no_grad()
def generate_rollouts(policy: nn.Module, tokenizer: Any, prompts: list[str], config: PPOConfig) -> Rollout:
    """1. Sample responses with a KV cache from left-padded prompts, keeping the logits they were sampled from."""
    enc = tokenizer(prompts, return_tensors="pt", padding=True).to(next(policy.parameters()).device)
    queries, qmask = enc["input_ids"], enc["attention_mask"]
    policy.eval()
    out = policy.generate(
        input_ids=queries,
        attention_mask=qmask,
        max_new_tokens=config.response_length,
        do_sample=True,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,  # top_k 0: no top-k (None means 50)
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        return_dict_in_generate=True,
        output_logits=True,
    )
    responses = out.sequences[:, queries.shape[1] :]
    mask, has_eos = first_eos_mask(responses, tokenizer.eos_token_id)
    responses = torch.where(mask.bool(), responses, torch.full_like(responses, tokenizer.pad_token_id))
    attn = torch.cat([qmask, mask.long()], 1)
    # the raw logits (before temperature/top-k/top-p), which TRL reuses too: (B, T, V)
    return Rollout(
        prompts,
        responses,
        mask,
        has_eos,
        torch.cat([queries, responses], 1),
        attn,
        position_ids(attn),
        queries.shape[1],
        torch.stack(out.logits, 1),
    )


@dataclass
class Scored:
    logprobs: torch.Tensor  # (B, T) the policy's, under the sampling temperature
    ref_logprobs: torch.Tensor  # (B, T) the reference's
    values: torch.Tensor  # (B, T) the critic's V(s_t)
    raw_scores: torch.Tensor  # (B,) the RM's score of the whole sequence
    scores: torch.Tensor  # (B,) normalised by norm.json, minus the missing-EOS penalty
    spread: torch.Tensor | None  # (B,) a reward ensemble's members' standard deviation (None: one reward model)


@torch.no_grad()
def score_rollouts(
    model: PolicyAndValue, ref_policy: nn.Module | None, rm: RewardModel, ro: Rollout, config: PPOConfig
) -> Scored:
    """2. Policy and reference log-probs, values, and the RM's score. The policy's log-probs come from the
    generation's logits (same tokens, positions and temperature as a forward over `seq`; equal up to float rounding,
    ~1e-6), as in TRL: no second policy forward."""
    Lq = ro.query_len
    logprobs = pm.logprobs_from_logits(ro.gen_logits, ro.responses, config.temperature) * ro.mask
    values = model.values(ro.seq, ro.attn, ro.pos)[:, Lq - 1 : -1] * ro.mask
    inputs = {"input_ids": ro.seq, "attention_mask": ro.attn, "position_ids": ro.pos, "logits_to_keep": ro.logits_kept}
    if ref_policy is None:
        with model.policy.disable_adapter():
            ref_logits = model.policy(**inputs).logits
    else:
        ref_logits = ref_policy(**inputs).logits
    ref_logprobs = pm.logprobs_from_logits(ref_logits[:, :-1], ro.responses, config.temperature) * ro.mask
    raw_scores, spread = rm.score_and_spread(ro.seq, ro.attn, Lq + ro.mask.sum(1).long() - 1)
    scores = rm.normalise(raw_scores)
    scores = torch.where(ro.has_eos, scores, scores - config.missing_eos_penalty)
    return Scored(logprobs, ref_logprobs, values, raw_scores, scores, spread)


def kl_penalised_rewards(sc: Scored, mask: torch.Tensor, kl_coef: float, config: PPOConfig, step: int) -> tuple:
    """3. r_t = -kl_coef * k1_t on every response token, plus the score on the last one. Returns
    (rewards (B, T), non-score rewards (B, T), k1 (B, T))."""
    kl = pm.kl_k1(sc.logprobs, sc.ref_logprobs) * mask
    rewards, non_score = pm.per_token_rewards(sc.scores, kl, kl_coef, mask)
    if config.whiten_rewards:
        rewards = pm.masked_whiten(rewards, mask, shift_mean=False)
    if not (torch.isfinite(rewards).all() and torch.isfinite(sc.values).all()):
        raise NonFinite(f"non-finite rewards or values at PPO step {step}")
    return rewards, non_score, kl


def estimate_advantages(
    estimator: Estimator,
    config: PPOConfig,
    sc: Scored,
    mask: torch.Tensor,
    rewards: torch.Tensor,
    non_score: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """4. Advantages (B, T) and the critic's returns (B, T; zeros without a critic): the estimator's own
    (stages/lib/estimators.py)."""
    batch = Batch(rewards, non_score, sc.scores, sc.values, mask, config.gamma, config.lam, config.group_size)
    return estimator.advantages(batch)


def ppo_epochs(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    accelerator: Any,
    ro: Rollout,
    sc: Scored,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    config: PPOConfig,
    generator: torch.Generator,
    step: int,
) -> dict[str, list[float]]:
    """5. `ppo_epochs` passes over random minibatches: clipped surrogate + vf_coef * clipped value loss (GAE's critic)
    + kl_coef * k3 KL to the reference (GRPO) - ent_coef * entropy. Returns the per-minibatch statistics."""
    Lq, mb_size = ro.query_len, max(1, len(ro.prompts) // config.num_mini_batches)
    critic = accelerator.unwrap_model(model).has_critic
    model.train()
    stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clip", "vclip", "approxkl", "ent", "ratio")}
    for _ in range(config.ppo_epochs):
        perm = torch.randperm(len(ro.prompts), generator=generator)
        for i in range(0, len(perm), mb_size):
            mb = perm[i : i + mb_size]
            new_logits, new_values = model(ro.seq[mb], ro.attn[mb], ro.pos[mb], ro.logits_kept)
            new_logits = new_logits[:, :-1]  # positions Lq-1 .. L-2: each response token's logits
            new_logprobs = pm.logprobs_from_logits(new_logits, ro.responses[mb], config.temperature)
            pg = pm.clipped_policy_loss(new_logprobs, sc.logprobs[mb], advantages[mb], ro.mask[mb], config.cliprange)
            with torch.set_grad_enabled(config.ent_coef != 0):  # a diagnostic only when it has no weight (as TRL)
                entropy = pm.masked_mean(pm.entropy_from_logits(new_logits, config.temperature), ro.mask[mb])
            loss = pg.loss - config.ent_coef * entropy
            if critic:
                vf_loss, vf_clip = pm.clipped_value_loss(
                    new_values[:, Lq - 1 : -1], sc.values[mb], returns[mb], ro.mask[mb], config.cliprange_value
                )
                loss = loss + config.vf_coef * vf_loss
            else:
                vf_loss = vf_clip = torch.zeros(())
            if ESTIMATORS[config.estimator].kl_in_loss:  # GRPO's KL: k3 against the reference (Shao et al. 2024)
                loss = loss + config.kl_coef * pm.masked_mean(pm.kl_k3(new_logprobs, sc.ref_logprobs[mb]), ro.mask[mb])
            if not torch.isfinite(loss):
                raise NonFinite(f"the PPO loss became {loss.item()} at step {step}")
            optimizer.zero_grad()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            # autocast keeps one bf16/fp16 copy of each weight for as long as its `with` lasts (main's: the whole run):
            # dropped after every step, or every later forward would still see the weights before it
            torch.clear_autocast_cache()
            for k, v in zip(
                stats, (pg.loss, vf_loss, pg.clipfrac, vf_clip, pg.approxkl, entropy, pg.ratio), strict=True
            ):
                stats[k].append(v.item())
    return stats


def step_metrics(
    accelerator: Any,
    ro: Rollout,
    sc: Scored,
    kl: torch.Tensor,
    non_score: torch.Tensor,
    returns: torch.Tensor,
    stats: dict[str, list[float]],
    critic: bool,
) -> dict[str, float]:
    """6. TRL's metric names, averaged over processes (the critic's `val/*` are 0 without one)."""
    mask, var_y = ro.mask, pm.masked_var(returns, ro.mask)
    mean = {k: torch.tensor(np.mean(v)) for k, v in stats.items()}
    local = {
        "objective/kl": kl.sum(1).mean(),
        "objective/kl_k3": (pm.kl_k3(sc.logprobs, sc.ref_logprobs) * mask).sum(1).mean(),
        "objective/entropy": (-sc.logprobs).sum(1).mean(),
        "objective/scores": sc.scores.mean(),
        "objective/non_score_reward": non_score.sum(1).mean(),
        "objective/rlhf_reward": (sc.scores + non_score.sum(1)).mean(),
        "objective/raw_scores": sc.raw_scores.mean(),
        "policy/approxkl_avg": mean["approxkl"],
        "policy/clipfrac_avg": mean["clip"],
        "policy/entropy_avg": mean["ent"],
        "val/clipfrac_avg": mean["vclip"],
        "val/ratio": mean["ratio"],
        "val/var_explained": (1 - pm.masked_var(returns - sc.values, mask) / var_y.clamp_min(1e-8))
        if critic
        else torch.tensor(0.0),
        "loss/policy_avg": mean["pg"],
        "loss/value_avg": mean["vf"],
        "tokens/response_len_mean": mask.sum(1).mean(),
        "val/num_eos_tokens": ro.has_eos.float().sum(),
    }
    if sc.spread is not None:  # a reward ensemble: how much its members disagree on the policy's replies
        local["objective/rm_spread"] = sc.spread.mean()
    reduced = accelerator.reduce(torch.stack([v.float().to(accelerator.device) for v in local.values()]), "mean")
    metrics = {k: round(v, 6) for k, v in zip(local, reduced.tolist(), strict=True)}
    metrics["val/num_eos_tokens"] *= accelerator.num_processes  # a count, not a mean
    return metrics


class KLGuard:
    """7. `patience` consecutive steps over the KL budget stop the run (it is rolled back to the last checkpoint
    within the budget)."""

    def __init__(self, config: KLGuardConfig, violations: int = 0) -> None:
        self.config, self.violations = config, violations

    def over(self, metrics: dict[str, float]) -> list[str]:
        """What this step's metrics break; it counts towards `patience` (an empty list resets the count)."""
        c, over = self.config, []
        if metrics["objective/kl"] > c.max_kl:
            over.append(f"objective/kl {metrics['objective/kl']:.3f} > max_kl {c.max_kl}")
        if metrics["policy/approxkl_avg"] > c.max_approxkl:
            over.append(f"policy/approxkl_avg {metrics['policy/approxkl_avg']:.4f} > max_approxkl {c.max_approxkl}")
        self.violations = self.violations + 1 if over else 0
        return over

    @property
    def tripped(self) -> bool:
        return self.violations >= self.config.patience


# ---------------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights and optimiser: progress, history and the guard's count."""

    step: int = 0
    history: list[dict[str, float]] = field(default_factory=list)
    samples: list[dict[str, Any]] = field(default_factory=list)
    monitor: list[dict[str, Any]] = field(default_factory=list)
    last_good: int = 0  # the newest checkpointed step within the KL budget: where a rollback goes
    best_step: int = 0  # the checkpointed step with the best held-out judge score so far (kept from pruning)
    best_judge: float | None = None
    truncated_prompts: int = 0  # PPO prompts cut to fit the context (their last turns kept)


def group_size(config: PPOConfig) -> int:
    """Replies sampled per prompt: the group estimators' G, else 1."""
    return ESTIMATORS[config.estimator].replies_per_prompt(config.group_size)


def batch_prompts(prompts: list[str], step: int, config: PPOConfig, rank: int, world: int) -> list[str]:
    """This process's prompts for `step` (each repeated G times in a row for the group estimators): a seeded
    shuffle per epoch, so the data position is a pure function of the step (exact resume needs nothing else)."""
    g = group_size(config)
    per_step = config.batch_size // g  # distinct prompts per step, over all processes
    steps_per_epoch = max(1, len(prompts) // per_step)
    epoch, k = divmod(step, steps_per_epoch)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.seed + epoch))
    local = per_step // world
    start = k * per_step + rank * local
    return [prompts[i] for i in order[start : start + local] for _ in range(g)]


def checkpointer(config: PPOConfig, inputs: list[Path]) -> Checkpointer:
    """This run's checkpoints: their folder is named by a fingerprint of the results-relevant settings (a changed
    checkpoint cadence, guard or monitor size resumes the same run), the input files and the code."""
    code = [
        Path(__file__),
        *(Path(m.__file__) for m in (pm, estimators, modeling, rewards, context)),
    ]  # new code: new run
    settings = {
        k: v
        for k, v in asdict(config).items()
        if k
        not in (
            "resume",
            "checkpoint_dir",
            "checkpoint_every",
            "keep_checkpoints",
            "sample_every",
            "kl_guard",
            "n_monitor",
        )
    }
    return Checkpointer(Path(config.checkpoint_dir), fingerprint(settings, inputs + code), config.keep_checkpoints)


def rollout_prompts(
    config: PPOConfig, policy: nn.Module, tokenizer: Any, path: Path, rm_window: int
) -> tuple[list[str], int]:
    """The PPO prompts within the context budget: each keeps its last turns in the room the response leaves
    (stages/lib/context.py) in the window the policy was fine-tuned at and the reward model scores (`rm_window`), so
    every rollout is a sequence both have learned. Returns (prompts, how many were cut)."""
    window = min(modeling.model_context(policy, tokenizer), rm_window)
    if config.response_length >= window:
        raise BadInput(
            f"ppo.response_length {config.response_length} leaves no room for a prompt in the "
            f"context of {window} tokens (the policy's and the reward model's)"
        )
    return context.fit_prompts(tokenizer, [r["prompt"] for r in read_jsonl(path)], window - config.response_length)


@dataclass
class Session:
    """Everything one PPO run holds: the models, the optimiser and its schedule, the KL controller, the checkpoints,
    the progress, the guard and the over-optimisation monitor. The loop (`train`) reads and updates it."""

    config: PPOConfig
    accelerator: Any
    model: nn.Module  # PolicyAndValue, prepared by accelerate (DDP over several processes)
    ref_policy: nn.Module | None
    rm: RewardModel
    tokenizer: Any
    optimizer: torch.optim.Optimizer
    scheduler: Any
    kl_ctl: pm.FixedKLController
    ckpt: Checkpointer
    tracker: Tracker
    judge: Judge
    monitor_prompts: list[str]
    state: TrainState = field(default_factory=TrainState)
    guard: KLGuard | None = None

    @property
    def unwrapped(self) -> PolicyAndValue:
        return self.accelerator.unwrap_model(self.model)

    def save_checkpoint(self, step: int) -> None:
        acc = self.accelerator
        rngs = (
            [rng_state()] if acc.num_processes == 1 else acc.gather_for_metrics([rng_state()], use_gather_object=True)
        )
        if acc.is_main_process:
            saved = {
                "model": trained_state(self.unwrapped, self.config.lora.enabled),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "kl_ctl": self.kl_ctl.state_dict(),
                "rng": rngs,
                "state": asdict(self.state),
                "violations": self.guard.violations,
                "config": asdict(self.config),
            }
            self.ckpt.save(step, saved, protect=self.state.best_step if self.config.keep == "best" else None)
        acc.wait_for_everyone()

    def resume(self) -> bool:
        """Continue from the newest checkpoint of this run (resume: auto); False when there is none."""
        found = self.ckpt.latest() if self.config.resume == "auto" else None
        if found is None:
            return False
        saved = Checkpointer.load(found[1])
        load_trained_state(self.unwrapped, saved["model"], self.config.lora.enabled)
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.kl_ctl.load_state_dict(saved["kl_ctl"])
        set_rng_state(saved["rng"][min(self.accelerator.process_index, len(saved["rng"]) - 1)])
        self.state, self.guard.violations = TrainState(**saved["state"]), saved["violations"]
        self.accelerator.print(f"resuming PPO from {found[1]} (step {self.state.step})")
        return True

    def checkpoint(self, step: int) -> None:
        """Score the policy on held-out prompts (the over-optimisation monitor: the RM and the judge), then save."""
        config, state = self.config, self.state
        if self.accelerator.is_main_process and config.n_monitor:
            sampling = Sampling(config.response_length, config.temperature, config.top_k, config.top_p, config.seed)
            scores = monitor_scores(
                self.unwrapped.policy, self.tokenizer, self.rm, self.judge, self.monitor_prompts, sampling
            )
            point = {"step": step, **scores}
            point.pop("eos_rate")
            state.monitor.append(point)
            monitored = {f"monitor/{k}": point[k] for k in ("rm_score", "judge") if point[k] is not None}
            self.tracker.log_metrics(monitored, step)
            if state.best_judge is None or point["judge"] > state.best_judge:
                state.best_step, state.best_judge = step, point["judge"]
        state.step, state.last_good = step, step
        self.save_checkpoint(step)


def trained_state(model: nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """The weights a checkpoint keeps: all of them; with LoRA only what trains (adapters, and a critic if any), since
    the frozen base is the SFT model every run of this fingerprint starts from (a few MB, not ~540 MB, at 135M)."""
    state = model.state_dict()
    if not lora:
        return state
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in state.items() if k in trained}


def load_trained_state(model: nn.Module, state: dict[str, torch.Tensor], lora: bool) -> None:
    """Load what `trained_state` kept; with LoRA the frozen base stays as loaded (a missing trained weight fails)."""
    missing = model.load_state_dict(state, strict=not lora).missing_keys
    torch.clear_autocast_cache()  # the weights changed in place: no forward may use autocast's copy of the old ones
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    if lost := sorted(trained & set(missing)):
        raise RuntimeError(f"checkpoint lacks trained weights {lost[:3]}...: it is not this run's")


def start(
    config: PPOConfig,
    data_dir: Path,
    sft_dir: Path,
    rm_dir: Path,
    norm_file: Path,
    tracker: Tracker,
    judge: Judge,
    start_dir: Path | None = None,
) -> Session:
    """0. Models, optimiser, schedule, KL controller and checkpoints; resumed when this run was interrupted."""
    from accelerate import Accelerator

    accelerator = Accelerator(**accelerator_options())
    torch.manual_seed(config.seed + accelerator.process_index)  # each process samples its own rollouts
    model, ref_policy, rm, tokenizer = load_models(config, sft_dir, rm_dir, norm_file, start_dir)
    # fused: one multi-tensor kernel per step instead of ~10 small ops per parameter (TRL/HF Trainer: adamw_torch_fused)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, eps=1e-5, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / config.num_steps)  # linear anneal
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = (
        pm.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        if config.adaptive_kl
        else pm.FixedKLController(config.kl_coef)
    )
    inputs = [sft_dir / "model.safetensors", rm_dir / "model.safetensors", norm_file, data_dir / "prompts.jsonl"]
    inputs += [start_dir / "model.safetensors"] if start_dir is not None else []
    ckpt = checkpointer(config, inputs)
    tracker = tracker if accelerator.is_main_process else NullTracker()
    tracker.log_params({"ppo": asdict(config), "run_fingerprint": ckpt.dir.name})
    # a validation set: held-out prompts, not the evaluation's own (which picks no checkpoint and so stays unbiased)
    distinct = list(dict.fromkeys(r["prompt"] for r in read_jsonl(data_dir / "sft_test.jsonl")))[: config.n_monitor]
    heldout = [p for p in distinct for _ in range(config.monitor_samples)]
    models = (model, ref_policy, rm, tokenizer)
    monitor = heldout if config.n_monitor else []
    session = Session(config, accelerator, *models, optimizer, scheduler, kl_ctl, ckpt, tracker, judge, monitor)
    session.guard = KLGuard(config.kl_guard)
    if not session.resume():
        session.checkpoint(0)  # the SFT policy: always a within-budget state to roll back to
    return session


def run(
    config: PPOConfig,
    data_dir: Path,
    sft_dir: Path,
    rm_dir: Path,
    norm_file: Path,
    out_dir: Path,
    tracker: Tracker | None = None,
    judge: Judge | None = None,
    start_dir: Path | None = None,
) -> dict:
    """Train the policy (from `start_dir`, a previous round's policy, else SFT); write `out_dir` (model, metrics, KL
    table, samples, plots). Returns metrics.json's content. Raises `GateFailed` after writing the rolled-back policy
    when the KL guard stopped the run."""
    if config.threads:
        torch.set_num_threads(config.threads)
    random.seed(config.seed)
    np.random.seed(config.seed)
    tracker = tracker if tracker is not None else NullTracker()
    s = start(config, data_dir, sft_dir, rm_dir, norm_file, tracker, judge or GoldJudge(), start_dir)
    prompts, s.state.truncated_prompts = rollout_prompts(
        config, s.unwrapped.policy, s.tokenizer, data_dir / "prompts.jsonl", s.rm.max_length
    )
    outcome, reason = train(s, prompts)
    return finish(config, s.accelerator, s.model, s.ckpt, s.state, outcome, reason, s.tokenizer, out_dir, s.tracker)


def step_timing(
    config: PPOConfig, s: Session, step: int, n_tokens: float, t: tuple[float, float, float, float]
) -> dict[str, float]:
    """The step's bookkeeping metrics beside TRL's: KL coefficient, learning rate, episodes, times, tokens/s."""
    t0, t1, t2, t3 = t
    return {
        "objective/kl_coef": s.kl_ctl.value,
        "lr": s.scheduler.get_last_lr()[0],
        "step": step + 1,
        "episodes": (step + 1) * config.batch_size,
        "time/generation": t1 - t0,
        "time/scoring": t2 - t1,
        "time/update": t3 - t2,
        "time/step": t3 - t0,
        "tokens/per_second": n_tokens / (t3 - t0),
        "tokens/per_second_generation": n_tokens / (t1 - t0),
    }


def train(s: Session, prompts: list[str]) -> tuple[str, str]:
    """The PPO loop from `state.step` to `num_steps`; returns (outcome, reason)."""
    from tqdm.auto import tqdm

    config, state, estimator = s.config, s.state, ESTIMATORS[s.config.estimator]
    rank, world = s.accelerator.process_index, s.accelerator.num_processes
    steps = range(state.step, config.num_steps)
    bar = tqdm(steps, desc="PPO", disable=not s.accelerator.is_main_process, initial=state.step, total=config.num_steps)
    for step in bar:
        t0 = time.perf_counter()
        # 1. generate                                                                             (B, T)
        ro = generate_rollouts(
            s.unwrapped.policy, s.tokenizer, batch_prompts(prompts, step, config, rank, world), config
        )
        t1 = time.perf_counter()
        # 2. score: log-probs, reference log-probs, values (B, T); RM scores (B,)
        sc = score_rollouts(s.unwrapped, s.ref_policy, s.rm, ro, config)
        t2 = time.perf_counter()
        # 3. KL-penalise: r_t = -kl_coef * k1_t, plus the score on the last token                (B, T)
        rewards, non_score, kl = kl_penalised_rewards(sc, ro.mask, s.kl_ctl.value, config, step)
        # 4. advantages (the estimator's: GAE or a critic-free one) and the critic's returns     (B, T)
        advantages, returns = estimate_advantages(estimator, config, sc, ro.mask, rewards, non_score)
        # 5. PPO epochs over minibatches
        generator = torch.Generator().manual_seed(config.seed * 100_003 + step * world + rank)
        stats = ppo_epochs(s.model, s.optimizer, s.accelerator, ro, sc, advantages, returns, config, generator, step)
        s.scheduler.step()
        t3 = time.perf_counter()
        # 6. metrics
        metrics = step_metrics(s.accelerator, ro, sc, kl, non_score, returns, stats, s.unwrapped.has_critic)
        metrics |= step_timing(config, s, step, ro.mask.sum().item() * world, (t0, t1, t2, t3))
        s.kl_ctl.update(metrics["objective/kl"], config.batch_size)
        state.history.append(metrics)
        if (step + 1) % config.sample_every == 0 or step == 0:
            texts = s.tokenizer.batch_decode(ro.responses[:4], skip_special_tokens=True)
            state.samples += [
                {"step": step + 1, "prompt": p, "response": r.strip(), "score": score}
                for p, r, score in zip(ro.prompts[:4], texts, sc.scores[:4].tolist(), strict=True)
            ]
        s.tracker.log_metrics(metrics, step=step + 1)
        bar.set_postfix(kl=f"{metrics['objective/kl']:.2f}", score=f"{metrics['objective/scores']:.2f}")
        # 7. KL guard: over budget `patience` times in a row -> stop and roll back
        over = s.guard.over(metrics)
        if s.guard.tripped:
            bar.close()
            why = f"{'; '.join(over)} for {s.guard.violations} step(s)"
            return "stopped_by_kl_guard", f"stopped by the KL guard at step {step + 1}: {why}"
        if not over and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.num_steps):
            s.checkpoint(step + 1)
    bar.close()
    return "completed", f"completed {config.num_steps} PPO steps"


def kept_step(config: PPOConfig, state: TrainState, outcome: str, accelerator: Any) -> tuple[int, str]:
    """Which checkpointed policy the run outputs, and why. The reference is the last step (after the KL guard, the
    last checkpoint within the budget). With keep: best, an earlier checkpoint replaces it only when its held-out
    judge score beats the reference's by more than `keep_z` standard errors of the paired per-prompt difference:
    a lead within the monitor's noise keeps the reference (every checkpoint is within the KL budget)."""
    reference = state.last_good if outcome == "stopped_by_kl_guard" else len(state.history)
    why = "the last checkpoint within the KL budget" if outcome == "stopped_by_kl_guard" else "the last step"
    if config.keep != "best" or not config.n_monitor:
        return reference, why
    choice = [reference, why]
    if accelerator.is_main_process:  # the monitor ran on the main process only: its numbers count
        choice = best_checkpoint(state.monitor, reference, why, config.keep_z)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        choice = broadcast_object_list(choice)
    return choice[0], choice[1]


def best_checkpoint(monitor: list[dict[str, Any]], reference: int, why: str, z: float) -> list:
    """[step, why] of the checkpoint keep: best outputs (see `kept_step`): the checkpoint with the best held-out judge
    score (the one pruning spares) if it beats the reference beyond noise, else the reference."""
    by_step = {int(m["step"]): m for m in monitor if m.get("judge_by_prompt")}
    if reference not in by_step:
        return [reference, f"{why} (no monitor point to compare)"]
    best = max(by_step, key=lambda step: (by_step[step]["judge"], -step))  # ties: the earliest
    if best == reference:
        return [reference, f"{why}, which has the best held-out judge score ({by_step[best]['judge']:.3f})"]
    # the best of m rivals leads by chance more often than one rival: Bonferroni keeps the false-pick rate at one's
    rivals = len(by_step) - 1
    z_m = NormalDist().inv_cdf(1 - (1 - NormalDist().cdf(z)) / rivals) if z > 0 else 0.0
    beats, mean, se = better_beyond_noise(by_step[best]["judge_by_prompt"], by_step[reference]["judge_by_prompt"], z_m)
    z = round(z_m, 2)
    if not beats:
        return [
            reference,
            f"{why}: the best checkpoint (step {best}) leads it by {mean:+.3f} held-out judge, within "
            f"{z:g} standard errors ({se:.3f})",
        ]
    return [best, f"the best held-out judge score: step {best} leads {why} by {mean:+.3f} (> {z:g} x se {se:.3f})"]


def with_difference_to_kept(monitor: list[dict[str, Any]], kept: int) -> list[dict[str, Any]]:
    """The monitor's points marked `kept`, each with its held-out judge score's paired per-prompt difference to the
    kept step's and that difference's standard error: what evaluation needs to tell a drop from noise."""
    ref = next((m.get("judge_by_prompt") for m in monitor if int(m["step"]) == kept), None)
    out = []
    for m in monitor:
        point = {**m, "kept": int(int(m["step"]) == kept)}
        if ref and m.get("judge_by_prompt"):
            _, point["judge_minus_kept"], point["judge_minus_kept_se"] = better_beyond_noise(
                m["judge_by_prompt"], ref, 0
            )
        out.append(point)
    return out


def finish(
    config: PPOConfig,
    accelerator: Any,
    model: nn.Module,
    ckpt: Checkpointer,
    state: TrainState,
    outcome: str,
    reason: str,
    tokenizer: Any,
    out_dir: Path,
    tracker: Tracker,
) -> dict:
    """8. The kept policy (see `kept_step`), saved with metrics.json, the KL table, samples and curves."""
    kept, why = kept_step(config, state, outcome, accelerator)
    if kept != len(state.history) or outcome == "stopped_by_kl_guard":
        load_trained_state(
            accelerator.unwrap_model(model), Checkpointer.load(ckpt.path(kept))["model"], config.lora.enabled
        )
    final = accelerator.unwrap_model(model).policy
    final = final.merge_and_unload() if config.lora.enabled else final
    history = state.history
    final_metrics = history[kept - 1] if kept else {}  # the kept step's numbers (step 0: the SFT policy itself)
    monitor = with_difference_to_kept(state.monitor, kept)
    reason = f"{reason}; kept step {kept}, {why}"
    result = {
        "outcome": outcome,
        "reason": reason,
        "steps_done": len(history),
        "kept_step": kept,
        "kept_because": why,
        "estimator": config.estimator,
        "truncated_prompts": state.truncated_prompts,
        "final": {k: v for k, v in final_metrics.items() if not k.startswith("time/")},
        "monitor": next(({k: m[k] for k in ("step", "rm_score", "judge")} for m in monitor if m["kept"]), None),
    }
    if accelerator.is_main_process:
        result["mlflow_run_id"] = tracker.run_id or None
        write_outputs(out_dir, final, tokenizer, history, state.samples, result, monitor)
        tracker.log_metrics({"steps_done": len(history), "kept_step": kept})
        tracker.set_tags({"rlhf.outcome": outcome, "rlhf.reason": reason, "rlhf.kept": f"step {kept}: {why}"})
        for name in ("metrics.json", "kl.csv", "monitor.csv", "samples.jsonl", "curves.png", "model"):
            tracker.log_artifact(out_dir / name, "model" if name == "model" else None)
        tracker.log_table(state.samples, "ppo_samples.json")  # the UI shows how the replies changed, step by step
    accelerator.wait_for_everyone()
    return result


def write_outputs(out_dir: Path, policy, tokenizer, history, samples, result, monitor) -> None:
    """Model, metrics.json, the per-step KL table for `dvc plots`, samples and curves, swapped in atomically."""
    with staged_dir(out_dir) as tmp:
        policy.save_pretrained(tmp / "model", safe_serialization=True)
        tokenizer.save_pretrained(tmp / "model")
        write_json(tmp / "metrics.json", result)
        with open(tmp / "kl.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]) if history else ["step"])
            writer.writeheader()
            writer.writerows(history)
        write_jsonl(tmp / "samples.jsonl", samples)
        with open(tmp / "monitor.csv", "w", newline="") as f:  # RM vs the judge over checkpoints, for evaluation
            fields = ["step", "rm_score", "judge", "kept", "judge_minus_kept", "judge_minus_kept_se"]
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(monitor)
        steps = [h["step"] for h in history]
        line_plot(
            {
                "objective/scores": (steps, [h["objective/scores"] for h in history]),
                "objective/kl": (steps, [h["objective/kl"] for h in history]),
                "objective/rlhf_reward": (steps, [h["objective/rlhf_reward"] for h in history]),
            },
            "PPO: reward and KL per step",
            "step",
            "value",
            tmp / "curves.png",
        )


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(prog="python -m stages.ppo", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/validate/data")
    parser.add_argument("--sft", default="artifacts/sft/model", help="the SFT model: the KL reference")
    parser.add_argument(
        "--start", help="the policy to continue from (a later round: the previous round's); default SFT"
    )
    parser.add_argument("--rm", default="artifacts/reward/model", help="the reward model")
    parser.add_argument("--norm", default="artifacts/reward/norm.json", help="the reward model's normalisation")
    parser.add_argument(
        "--judge",
        help="the judge stage's judge (artifacts/judge/model) for the over-optimisation "
        "monitor; default: the default task's gold function",
    )
    parser.add_argument(
        "--gate",
        default="artifacts/reward_gate/passed.json",
        help="the reward-model gate's pass (PPO does not climb a reward model that failed it)",
    )
    parser.add_argument("--out", default="artifacts/ppo")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(PPOConfig, params.get("ppo"))
    precision = use_hardware(params).precision
    if args.gate and not Path(args.gate).exists():
        raise GateFailed(
            f"the reward model has not passed its gate ({args.gate} is missing): run the reward_gate stage"
        )
    paths = (config, Path(args.data), Path(args.sft), Path(args.rm), Path(args.norm), Path(args.out))
    judge = load_judge(args.judge) if args.judge else None
    start_dir = Path(args.start) if args.start else None
    is_main = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    tags = {"rlhf.precision": precision, "rlhf.start": args.start or args.sft}
    try:
        if is_main and not args.no_tracking:
            with mlflow_run("ppo", tags=tags) as tracker, autocast(precision):
                result = run(*paths, tracker, judge, start_dir)
        else:
            with autocast(precision):
                result = run(*paths, judge=judge, start_dir=start_dir)
    except NonFinite as e:
        raise NonFinite(
            f"PPO stopped: {e.reason}. The last good checkpoint is intact under {config.checkpoint_dir}."
        ) from None

    if result["outcome"] == "stopped_by_kl_guard":
        raise GateFailed(result["reason"])
    if is_main:
        print(f"PPO: {result['reason']}; held-out monitor {result['monitor']}; saved to {args.out}/model")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main("ppo", main))
