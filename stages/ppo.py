"""PPO stage: the policy climbs the reward model with a per-token KL penalty to the frozen SFT reference.

Follows "The N Implementation Details of RLHF with PPO" (Huang et al. 2022) and TRL's last PPOTrainer, departing
where noted: the KL guard (stop and roll back when KL runs away, a distinct outcome rather than a crash), exact
resume (RNG, optimiser, scheduler, KL controller and data position are checkpointed), and a vectorised GAE.

    rewards_t = -kl_coef * (log pi(a_t) - log pi_ref(a_t))   (+ RM score on the last token)
    loss      = clipped surrogate + vf_coef * clipped value loss - ent_coef * entropy

Runs in one process by default and unchanged on several: `accelerate launch --multi_gpu --num_processes 2
--num_machines 1 --mixed_precision no --dynamo_backend no -m stages.ppo` on CPUs (accelerate's `--cpu` flag alone
silently starts one process); rollouts are split across processes and gradients averaged by DDP over gloo.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stages import ppo_math as pm
from stages.io import read_jsonl, staged_dir, write_json, write_jsonl
from stages.modeling import LoraSettings, autocast, fuse_gelu, generate, peft_config, resolve_precision
from stages.params import config_from, load_params, stage_main
from stages.plots import line_plot
from stages.tracking import Tracker, mlflow_run

EXIT_GATE = 2  # the KL guard stopped the run (rolled back): an outcome, not a crash
EXIT_NONFINITE = 3


@dataclass(frozen=True)
class PPOConfig:
    """params.yaml: ppo. Defaults follow the N implementation details, scaled to the tiny default task."""

    seed: int = 0
    num_steps: int = 20  # PPO batches: rollout, score, update
    batch_size: int = 64  # rollouts per step, over all processes
    num_mini_batches: int = 2
    ppo_epochs: int = 4
    learning_rate: float = 3e-5
    response_length: int = 48
    temperature: float = 0.7
    top_k: int = 0
    top_p: float = 1.0
    missing_eos_penalty: float = 1.0  # subtracted from the score of a response that never ends
    kl_coef: float = 0.2
    adaptive_kl: bool = False
    kl_target: float = 6.0  # adaptive controller (Ziegler et al. 2019)
    kl_horizon: float = 10000.0
    gamma: float = 1.0
    lam: float = 0.95
    cliprange: float = 0.2
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    ent_coef: float = 0.0
    max_grad_norm: float = 1.0
    whiten_rewards: bool = False
    value_init: str = "reward"  # reward | sft: where the critic starts
    checkpoint_every: int = 5
    keep_checkpoints: int = 2  # full checkpoints kept (policy, critic, optimiser); older ones are pruned
    checkpoint_dir: str = "checkpoints/ppo"
    resume: str = "auto"  # auto: continue from the last checkpoint of the same run; never: start over
    sample_every: int = 10
    n_eval: int = 128  # held-out prompts for the final SFT-vs-PPO comparison
    n_monitor: int = 32  # held-out prompts scored by the RM (and gold judge) at every checkpoint: over-optimisation
    threads: int = 0  # torch threads per process (0: torch's default)
    kl_guard: dict[str, float] = field(default_factory=dict)  # KLGuardConfig
    lora: dict[str, Any] = field(default_factory=dict)  # LoRA policy; its frozen base is the reference


@dataclass(frozen=True)
class KLGuardConfig:
    """The KL budget: `patience` consecutive steps over it stop the run and restore the last step within it."""

    max_kl: float = 30.0  # objective/kl: mean over rollouts of the summed per-token k1 KL (nats)
    max_approxkl: float = 1.0  # policy/approxkl_avg: how far one update moved the policy
    patience: int = 2


class NonFiniteError(RuntimeError):
    pass


class PolicyAndValue(nn.Module):
    """One module for DDP: the policy's logits and the critic's per-token values in one forward."""

    def __init__(self, policy: nn.Module, value_model: nn.Module) -> None:
        super().__init__()
        self.policy = policy
        self.critic_backbone = getattr(value_model, value_model.base_model_prefix)
        self.critic_head = value_model.score

    def forward(self, input_ids, attention_mask, position_ids):  # noqa: ANN001
        logits = self.policy(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
        return logits, self.values(input_ids, attention_mask, position_ids)

    def values(self, input_ids, attention_mask, position_ids):  # noqa: ANN001
        """The critic alone: V(s_t) per token. (B, L) -> (B, L)."""
        hidden = self.critic_backbone(input_ids=input_ids, attention_mask=attention_mask,
                                      position_ids=position_ids).last_hidden_state  # fmt: skip
        return self.critic_head(hidden).squeeze(-1)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, as generation used them."""
    return (attention_mask.cumsum(-1) - 1).clamp_min(0)


def first_eos_mask(responses: torch.Tensor, eos_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask over tokens up to and including the first EOS, whether an EOS occurred). (B, T) -> (B, T), (B,)."""
    is_eos = responses == eos_id
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).float(), is_eos.any(1)


@torch.no_grad()
def reward_scores(rm: nn.Module, seq: torch.Tensor, attn: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """The RM's scalar at each sequence's last real token. seq, attn (B, L); last (B,) indices -> (B,)."""
    backbone = getattr(rm, rm.base_model_prefix)
    hidden = backbone(input_ids=seq, attention_mask=attn, position_ids=position_ids(attn)).last_hidden_state
    return rm.score(hidden[torch.arange(len(seq)), last]).squeeze(-1)


def disable_dropout(model: nn.Module) -> None:
    """PPO's ratios and KL assume deterministic forwards (N details #...: dropout off everywhere)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def fingerprint(config: PPOConfig, inputs: list[Path]) -> str:
    """Identity of a run: a checkpoint resumes only the run that wrote it (same results-relevant params and inputs)."""
    relevant = {k: v for k, v in asdict(config).items()
                if k not in ("resume", "checkpoint_dir", "checkpoint_every", "keep_checkpoints",
                             "sample_every", "kl_guard", "n_monitor")}  # fmt: skip
    h = hashlib.sha256(json.dumps(relevant, sort_keys=True).encode())
    for path in inputs:
        for f in sorted(path.rglob("*") if path.is_dir() else [path]):
            if f.is_file():
                h.update(f.name.encode() + f.read_bytes())
    return h.hexdigest()[:16]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a kill mid-write leaves the previous checkpoint as the latest."""
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".state.pt.{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path / "state.pt")


def latest_checkpoint(ckpt_dir: Path, run_id: str) -> Path | None:
    steps = sorted(ckpt_dir.glob(f"{run_id}/step_*/state.pt"))
    return steps[-1] if steps else None


def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def run(config: PPOConfig, data_dir: Path, sft_dir: Path, rm_dir: Path, out_dir: Path, tracker: Tracker | None) -> dict:
    """Train the policy; write `out_dir` (model, metrics, KL table, samples, plots). Returns metrics.json's content."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if config.threads:
        torch.set_num_threads(config.threads)
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    guard = KLGuardConfig(**config.kl_guard)
    random.seed(config.seed)
    np.random.seed(config.seed)
    torch.manual_seed(config.seed + rank)  # each process samples its own rollouts

    # 0. models: trainable policy and critic; frozen reference and reward model
    tokenizer = AutoTokenizer.from_pretrained(sft_dir, padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(sft_dir, use_safetensors=True)
    lora = LoraSettings(**config.lora)
    if lora.enabled:  # the frozen base doubles as the reference: no second full copy
        from peft import get_peft_model

        policy, ref_policy = get_peft_model(policy, peft_config(lora, "CAUSAL_LM", policy)), None
    else:
        ref_policy = AutoModelForCausalLM.from_pretrained(sft_dir, use_safetensors=True).requires_grad_(False).eval()
    value_src = rm_dir if config.value_init == "reward" else sft_dir
    value_model = AutoModelForSequenceClassification.from_pretrained(value_src, num_labels=1, use_safetensors=True)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir, use_safetensors=True).requires_grad_(False).eval()
    norm = json.loads((rm_dir.parent / "norm.json").read_text())
    for m in (policy, value_model, rm, ref_policy):
        if m is not None:
            disable_dropout(m)
            fuse_gelu(m)
    model = PolicyAndValue(policy, value_model)
    # fused: one multi-tensor kernel per step instead of ~10 small ops per parameter (TRL/HF Trainer: adamw_torch_fused)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.learning_rate, eps=1e-5,
                                  fused=True)  # fmt: skip
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / config.num_steps)  # linear anneal
    model, optimizer = accelerator.prepare(model, optimizer)
    kl_ctl = (pm.AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon) if config.adaptive_kl
              else pm.FixedKLController(config.kl_coef))  # fmt: skip

    prompts = [r["prompt"] for r in read_jsonl(data_dir / "prompts.jsonl")]
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    local_bs = config.batch_size // world
    mb_size = max(1, local_bs // config.num_mini_batches)
    steps_per_epoch = max(1, len(prompts) // config.batch_size)

    # checkpoints of this run (and only this run) live under <checkpoint_dir>/<fingerprint>/step_N
    code = [Path(__file__), Path(pm.__file__)]  # a code change must not resume a checkpoint of the old code
    run_id = fingerprint(config, [sft_dir / "model.safetensors", rm_dir / "model.safetensors", data_dir / "prompts.jsonl",
                                  *code])  # fmt: skip
    ckpt_dir = Path(config.checkpoint_dir)
    history: list[dict[str, float]] = []
    samples: list[dict[str, Any]] = []
    monitor: list[dict[str, Any]] = []
    monitor_prompts = [r["prompt"] for r in read_jsonl(data_dir / "eval_prompts.jsonl")][: config.n_monitor]
    rm_tok = AutoTokenizer.from_pretrained(sft_dir, padding_side="right")
    start_step, violations, last_good = 0, 0, None
    resume_from = latest_checkpoint(ckpt_dir, run_id) if config.resume == "auto" else None
    if resume_from is not None:
        state = torch.load(resume_from, weights_only=False)
        accelerator.unwrap_model(model).load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        kl_ctl.load_state_dict(state["kl_ctl"])
        set_rng_state(state["rng"][min(rank, len(state["rng"]) - 1)])
        start_step, history, samples, monitor = state["step"], state["history"], state["samples"], state.get("monitor", [])
        violations, last_good = state["violations"], resume_from
        accelerator.print(f"resuming PPO from {resume_from} (step {start_step})")

    def checkpoint(step: int) -> Path:
        path = ckpt_dir / run_id / f"step_{step:06d}"
        if accelerator.is_main_process and config.n_monitor:
            point = monitor_point(accelerator.unwrap_model(model).policy, tokenizer, rm, rm_tok, norm, monitor_prompts,
                                  config, step)  # fmt: skip
            monitor.append(point)
            if tracker is not None:
                tracker.log_metrics({f"monitor/{k}": v for k, v in point.items() if k != "step" and v is not None},
                                    step=step)  # fmt: skip
        rngs = [rng_state()] if world == 1 else accelerator.gather_for_metrics([rng_state()], use_gather_object=True)
        if accelerator.is_main_process:
            save_checkpoint(path, {"model": accelerator.unwrap_model(model).state_dict(),
                                   "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                   "kl_ctl": kl_ctl.state_dict(), "rng": rngs, "step": step, "history": history,
                                   "samples": samples, "monitor": monitor, "violations": violations,
                                   "config": asdict(config)})  # fmt: skip
            for old in sorted((ckpt_dir / run_id).glob("step_*"))[: -config.keep_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)
        accelerator.wait_for_everyone()
        return path / "state.pt"

    if start_step == 0:
        last_good = checkpoint(0)  # the SFT policy: always a within-budget state to roll back to

    outcome, reason = "completed", f"completed {config.num_steps} PPO steps"
    from tqdm.auto import tqdm

    bar = tqdm(range(start_step, config.num_steps), desc="PPO", disable=not accelerator.is_main_process,
               initial=start_step, total=config.num_steps)  # fmt: skip
    for step in bar:
        t0 = time.perf_counter()
        epoch, k = divmod(step, steps_per_epoch)  # the data position is a pure function of the step
        order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(config.seed + epoch))
        start = k * config.batch_size + rank * local_bs
        batch_prompts = [prompts[i] for i in order[start : start + local_bs]]
        unwrapped = accelerator.unwrap_model(model)

        # 1. generate: sample responses with a KV cache from left-padded prompts                     (B, T)
        enc = tokenizer(batch_prompts, return_tensors="pt", padding=True)
        queries, qmask = enc["input_ids"], enc["attention_mask"]
        with torch.no_grad():
            unwrapped.policy.eval()
            out = unwrapped.policy.generate(
                input_ids=queries, attention_mask=qmask, max_new_tokens=config.response_length, do_sample=True,
                temperature=config.temperature, top_k=config.top_k, top_p=config.top_p,  # top_k 0: no top-k (None would mean 50)
                pad_token_id=pad_id, eos_token_id=eos_id, return_dict_in_generate=True, output_logits=True)  # fmt: skip
        responses = out.sequences[:, queries.shape[1] :]
        # the raw logits each token was sampled from (before temperature/top-k/top-p), as TRL reuses them (B, T, V)
        gen_logits = torch.stack(out.logits, 1)
        mask, has_eos = first_eos_mask(responses, eos_id)
        responses = torch.where(mask.bool(), responses, torch.full_like(responses, pad_id))
        seq = torch.cat([queries, responses], 1)
        attn = torch.cat([qmask, mask.long()], 1)
        pos = position_ids(attn)
        Lq = queries.shape[1]
        t1 = time.perf_counter()

        # 2. score: policy and reference log-probs, values, and the RM's score of the whole sequence. The policy's
        #    log-probs come from the generation's logits (same tokens, positions and temperature as a forward over
        #    `seq`; equal up to float rounding, ~1e-6), as in TRL: no second policy forward.
        with torch.no_grad():
            logprobs = pm.logprobs_from_logits(gen_logits, responses, config.temperature) * mask
            values = unwrapped.values(seq, attn, pos)[:, Lq - 1 : -1] * mask
            if ref_policy is None:
                with unwrapped.policy.disable_adapter():
                    ref_logits = unwrapped.policy(input_ids=seq, attention_mask=attn, position_ids=pos).logits
            else:
                ref_logits = ref_policy(input_ids=seq, attention_mask=attn, position_ids=pos).logits
            ref_logprobs = pm.logprobs_from_logits(ref_logits[:, Lq - 1 : -1], responses, config.temperature) * mask
            last = Lq + mask.sum(1).long() - 1
            raw_scores = reward_scores(rm, seq, attn, last)
            scores = (raw_scores - norm["mean"]) / norm["std"]
            scores = torch.where(has_eos, scores, scores - config.missing_eos_penalty)
        t2 = time.perf_counter()

        # 3. KL-penalise: r_t = -kl_coef * k1_t, plus the score on the last token
        kl = pm.kl_k1(logprobs, ref_logprobs) * mask
        rewards, non_score = pm.per_token_rewards(scores, kl, kl_ctl.value, mask)
        if config.whiten_rewards:
            rewards = pm.masked_whiten(rewards, mask, shift_mean=False)
        if not (torch.isfinite(rewards).all() and torch.isfinite(values).all()):
            raise NonFiniteError(f"non-finite rewards or values at PPO step {step}")

        # 4. GAE: advantages and returns, advantages whitened over the batch
        advantages, returns = pm.gae(rewards, values, mask, config.gamma, config.lam)
        advantages = pm.masked_whiten(advantages, mask)

        # 5. PPO epochs over minibatches
        model.train()
        stats: dict[str, list[float]] = {k: [] for k in ("pg", "vf", "clip", "vclip", "approxkl", "ent", "ratio")}
        mb_gen = torch.Generator().manual_seed(config.seed * 100_003 + step * world + rank)
        for _ in range(config.ppo_epochs):
            perm = torch.randperm(len(batch_prompts), generator=mb_gen)
            for i in range(0, len(perm), mb_size):
                mb = perm[i : i + mb_size]
                new_logits, new_values = model(seq[mb], attn[mb], pos[mb])
                new_logits = new_logits[:, Lq - 1 : -1]
                new_logprobs = pm.logprobs_from_logits(new_logits, responses[mb], config.temperature)
                pg = pm.clipped_policy_loss(new_logprobs, logprobs[mb], advantages[mb], mask[mb], config.cliprange)
                vf_loss, vf_clip = pm.clipped_value_loss(new_values[:, Lq - 1 : -1], values[mb], returns[mb], mask[mb],
                                                         config.cliprange_value)  # fmt: skip
                with torch.set_grad_enabled(config.ent_coef != 0):  # a diagnostic only when it has no weight (as TRL)
                    entropy = pm.masked_mean(pm.entropy_from_logits(new_logits, config.temperature), mask[mb])
                loss = pg.loss + config.vf_coef * vf_loss - config.ent_coef * entropy
                if not torch.isfinite(loss):
                    raise NonFiniteError(f"the PPO loss became {loss.item()} at step {step}")
                optimizer.zero_grad()
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                optimizer.step()
                for k, v in zip(stats, (pg.loss, vf_loss, pg.clipfrac, vf_clip, pg.approxkl, entropy, pg.ratio),
                                strict=True):  # fmt: skip
                    stats[k].append(v.item())
        scheduler.step()
        t3 = time.perf_counter()

        # 6. monitor: TRL's metric names, reduced over processes
        seq_kl = kl.sum(1)
        var_y = pm.masked_var(returns, mask)
        local = {
            "objective/kl": seq_kl.mean(), "objective/kl_k3": (pm.kl_k3(logprobs, ref_logprobs) * mask).sum(1).mean(),
            "objective/entropy": (-logprobs).sum(1).mean(), "objective/scores": scores.mean(),
            "objective/non_score_reward": non_score.sum(1).mean(), "objective/rlhf_reward": (scores + non_score.sum(1)).mean(),
            "objective/raw_scores": raw_scores.mean(), "policy/approxkl_avg": torch.tensor(np.mean(stats["approxkl"])),
            "policy/clipfrac_avg": torch.tensor(np.mean(stats["clip"])), "policy/entropy_avg": torch.tensor(np.mean(stats["ent"])),
            "val/clipfrac_avg": torch.tensor(np.mean(stats["vclip"])), "val/ratio": torch.tensor(np.mean(stats["ratio"])),
            "val/var_explained": 1 - pm.masked_var(returns - values, mask) / var_y.clamp_min(1e-8),
            "loss/policy_avg": torch.tensor(np.mean(stats["pg"])), "loss/value_avg": torch.tensor(np.mean(stats["vf"])),
            "tokens/response_len_mean": mask.sum(1).mean(), "val/num_eos_tokens": has_eos.float().sum(),
        }  # fmt: skip
        reduced = accelerator.reduce(torch.stack([v.float() for v in local.values()]), reduction="mean")
        metrics = {k: round(v, 6) for k, v in zip(local, reduced.tolist(), strict=True)}
        metrics["val/num_eos_tokens"] *= world  # a count, not a mean
        n_tokens = mask.sum().item() * world
        metrics |= {"objective/kl_coef": kl_ctl.value, "lr": scheduler.get_last_lr()[0], "step": step + 1,
                    "episodes": (step + 1) * config.batch_size, "time/generation": t1 - t0, "time/scoring": t2 - t1,
                    "time/update": t3 - t2, "time/step": t3 - t0, "tokens/per_second": n_tokens / (t3 - t0),
                    "tokens/per_second_generation": n_tokens / (t1 - t0)}  # fmt: skip
        kl_ctl.update(metrics["objective/kl"], config.batch_size)
        history.append(metrics)
        if (step + 1) % config.sample_every == 0 or step == 0:
            texts = tokenizer.batch_decode(responses[:4], skip_special_tokens=True)
            samples += [{"step": step + 1, "prompt": p, "response": r.strip(), "score": s}
                        for p, r, s in zip(batch_prompts[:4], texts, scores[:4].tolist(), strict=True)]  # fmt: skip
        if tracker is not None and accelerator.is_main_process:
            tracker.log_metrics(metrics, step=step + 1)
        bar.set_postfix(kl=f"{metrics['objective/kl']:.2f}", score=f"{metrics['objective/scores']:.2f}")

        # 7. KL guard: over budget `patience` times in a row -> stop and roll back
        over = []
        if metrics["objective/kl"] > guard.max_kl:
            over.append(f"objective/kl {metrics['objective/kl']:.3f} > max_kl {guard.max_kl}")
        if metrics["policy/approxkl_avg"] > guard.max_approxkl:
            over.append(f"policy/approxkl_avg {metrics['policy/approxkl_avg']:.4f} > max_approxkl {guard.max_approxkl}")
        violations = violations + 1 if over else 0
        if violations >= guard.patience:
            outcome = "stopped_by_kl_guard"
            reason = (f"stopped by the KL guard at step {step + 1}: {'; '.join(over)} for {violations} step(s); "
                      f"rolled back to {last_good.parent.name}")  # fmt: skip
            break
        if not over and ((step + 1) % config.checkpoint_every == 0 or step + 1 == config.num_steps):
            last_good = checkpoint(step + 1)
    bar.close()

    # 8. the final policy: the last step, or the last checkpoint within budget
    if outcome == "stopped_by_kl_guard":
        state = torch.load(last_good, weights_only=False)
        accelerator.unwrap_model(model).load_state_dict(state["model"])
    final = accelerator.unwrap_model(model).policy
    final = final.merge_and_unload() if lora.enabled else final
    kept = int(last_good.parent.name.removeprefix("step_"))  # the step whose policy is saved (after a rollback)
    if outcome == "stopped_by_kl_guard":
        final_metrics = history[kept - 1] if kept else {}  # kept == 0: the SFT policy itself
    else:
        final_metrics = history[-1] if history else {}
    result = {"outcome": outcome, "reason": reason, "steps_done": len(history), "rolled_back_to": last_good.parent.name,
              "final": {k: v for k, v in final_metrics.items() if not k.startswith("time/")}}  # fmt: skip
    if accelerator.is_main_process:
        reference = ref_policy or AutoModelForCausalLM.from_pretrained(sft_dir, use_safetensors=True)
        result |= compare_on_heldout(final, reference, tokenizer, rm, sft_dir, norm, data_dir, config)
        if tracker is not None:
            result["mlflow_run_id"] = tracker.run_id
        write_outputs(out_dir, final, tokenizer, history, samples, result, monitor)
        if tracker is not None:
            tracker.log_metrics({k: v for k, v in result.items() if isinstance(v, int | float)})
            tracker.set_tags({"rlhf.outcome": outcome, "rlhf.reason": reason})
            for name in ("metrics.json", "kl.csv", "monitor.csv", "samples.jsonl", "curves.png", "model"):
                tracker.log_artifact(out_dir / name, "model" if name == "model" else None)
    accelerator.wait_for_everyone()
    return result


def heldout_scores(policy, tokenizer, rm, rm_tok, norm, prompts: list[str], config: PPOConfig) -> dict:
    """Sample replies to held-out prompts (the PPO sampling, seeded) and score them: the mean RM score, normalised by
    the RM's norm.json statistics, the gold judge's mean (None off the default task) and the EOS rate."""
    from stages import task
    from stages.modeling import context_limit
    from stages.reward import score

    replies, ended = generate(policy, tokenizer, prompts, config.response_length, config.temperature, seed=config.seed)
    rm_scores = score(rm, rm_tok, prompts, replies, context_limit(rm, 512))
    return {"rm_score": (sum(rm_scores) / len(rm_scores) - norm["mean"]) / norm["std"],
            "gold": task.gold_mean(prompts, replies), "eos_rate": sum(ended) / len(ended)}  # fmt: skip


def monitor_point(policy, tokenizer, rm, rm_tok, norm, prompts: list[str], config: PPOConfig, step: int) -> dict:
    """RM score and gold score of the policy on held-out prompts: evaluation only, never a training signal."""
    scores = heldout_scores(policy, tokenizer, rm, rm_tok, norm, prompts, config)
    return {"step": step, "rm_score": scores["rm_score"], "gold": scores["gold"]}


def compare_on_heldout(policy, ref, tokenizer, rm, sft_dir: Path, norm, data_dir: Path, config: PPOConfig) -> dict:
    """RM and (on the default task) gold scores of SFT and PPO replies to held-out prompts, same sampling."""
    from transformers import AutoTokenizer

    prompts = [r["prompt"] for r in read_jsonl(data_dir / "eval_prompts.jsonl")][: config.n_eval]
    out: dict[str, float] = {}
    rm_tok = AutoTokenizer.from_pretrained(sft_dir, padding_side="right")
    for name, model in (("sft", ref), ("ppo", policy)):
        scores = heldout_scores(model, tokenizer, rm, rm_tok, norm, prompts, config)
        out[f"heldout/rm_score_{name}"] = scores["rm_score"]
        out[f"heldout/eos_rate_{name}"] = scores["eos_rate"]
        if scores["gold"] is not None:
            out[f"heldout/gold_{name}"] = scores["gold"]
    return out


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
        with open(tmp / "monitor.csv", "w", newline="") as f:  # RM vs gold over checkpoints, for evaluation
            writer = csv.DictWriter(f, fieldnames=["step", "rm_score", "gold"])
            writer.writeheader()
            writer.writerows(monitor)
        steps = [h["step"] for h in history]
        line_plot({"objective/scores": (steps, [h["objective/scores"] for h in history]),
                   "objective/kl": (steps, [h["objective/kl"] for h in history]),
                   "objective/rlhf_reward": (steps, [h["objective/rlhf_reward"] for h in history])},
                  "PPO: reward and KL per step", "step", "value", tmp / "curves.png")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m stages.ppo", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", default="artifacts/validate/data")
    parser.add_argument("--sft", default="artifacts/sft/model")
    parser.add_argument("--reward", default="artifacts/reward/model")
    parser.add_argument("--out", default="artifacts/ppo")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    params = load_params(args.params)
    config = config_from(PPOConfig, params.get("ppo"))
    precision = resolve_precision(params.get("precision", "auto"))
    is_main = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0
    try:
        if is_main and not args.no_tracking:
            with mlflow_run("ppo", tags={"rlhf.precision": precision}) as tracker, autocast(precision):
                result = run(config, Path(args.data), Path(args.sft), Path(args.reward), Path(args.out), tracker)
        else:
            with autocast(precision):
                result = run(config, Path(args.data), Path(args.sft), Path(args.reward), Path(args.out), None)
    except NonFiniteError as e:
        print(f"PPO stopped: {e}. The last good checkpoint is intact under {config.checkpoint_dir}.", file=sys.stderr)
        return EXIT_NONFINITE
    if result["outcome"] == "stopped_by_kl_guard":
        if is_main:
            print(result["reason"], file=sys.stderr)
        return EXIT_GATE
    if is_main:
        gold = {k: round(v, 3) for k, v in result.items() if k.startswith("heldout/gold")}
        print(f"PPO: {result['reason']}; held-out {gold or ''}; saved to {args.out}/model")
    return 0


if __name__ == "__main__":
    raise SystemExit(stage_main(main))
